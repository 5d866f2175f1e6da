"""The `leanvlm` command line."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Vision-language models that spend little decoder compute on vision tokens.")
analyze_app = typer.Typer(help="Look inside a trained model.")
app.add_typer(analyze_app, name="analyze")
data_app = typer.Typer(help="Make data sets and precompute encoder features.")
app.add_typer(data_app, name="data")


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        info()
        typer.echo("Run `leanvlm --help` for the commands.")


@app.command()
def info() -> None:
    """Print the version, the decoder policies and the supported language-model families."""
    import leanvlm
    from leanvlm.decoders.llm import SUPPORTED_FAMILIES

    typer.echo(f"leanvlm {leanvlm.__version__}")
    typer.echo(f"decoders: {', '.join(leanvlm.DECODERS)}")
    typer.echo(f"language model families: {', '.join(SUPPORTED_FAMILIES)}")


@app.command()
def flops(
    llm: str = typer.Option(..., help="LLM preset (e.g. qwen2-0.5b, vicuna-7b) or a Hugging Face config.json path."),
    vision: str = typer.Option(..., help="Vision preset: siglip-so400m-384, clip-l-336 or dinov2-s14-224."),
    text_tokens: int = typer.Option(..., min=1, help="Non-vision tokens in the prompt (text, and crop newlines)."),
    vision_tokens: int = typer.Option(None, min=1, help="Vision tokens in the sample (default: encoder's x crops)."),
    crops: int = typer.Option(1, min=1, help="Crops per image."),
    decoder: str = typer.Option("vanilla", help="Decoder for the JSON output: vanilla, himix or proxyv."),
    proxyv_start_layer: int = typer.Option(None, min=0, help="ProxyV start layer (default: the middle layer)."),
    proxyv_reduce_factor: int = typer.Option(4, min=1, help="ProxyV grid reduction per side."),
    convention: str = typer.Option("prefill", help="Counting convention: prefill, himix-paper or proxyv-paper."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for --decoder."),
) -> None:
    """Analytic FLOPs of the language decoder: prefill (with a breakdown) and one decoded token, per decoder."""
    import json

    from rich.console import Console
    from rich.table import Table

    from leanvlm.measure.flops import CONVENTIONS, DECODERS, decode_flops, decoder_flops

    if convention not in CONVENTIONS:
        raise typer.BadParameter(f"choose one of {', '.join(CONVENTIONS)}", param_hint="--convention")
    if decoder not in DECODERS:
        raise typer.BadParameter(f"choose one of {', '.join(DECODERS)}", param_hint="--decoder")
    try:
        results = {
            name: decoder_flops(llm, vision, text_tokens, name, vision_tokens=vision_tokens, crops=crops,
                                convention=convention, proxyv_start_layer=proxyv_start_layer,
                                proxyv_reduce_factor=proxyv_reduce_factor)
            for name in DECODERS
        }
    except (ValueError, TypeError, KeyError) as error:
        raise typer.BadParameter(f"cannot read the model shape: {error}") from error
    tokens = results["vanilla"]["tokens"]
    step = decode_flops(llm, tokens["vision"] + tokens["text"], convention)
    vanilla_total = results["vanilla"]["total_flops"]
    if as_json:
        chosen = dict(results[decoder], decoder=decoder, llm=llm, vision=vision)
        chosen["ratio_to_vanilla"] = chosen["total_flops"] / vanilla_total
        chosen["all_decoders"] = {name: r["total_flops"] for name, r in results.items()}
        chosen["decode_flops_per_token"] = step["total_flops"]
        typer.echo(json.dumps(chosen, indent=2))
        return
    parts = sorted({part for r in results.values() for part in r["breakdown"]})
    table = Table(title=f"Decoder prefill GFLOPs: {llm}, {vision}, {tokens['vision']} vision + {tokens['text']} "
                        f"text tokens ({convention})")
    table.add_column("decoder", no_wrap=True)
    for column in ["total", "vs vanilla", *parts]:
        table.add_column(column, justify="right")
    for name, result in results.items():
        cells = [f"{result['breakdown'].get(part, 0) / 1e9:.1f}" for part in parts]
        total = result["total_flops"]
        table.add_row(name, f"{total / 1e9:.1f}", f"{total / vanilla_total:.1%}", *cells)
    console = Console()
    console.print(table)
    console.print(f"one decoded token at {tokens['vision'] + tokens['text']} tokens of context: "
                  f"{step['total_flops'] / 1e9:.2f} GFLOPs (every decoder)")


@app.command()
def bench(
    llm: str = typer.Option("qwen2-0.5b", help="LLM preset (random weights)."),
    vision: str = typer.Option("siglip-so400m-384", help="Vision preset (random weights, full depth)."),
    model: Path = typer.Option(None, help="A saved leanvlm model whose LLM and encoder replace the presets."),
    decoder: list[str] = typer.Option(["vanilla", "himix", "proxyv"], help="Decoders to compare (repeatable)."),
    text_tokens: int = typer.Option(64, min=1, help="Text tokens after the image."),
    crops: int = typer.Option(1, min=1, help="Crops per image."),
    batch: int = typer.Option(1, min=1, help="Samples per batch."),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    repeats: int = typer.Option(5, min=1, help="Measured repeats (after warm-up)."),
    warmup: int = typer.Option(1, min=0, help="Warm-up repeats."),
    decode_steps: int = typer.Option(16, min=1, help="Decode steps timed per repeat."),
    proxyv_start_layer: int = typer.Option(None, min=0, help="ProxyV start layer (default: the middle layer)."),
    proxyv_reduce_factor: int = typer.Option(4, min=1, help="ProxyV grid reduction per side."),
    train: bool = typer.Option(True, help="Also time one training step (forward + backward)."),
    out: Path = typer.Option(Path("bench"), help="Directory for NAME.json, NAME.md and NAME.png."),
    name: str = typer.Option("bench", help="File name stem of the outputs."),
) -> None:
    """Prefill / decode latency, tokens/s, peak memory, KV-cache bytes and a training step for each decoder,
    interleaved in one process, each ratio to vanilla next to the analytic FLOPs ratio."""
    import torch
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import Progress

    from leanvlm.measure.bench import BenchSettings, markdown, run_bench, write_report
    from leanvlm.measure.flops import LLM_PRESETS

    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter("choose bfloat16, float16 or float32", param_hint="--dtype")
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise typer.BadParameter("use cpu, or cuda on a machine with a GPU", param_hint="--device")
    for chosen in decoder:
        if chosen not in ("vanilla", "himix", "proxyv"):
            raise typer.BadParameter(f"{chosen!r}: choose vanilla, himix or proxyv", param_hint="--decoder")
    if model is not None and not (model / "config.json").is_file():
        raise typer.BadParameter(f"{model} holds no saved model (no config.json)", param_hint="--model")
    if model is None and llm not in LLM_PRESETS:
        raise typer.BadParameter(f"choose a preset: {', '.join(LLM_PRESETS)}", param_hint="--llm")
    settings = BenchSettings(llm=llm, vision=vision, decoders=list(decoder), text_tokens=text_tokens, crops=crops,
                             batch=batch, dtype=dtype, device=device, repeats=repeats, warmup=warmup,
                             decode_steps=decode_steps, proxyv_start_layer=proxyv_start_layer,
                             proxyv_reduce_factor=proxyv_reduce_factor, train=train,
                             model=str(model) if model else None)
    console = Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building models", total=None)
        try:
            report = run_bench(settings, progress=lambda text: progress.update(task, description=text))
        except ValueError as error:
            raise typer.BadParameter(str(error)) from error
    console.print(Markdown(markdown(report)))
    for path in write_report(report, str(out), name):
        console.print(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("leanvlm-demo"), help="Output directory (model, demo.json, the new image)."),
    decoder: str = typer.Option("himix", help="Decoder to train: himix, vanilla or proxyv."),
    seed: int = typer.Option(0, help="Seed of the data, the initialisation and the data order."),
    train_samples: int = typer.Option(3000, "--train", min=16, help="ShapesVQA training samples."),
    val_samples: int = typer.Option(200, "--val", min=1, help="ShapesVQA validation samples."),
    test_samples: int = typer.Option(350, "--test", min=7, help="ShapesVQA test samples."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides, e.g. stages.1.steps=300."),
) -> None:
    """The main job: SmolLM2-135M + DINOv2-S -> a ShapesVQA VLM trained on this machine in two stages, its test
    accuracy per question family, its decoder FLOPs against vanilla, and an answer about a new image."""
    from rich.console import Console
    from rich.table import Table

    from leanvlm.demo import run_demo

    if decoder not in ("himix", "vanilla", "proxyv"):
        raise typer.BadParameter("choose himix, vanilla or proxyv", param_hint="--decoder")
    console = Console()
    try:
        report = run_demo(str(out), seed, train_samples, val_samples, test_samples, decoder, overrides or [],
                          console)
    except (FileNotFoundError, ValueError, KeyError, ModuleNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error
    test = report["test"]
    table = Table(title=f"ShapesVQA test accuracy ({decoder}, {test['samples']} questions)")
    table.add_column("family")
    table.add_column("accuracy", justify="right")
    table.add_column("questions", justify="right")
    for family, result in test["families"].items():
        table.add_row(family, f"{result['accuracy']:.1%}", str(result["samples"]))
    table.add_row("[bold]overall", f"[bold]{test['accuracy']:.1%}", str(test["samples"]))
    console.print(table)
    flops = report["decoder_gflops_per_sample"]
    table = Table(title=f"Decoder prefill per sample ({report['vision_tokens_per_sample']} vision + "
                        f"{report['text_tokens_per_sample']} text tokens, analytic)")
    table.add_column("decoder")
    table.add_column("GFLOPs", justify="right")
    table.add_column("vs vanilla", justify="right")
    for name, value in flops.items():
        table.add_row(name, f"{value:.2f}", f"{value / flops['vanilla']:.1%}")
    console.print(table)
    question = report["new_question"]
    console.print(f"new image: {question['image']}\nquestion:  {question['question']}\n"
                  f"answer:    {question['prediction']}   (true: {question['answer']})")
    seconds = report["seconds"]
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    console.print(f"model saved to {report['model']}; report {out / 'demo.json'}")


@app.command()
def compare(
    variant: list[str] = typer.Option(["vanilla", "himix", "proxyv"], "--decoder",
                                      help="Decoder to train (repeatable); add options with +key=value, e.g. "
                                           "vanilla+probe_skip_vision_ffn_from_layer=15."),
    out: Path = typer.Option(Path("leanvlm-compare"), help="Output directory (models, compare.json/.md/.png)."),
    seed: int = typer.Option(0, help="Seed of the data, the initialisation and the data order."),
    train_samples: int = typer.Option(3000, "--train", min=16, help="ShapesVQA training samples."),
    test_samples: int = typer.Option(350, "--test", min=7, help="ShapesVQA test samples."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides for every variant, e.g. stages.1.steps=300."),
) -> None:
    """Train the demo recipe for each decoder on the same data, steps and seed; compare accuracy per family with
    analytic decoder FLOPs, measured prefill time and training time per step."""
    from rich.console import Console
    from rich.markdown import Markdown

    from leanvlm.compare import markdown, parse_variant, run_compare

    try:
        for text in variant:
            parse_variant(text)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--decoder") from error
    console = Console()
    try:
        report = run_compare(str(out), list(variant), seed, train_samples, test_samples, overrides or [], console)
    except (FileNotFoundError, ValueError, KeyError, ModuleNotFoundError) as error:
        raise typer.BadParameter(f"{error} (finished variants are in {out / 'compare.json'})") from error
    console.print(Markdown(markdown(report)))
    console.print(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.png'}")


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    overrides: list[str] = typer.Argument(None, help="key.sub=value overrides, e.g. stages.0.steps=100."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
    resume_from: Path = typer.Option(None, help="Continue from this checkpoint directory."),
    progress: bool = typer.Option(True, help="Show the live progress display."),
) -> None:
    """Train a recipe's stages (accelerate: run under `accelerate launch -m leanvlm train ...` for several
    processes or GPUs). Writes checkpoints, log.jsonl, summary.json and the final model to <output_dir>/model."""
    from rich.console import Console

    from leanvlm.train.recipe import load_recipe
    from leanvlm.train.trainer import Trainer

    try:
        parsed = load_recipe(str(recipe), overrides or [])
    except (FileNotFoundError, ValueError, KeyError, IndexError) as error:
        raise typer.BadParameter(str(error), param_hint="RECIPE") from error
    trainer = Trainer(parsed, progress=progress)
    try:
        summary = trainer.run(resume=str(resume_from) if resume_from else resume)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise typer.BadParameter(str(error)) from error
    if trainer.accelerator.is_main_process:
        console = Console()
        for stage in summary["stages"]:
            if stage["last_loss"] is None:  # finished before the checkpoint this run resumed from
                console.print(f"{stage['name']}: done before resuming")
                continue
            console.print(f"{stage['name']}: {stage['steps']} steps, loss {stage['first_loss']:.4f} -> "
                          f"{stage['last_loss']:.4f}, {stage['seconds_per_step']:.2f} s/step")
        console.print(f"saved {summary['model']}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory."),
    train: int = typer.Option(10000, min=0, help="Training samples."),
    val: int = typer.Option(500, min=0, help="Validation samples."),
    test: int = typer.Option(1000, min=0, help="Test samples."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same bytes."),
    image_size: int = typer.Option(224, min=32, help="Image side in pixels."),
) -> None:
    """Generate ShapesVQA: images, LLaVA-format train/val/test JSON, a captions file and a card."""
    from rich.console import Console

    from leanvlm.data.synthetic import synthesize

    console = Console()
    with console.status("generating") as status:
        counts = synthesize(str(out), train, val, test, seed, image_size,
                            progress=lambda split: status.update(f"generating {split}"))
    for split, families in counts.items():
        listed = ", ".join(f"{k} {v}" for k, v in families.items())
        console.print(f"{split}: {sum(families.values())} samples {listed}")
    console.print(f"wrote {out}")


@data_app.command("encode")
def data_encode(
    data: list[Path] = typer.Option(..., help="LLaVA-format JSON/JSONL file(s) whose images to encode (repeatable)."),
    out: Path = typer.Option(..., help="Feature cache directory (shards + index.json; reused across runs)."),
    vision: str = typer.Option(None, help="Encoder: a packaged part (dinov2-s14) or a Hugging Face directory."),
    model: Path = typer.Option(None, help="A saved leanvlm model: its encoder, feature layers and crop settings."),
    layer: list[int] = typer.Option([-2], help="Encoder hidden-state index to keep (repeatable); with --vision."),
    select: str = typer.Option("patch", help="Token selection: patch, full or drop_first; with --vision."),
    max_crops: int = typer.Option(1, min=1, help="Crops per image (AnyRes when > 1); with --vision."),
    dtype: str = typer.Option("bfloat16", help="Encoder dtype (the features keep it): bfloat16 or float32."),
    image_root: Path = typer.Option(None, help="Directory relative image paths start from (default: the file's)."),
    batch_size: int = typer.Option(16, min=1, help="Images per encoder batch."),
) -> None:
    """Precompute frozen-encoder features for every image of the data files, so training reads them instead of
    running the encoder. Images already in the cache are skipped; an interrupted run keeps its finished shards."""
    import json
    import time

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from leanvlm.data.features import FeatureCache, encode_images_to_cache, feature_signature
    from leanvlm.data.llava import data_image_paths
    from leanvlm.modeling import load_vision_model
    from leanvlm.processing import ImagePreprocessor, encoder_image_processor

    if (vision is None) == (model is None):
        raise typer.BadParameter("give exactly one of --vision and --model", param_hint="--vision/--model")
    if dtype not in ("bfloat16", "float32"):
        raise typer.BadParameter("choose bfloat16 or float32", param_hint="--dtype")
    if select not in ("patch", "full", "drop_first"):
        raise typer.BadParameter("choose patch, full or drop_first", param_hint="--select")
    console = Console()
    try:
        paths = [p for f in data for p in data_image_paths(str(f), str(image_root) if image_root else None)]
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--data") from error
    if model is not None:
        from leanvlm.config import LeanVLMConfig

        if not (model / "config.json").is_file():
            raise typer.BadParameter(f"{model} holds no saved model (no config.json)", param_hint="--model")
        config = LeanVLMConfig.from_pretrained(model)
        layers, select, max_crops, pinpoints = (config.feature_layers, config.vision_feature_select,
                                                config.max_crops, config.image_grid_pinpoints)
        from leanvlm.modeling import LeanVLMForConditionalGeneration
        from leanvlm.processing import LeanVLMProcessor

        encoder = LeanVLMForConditionalGeneration.from_pretrained(model, dtype=getattr(torch, dtype)).vision_model
        images = LeanVLMProcessor.from_pretrained(model)
    else:
        layers, pinpoints = sorted(set(layer)), None
        try:
            encoder = load_vision_model(vision, getattr(torch, dtype))
        except (OSError, ValueError, KeyError, ModuleNotFoundError) as error:
            raise typer.BadParameter(str(error), param_hint="--vision") from error
        images = ImagePreprocessor(encoder_image_processor(encoder), max_crops, pinpoints)
    encoder = encoder.to(getattr(torch, dtype)).eval()
    signature = feature_signature(encoder, select, images)
    cache = FeatureCache(str(out), signature)
    unique = sorted(set(paths))
    started = time.perf_counter()
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("encode", total=len(unique))
        progress.advance(task, len(unique) - len({p for p in unique
                                                  if any(cache.key(p, k) not in cache for k in layers)}))
        encoded = encode_images_to_cache(encoder, images, layers, select, unique, cache, batch_size,
                                         progress=lambda n: progress.advance(task, n))
    seconds = time.perf_counter() - started
    settings = {"signature": signature, "encoder": encoder.name_or_path, "layers": layers, "select": select,
                "max_crops": max_crops, "image_grid_pinpoints": pinpoints, "dtype": dtype,
                "images": len(unique), "encoded_now": encoded, "seconds": round(seconds, 2)}
    (out / "features.json").write_text(json.dumps(settings, indent=2))
    console.print(f"{encoded} image(s) encoded, {len(unique) - encoded} already cached, in {seconds:.1f} s; "
                  f"wrote {out} (signature {signature})")


@analyze_app.command("redundancy")
def analyze_redundancy(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor (vanilla or proxyv)."),
    image: list[Path] = typer.Option(None, "--image", help="Image file(s); default: ShapesVQA pictures."),
    prompt: str = typer.Option("<image>\nDescribe the image.", help="Prompt, with one <image> placeholder."),
    samples: int = typer.Option(8, help="Number of ShapesVQA pictures when no --image is given."),
    batch_size: int = typer.Option(4, help="Samples per forward pass."),
    seed: int = typer.Option(0, help="Seed of the ShapesVQA pictures."),
    out: Path = typer.Option(Path("redundancy"), help="Directory for redundancy.json and redundancy.png."),
) -> None:
    """Per layer: how much vision and text tokens' hidden states change (cosine with the previous layer and with
    the input), and how close the mean vision and mean text states are. Prints a table, writes JSON and a plot."""
    from PIL import Image
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from leanvlm.data.synthetic import generate, render, scene_from_dict
    from leanvlm.measure.redundancy import METRICS, RedundancyStats, save_redundancy
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    console = Console()
    if prompt.count("<image>") != 1:
        raise typer.BadParameter("the prompt needs exactly one <image> placeholder", param_hint="--prompt")
    for path in image or []:
        if not path.is_file():
            raise typer.BadParameter(f"{path} is not a file", param_hint="--image")
    model = LeanVLMForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = LeanVLMProcessor.from_pretrained(model_dir)
    if image:
        pictures = [Image.open(p).convert("RGB") for p in image]
    else:
        pictures = [render(scene_from_dict(sample["scene"])) for sample in generate(samples, seed)]
    stats = RedundancyStats()
    for start in track(range(0, len(pictures), batch_size), description="Analysing", console=console):
        chunk = pictures[start : start + batch_size]
        stats.add(model, dict(processor(text=[prompt] * len(chunk), images=chunk)))
    result = stats.result()
    result.update(model=str(model_dir), decoder=model.config.decoder, prompt=prompt)
    table = Table(title=f"Layer-wise cosine similarity ({result['samples']} samples)")
    table.add_column("layer", justify="right")
    for header in ("vision/prev", "text/prev", "vision/input", "text/input", "vision/text"):
        table.add_column(header, justify="right")
    for row in result["layers"]:
        table.add_row(str(row["layer"]), *(f"{row[m]:.3f}" if row[m] is not None else "-" for m in METRICS))
    console.print(table)
    json_path, png_path = save_redundancy(result, str(out))
    console.print(f"wrote {json_path} and {png_path}")


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor."),
    data: Path = typer.Option(..., help="LLaVA-format JSON/JSONL; each record's last assistant turn is the reference."),
    batch_size: int = typer.Option(16, min=1, help="Questions per generation batch."),
    max_new_tokens: int = typer.Option(16, min=1, help="Longest answer, in tokens."),
    max_samples: int = typer.Option(None, min=1, help="Evaluate only the first N records."),
    image_root: Path = typer.Option(None, help="Directory relative image paths start from (default: the file's)."),
    out: Path = typer.Option(Path("results.json"), help="Where the JSON results (with every prediction) go."),
) -> None:
    """Exact-match accuracy of greedy answers to each record's last question, overall and per family, asked with
    the conversation template the model was trained with. Prints a table and writes JSON."""
    import json

    from rich.console import Console

    from leanvlm.data.llava import read_records
    from leanvlm.eval.exact_match import evaluate, load_model, results_table

    try:
        model, processor = load_model(str(model_dir))
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="MODEL_DIR") from error
    try:
        records = read_records(str(data))[:max_samples]
    except (OSError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--data") from error
    console = Console()
    root = str(image_root or data.resolve().parent)
    try:
        result = evaluate(model, processor, records, root, batch_size, max_new_tokens, source=str(data),
                          console=console)
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--data") from error
    result = {"model": str(model_dir), "data": str(data), **result}
    console.print(results_table(result, title=f"Exact match: {model_dir} on {data}"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


@app.command()
def chat(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor."),
    image: Path = typer.Option(..., help="The image to talk about."),
    max_new_tokens: int = typer.Option(128, min=1, help="Longest answer, in tokens."),
    system: str = typer.Option(None, help="System message (default: the template's own, if it has one)."),
) -> None:
    """Talk about one image. Reads one question per line until an empty line, `exit` or the end of input, and
    streams each answer; earlier turns stay in the prompt, so follow-up questions work."""
    import sys

    import torch
    from PIL import Image
    from transformers import TextStreamer

    from leanvlm.config import IMAGE_TOKEN
    from leanvlm.data.templates import generation_prompt
    from leanvlm.eval.exact_match import answer, load_model

    if not image.is_file():
        raise typer.BadParameter(f"{image} is not a file", param_hint="--image")
    try:
        model, processor = load_model(str(model_dir))
    except (FileNotFoundError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="MODEL_DIR") from error
    pixel_values, crops = processor.preprocess_images([Image.open(image).convert("RGB")])
    with torch.no_grad():  # encoded once, reused by every turn
        context = model.encode_images(pixel_values.to(model.device), crops)
    messages = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    while True:
        if sys.stdin.isatty():
            typer.echo("> ", nl=False)
        question = sys.stdin.readline().strip()
        if not question or question == "exit":
            break
        first = not any(m["role"] == "user" for m in messages)
        messages.append({"role": "user", "content": f"{IMAGE_TOKEN}\n{question}" if first else question})
        prompt = generation_prompt(messages, processor.template, processor.tokenizer)
        reply = answer(model, processor, [prompt], image_context=context, max_new_tokens=max_new_tokens,
                       streamer=streamer)[0]
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    app()
