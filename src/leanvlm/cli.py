"""The `leanvlm` command line. A command parses its options, calls the module that does the work and renders
what that returns; choices come from the registries, and errors a user can fix end in typer's usage-error box."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import typer

from leanvlm.config import VISION_FEATURE_SELECTS
from leanvlm.decoders import BASELINE, DECODERS, HEADLINE
from leanvlm.demo import DEMO_TEST, DEMO_TRAIN, DEMO_VAL
from leanvlm.eval.lmms_task import TASK
from leanvlm.eval.metrics import SCORES
from leanvlm.measure.flops import CONVENTIONS, VISION_PRESETS

app = typer.Typer(help="Vision-language models that spend little decoder compute on vision tokens.")
analyze_app = typer.Typer(help="Look inside a trained model.")
app.add_typer(analyze_app, name="analyze")
data_app = typer.Typer(help="Make data sets and precompute encoder features.")
app.add_typer(data_app, name="data")

DTYPES = ("bfloat16", "float16", "float32")  # torch dtypes by name, for weights and features
AUTO_DTYPES = ("auto", *DTYPES)  # auto: bfloat16 where the device multiplies it natively, else float32
# What a user can fix from the command line: a bad value, a missing or unreadable file, an uninstalled extra.
USER_ERRORS = (ValueError, KeyError, IndexError, OSError, ModuleNotFoundError)


def user_errors(hint: str = "", errors: tuple[type[Exception], ...] = USER_ERRORS) -> Callable:
    """Decorate a command so that `errors` end in typer's usage-error box (exit code 2) with their message, then
    `hint`, instead of a traceback. `hint` may name the command's parameters, e.g. "see {out}/compare.json"."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def checked(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except errors as error:
                # a KeyError's str() is the repr of its message
                message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
                if hint:
                    arguments = inspect.signature(command).bind(*args, **kwargs).arguments
                    message = f"{message} ({hint.format(**arguments)})"
                raise typer.BadParameter(message) from error

        return checked

    return decorate


def one_of(names: Iterable[str]) -> dict:
    """Settings for a `typer.Option` that accepts only `names` (a registry's keys) and lists them in the help and
    in the error; use as `typer.Option(default, help=..., **one_of(DECODERS))`."""
    names = tuple(names)

    def parse(value: str) -> str:
        if value not in names:
            raise typer.BadParameter(f"{value!r}: choose one of {', '.join(names)}")
        return value

    return {"parser": parse, "metavar": f"[{'|'.join(names)}]"}


def decoder_options(pairs: list[str] | None, **shortcuts) -> dict:
    """Decoder options from `--option KEY=VALUE` (values read as YAML) and the shortcut flags that are set."""
    import yaml

    from leanvlm.decoders import all_option_names

    options = {key: value for key, value in shortcuts.items() if value is not None}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in all_option_names():
            raise typer.BadParameter(f"{pair!r}: give KEY=VALUE with a decoder option: {', '.join(all_option_names())}",
                                     param_hint="--option")
        options[key] = yaml.safe_load(value)
    return options


def saved_model(path: Path | None) -> Path | None:
    """Option callback: `path`, when given, is a directory a leanvlm model was saved to."""
    if path is not None and not (path / "config.json").is_file():
        raise typer.BadParameter(f"{path} holds no saved model (no config.json)")
    return path


def torch_device(device: str) -> str:
    """Option callback: cpu, or cuda where there is a GPU."""
    import torch

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise typer.BadParameter("use cpu, or cuda on a machine with a GPU")
    return device


def decoder_variant(text: str) -> str:
    """Option parser: a decoder name with +key=value options (see `leanvlm.config.parse_variant`)."""
    from leanvlm.config import parse_variant

    try:
        parse_variant(text)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    return text


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
@user_errors()
def flops(
    llm: str = typer.Option(..., help="LLM preset (e.g. qwen2-0.5b, vicuna-7b) or a Hugging Face config.json path."),
    vision: str = typer.Option(..., help="Vision preset.", **one_of(VISION_PRESETS)),
    text_tokens: int = typer.Option(..., min=1, help="Non-vision tokens in the prompt (text, and crop newlines)."),
    vision_tokens: int = typer.Option(None, min=1, help="Vision tokens in the sample (default: encoder's x crops)."),
    crops: int = typer.Option(1, min=1, help="Crops per image."),
    decoder: str = typer.Option(BASELINE, help="Decoder for the JSON output: a registered one or a --variant."),
    variant: list[str] = typer.Option(None, "--variant", parser=decoder_variant,
                                      help="An extra row: a decoder with its own options (repeatable), e.g. "
                                           "himix+himix_layers=[0,4,8] or vanilla+frozen_vision_layers=[8,9]."),
    proxyv_start_layer: int = typer.Option(None, min=0, help="ProxyV start layer (default: the middle layer)."),
    proxyv_reduce_factor: int = typer.Option(4, min=1, help="ProxyV grid reduction per side."),
    option: list[str] = typer.Option(None, "--option", help="Any decoder option as KEY=VALUE (repeatable), e.g. "
                                     "probe_skip_vision_ffn_from_layer=12; each decoder takes its own."),
    convention: str = typer.Option("prefill", help="Counting convention (leanvlm.measure.flops explains them).",
                                   **one_of(CONVENTIONS)),
    vision_feature_layer: int = typer.Option(-2, help="Encoder hidden state the decoder reads (as in HF "
                                             "output_hidden_states; negative counts from the end); the encoder runs "
                                             "the layers up to it."),
    tome_r: int = typer.Option(0, min=0, help="ToMe: tokens merged per encoder layer (0 = off); the decoder reads "
                               "what is left unless --vision-tokens is given."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object for --decoder."),
) -> None:
    """Analytic FLOPs of the language decoder: prefill (with a breakdown) and one decoded token, per decoder; with
    the vision encoder's and the end-to-end total."""
    import json

    from rich.console import Console

    from leanvlm.measure import flops_report

    if decoder not in DECODERS and decoder not in (variant or []):
        raise typer.BadParameter(f"{decoder!r}: choose one of {', '.join(DECODERS)} (or a --variant row)",
                                 param_hint="--decoder")
    report = flops_report.run(llm, vision, text_tokens, vision_tokens=vision_tokens, crops=crops,
                              convention=convention, vision_feature_layer=vision_feature_layer, tome_r=tome_r,
                              variants=tuple(variant or ()),
                              **decoder_options(option, proxyv_start_layer=proxyv_start_layer,
                                                proxyv_reduce_factor=proxyv_reduce_factor))
    if as_json:
        typer.echo(json.dumps(flops_report.for_decoder(report, decoder), indent=2))
    else:
        flops_report.render(report, Console())


@app.command()
@user_errors()
def bench(
    llm: str = typer.Option("qwen2-0.5b", help="LLM preset or a Hugging Face config.json (random weights of its "
                                               "shape and model_type)."),
    vision: str = typer.Option("siglip-so400m-384", help="Vision preset (random weights, full depth).",
                               **one_of(VISION_PRESETS)),
    model: Path = typer.Option(None, help="A saved leanvlm model whose LLM and encoder replace the presets.",
                               callback=saved_model),
    decoder: list[str] = typer.Option(list(HEADLINE), parser=decoder_variant,
                                      help="Decoders to compare (repeatable); add model options with +key=value, e.g. "
                                           "himix+tome_r=8."),
    text_tokens: int = typer.Option(64, min=1, help="Text tokens after the image."),
    crops: int = typer.Option(1, min=1, help="Crops per image."),
    batch: int = typer.Option(1, min=1, help="Samples per batch."),
    dtype: str = typer.Option("auto", help="Weights and activations dtype; auto: bfloat16 where the device "
                                           "multiplies it natively, else float32.", **one_of(AUTO_DTYPES)),
    device: str = typer.Option("cpu", help="cpu or cuda.", callback=torch_device),
    repeats: int = typer.Option(5, min=1, help="Measured repeats (after warm-up)."),
    warmup: int = typer.Option(1, min=0, help="Warm-up repeats."),
    decode_steps: int = typer.Option(16, min=1, help="Decode steps timed per repeat."),
    proxyv_start_layer: int = typer.Option(None, min=0, help="ProxyV start layer (default: the middle layer)."),
    proxyv_reduce_factor: int = typer.Option(4, min=1, help="ProxyV grid reduction per side."),
    option: list[str] = typer.Option(None, "--option", help="Any decoder option as KEY=VALUE (repeatable), e.g. "
                                     "probe_skip_vision_ffn_from_layer=12; each decoder takes its own."),
    train: bool = typer.Option(True, help="Also time one training step (forward + backward)."),
    out: Path = typer.Option(Path("bench"), help="Directory for NAME.json, NAME.md and NAME.png."),
    name: str = typer.Option("bench", help="File name stem of the outputs."),
) -> None:
    """Prefill / decode latency, tokens/s, peak memory, KV-cache bytes and a training step for each decoder,
    interleaved in one process, each ratio to vanilla next to the analytic FLOPs ratio."""
    from rich.console import Console
    from rich.progress import Progress

    from leanvlm.measure.bench import BenchSettings, llm_family, render, run_bench, write_report
    from leanvlm.measure.flops import resolve_llm

    if model is None:  # an unusable --llm fails here, before any model is built
        llm_family(llm)
        resolve_llm(llm)
    settings = BenchSettings(llm=llm, vision=vision, decoders=list(decoder), text_tokens=text_tokens, crops=crops,
                             batch=batch, dtype=dtype, device=device, repeats=repeats, warmup=warmup,
                             decode_steps=decode_steps, train=train,
                             options=decoder_options(option, proxyv_start_layer=proxyv_start_layer,
                                                     proxyv_reduce_factor=proxyv_reduce_factor),
                             model=str(model) if model else None)
    console = Console()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("building models", total=None)
        report = run_bench(settings, progress=lambda text: progress.update(task, description=text))
    render(report, console)
    for path in write_report(report, str(out), name):
        console.print(f"wrote {path}")


@app.command()
@user_errors()
def demo(
    out: Path = typer.Option(Path("leanvlm-demo"), help="Output directory (model, demo.json, the new image)."),
    decoder: str = typer.Option(None, help="Decoder to train (default: the demo recipe's).", **one_of(DECODERS)),
    seed: int = typer.Option(0, help="Seed of the data, the initialisation and the data order."),
    train_samples: int = typer.Option(DEMO_TRAIN, "--train", min=16, help="ShapesVQA training images."),
    val_samples: int = typer.Option(DEMO_VAL, "--val", min=1, help="ShapesVQA validation questions."),
    test_samples: int = typer.Option(DEMO_TEST, "--test", min=7, help="ShapesVQA test questions."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides, e.g. stages.0.steps=300."),
) -> None:
    """The main job: SmolLM2-135M + DINOv2-S -> a ShapesVQA VLM trained on this machine (the recipe's stages), its test
    accuracy per question family, its decoder FLOPs against vanilla, and an answer about a new image."""
    from rich.console import Console

    from leanvlm.demo import render, run_demo

    console = Console()
    report = run_demo(str(out), seed, train_samples, val_samples, test_samples, decoder, overrides or [], console)
    render(report, console, str(out / "demo.json"))


@app.command()
@user_errors("finished variants are in {out}/compare.json")
def compare(
    variant: list[str] = typer.Option(list(HEADLINE), "--decoder", parser=decoder_variant,
                                      help="Decoder to train (repeatable); add options with +key=value, e.g. "
                                           "vanilla+probe_skip_vision_ffn_from_layer=15."),
    out: Path = typer.Option(Path("leanvlm-compare"), help="Output directory (models, compare.json/.md/.png)."),
    seed: int = typer.Option(0, help="Seed of the data, the initialisation and the data order."),
    train_samples: int = typer.Option(DEMO_TRAIN, "--train", min=16, help="ShapesVQA training images."),
    test_samples: int = typer.Option(DEMO_TEST, "--test", min=7, help="ShapesVQA test questions."),
    equal_time: bool = typer.Option(False, "--equal-time", help=f"Also train each other variant for the steps that "
                                    f"fit {BASELINE}'s training time (needs {BASELINE} among the decoders)."),
    overrides: list[str] = typer.Argument(None, help="Recipe overrides for every variant, e.g. stages.0.steps=300."),
) -> None:
    """Train the demo recipe for each decoder on the same data, steps and seed; compare accuracy per family (95%
    intervals, answer priors, a paired test against vanilla) with analytic decoder FLOPs, measured prefill time and
    training time."""
    from rich.console import Console

    from leanvlm.compare import render, run_compare

    console = Console()
    report = run_compare(str(out), list(variant), seed, train_samples, test_samples, overrides or [], console,
                         equal_time)
    render(report, console, str(out))


@app.command(context_settings={"allow_extra_args": False})
# a bad recipe or path is the user's to fix; any other failure during training keeps its traceback
@user_errors(errors=(ValueError, KeyError, IndexError, FileNotFoundError))
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

    trainer = Trainer(load_recipe(str(recipe), overrides or []), progress=progress)
    summary = trainer.run(resume=str(resume_from) if resume_from else resume)
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
@user_errors()
def data_synth(
    out: Path = typer.Option(..., help="Output directory."),
    train: int = typer.Option(10000, min=0, help="Training samples."),
    val: int = typer.Option(500, min=0, help="Validation samples."),
    test: int = typer.Option(1000, min=0, help="Test samples."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same images and records."),
    image_size: int = typer.Option(224, min=32, help="Image side in pixels."),
) -> None:
    """Generate ShapesVQA: images, LLaVA-format train/val/test JSON, captions, multi-turn conversations, a card and
    the test split as an offline lmms-eval task (lmms-task/)."""
    from rich.console import Console

    from leanvlm.data.synthetic import render_counts, synthesize
    from leanvlm.eval.lmms_task import write_task

    console = Console()
    with console.status("generating") as status:
        counts = synthesize(str(out), train, val, test, seed, image_size,
                            progress=lambda split: status.update(f"generating {split}"))
    render_counts(counts, console, str(out))
    if test:  # the test split as an offline lmms-eval task (see `leanvlm data lmms-task`)
        write_task(str(out / "test.json"), str(out / "lmms-task"))
        console.print(f"lmms-eval task: --tasks {TASK} --include_path {out / 'lmms-task'}")


@data_app.command("lmms-task")
@user_errors()
def data_lmms_task(
    data: Path = typer.Argument(..., help="LLaVA-format JSON/JSONL (e.g. ShapesVQA's test.json)."),
    out: Path = typer.Option(..., help="Task folder to write (pass it to lmms-eval as --include_path)."),
    name: str = typer.Option(TASK, help="Task name; the multiple-choice task is NAME_mc."),
    image_root: Path = typer.Option(None, help="Directory relative image paths start from (default: the file's)."),
) -> None:
    """Write an offline lmms-eval task folder for the records: NAME (generation, exact match per family) and
    NAME_mc (multiple choice by log-likelihood)."""
    from rich.console import Console

    from leanvlm.eval.lmms_task import write_task

    paths = write_task(str(data), str(out), str(image_root) if image_root else None, name)
    Console().print(f"wrote {', '.join(paths)}\nrun: python -m lmms_eval --model leanvlm --model_args "
                    f"pretrained=MODEL_DIR --tasks {name} --include_path {out}")


@data_app.command("encode")
@user_errors()
def data_encode(
    data: list[Path] = typer.Option(..., help="LLaVA-format JSON/JSONL file(s) whose images to encode (repeatable)."),
    out: Path = typer.Option(..., help="Feature cache directory (shards + index.json; reused across runs)."),
    vision: str = typer.Option(None, help="Encoder: a packaged part (dinov2-s14) or a Hugging Face directory."),
    model: Path = typer.Option(None, help="A saved leanvlm model: its encoder, feature layers and crop settings.",
                               callback=saved_model),
    layer: list[int] = typer.Option([-2], help="Encoder hidden-state index to keep (repeatable); with --vision."),
    attention_summary: list[int] = typer.Option(
        [], help="Hidden-state index whose layer's attention summary to keep, as visionzip reads (repeatable); with "
                 "--vision."),
    select: str = typer.Option("patch", help="Token selection; with --vision.", **one_of(VISION_FEATURE_SELECTS)),
    max_crops: int = typer.Option(1, min=1, help="Crops per image (AnyRes when > 1); with --vision."),
    tome_r: int = typer.Option(0, min=0, help="ToMe: tokens merged per encoder layer (0 = off); with --vision."),
    dtype: str = typer.Option("auto", help="Encoder dtype (the features keep it); auto: bfloat16 where the machine "
                                           "multiplies it natively, else float32, as training picks.",
                              **one_of(("auto", "bfloat16", "float32"))),
    image_root: Path = typer.Option(None, help="Directory relative image paths start from (default: the file's)."),
    batch_size: int = typer.Option(16, min=1, help="Images per encoder batch."),
) -> None:
    """Precompute frozen-encoder features for every image of the data files, so training reads them instead of
    running the encoder. Images already in the cache are skipped; an interrupted run keeps its finished shards."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from leanvlm.data.features import encode_data, render_encoding

    if (vision is None) == (model is None):
        raise typer.BadParameter("give exactly one of --vision and --model", param_hint="--vision/--model")
    console = Console()
    columns = (TextColumn("encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("encode", total=None)
        report = encode_data([str(f) for f in data], str(out), vision=vision, model=str(model) if model else None,
                             layers=layer, summaries=attention_summary, select=select, max_crops=max_crops, dtype=dtype,
                             image_root=str(image_root) if image_root else None, batch_size=batch_size,
                             tome_r=tome_r,
                             progress=lambda images, total: bar.update(task, advance=images, total=total))
    render_encoding(report, console, str(out))


@analyze_app.command("redundancy")
@user_errors()
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
    from rich.console import Console

    from leanvlm.measure import redundancy

    console = Console()
    result = redundancy.run(str(model_dir), [str(p) for p in image or []], prompt, samples, batch_size, seed,
                            console)
    redundancy.render_table(result, console)
    json_path, png_path = redundancy.save_redundancy(result, str(out))
    console.print(f"wrote {json_path} and {png_path}")


@analyze_app.command("probe")
@user_errors()
def analyze_probe(
    data: Path = typer.Argument(..., help="A ShapesVQA directory (`leanvlm data synth`): train.json and test.json."),
    layer: list[str] = typer.Option(["-2"], "--layer", help="Encoder hidden-state index, or several joined by "
                                    "commas (8,11: side by side); repeat for one probe each."),
    vision: str = typer.Option("dinov2-s14", help="Encoder: a packaged part or a Hugging Face directory."),
    steps: int = typer.Option(1500, min=1, help="Probe training steps (batches of 64)."),
    train_samples: int = typer.Option(None, min=1, help="Use only the first N training records."),
    tome_r: int = typer.Option(0, min=0, help="ToMe: tokens merged per encoder layer (0 = off)."),
    out: Path = typer.Option(Path("probe"), help="Directory for probe.json, probe.md and probe.png."),
) -> None:
    """What the frozen encoder's features can answer at all: a small question-conditioned attention probe per
    layer (set), trained on the training images' features and scored per family on the test images."""
    from rich.console import Console

    from leanvlm.measure import probe

    console = Console()
    report = probe.run(str(data), layer, vision, steps, train_samples, tome_r=tome_r, console=console)
    paths = probe.write(report, str(out))
    console.print(probe.markdown(report))
    console.print("wrote " + ", ".join(paths))


@app.command("eval")
@user_errors()
def eval_command(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor."),
    data: Path = typer.Option(..., help="LLaVA-format JSON/JSONL; each record's last assistant turn is the reference."),
    batch_size: int = typer.Option(16, min=1, help="Questions per generation batch."),
    max_new_tokens: int = typer.Option(16, min=1, help="Longest answer, in tokens."),
    max_samples: int = typer.Option(None, min=1, help="Evaluate only the first N records."),
    image_root: Path = typer.Option(None, help="Directory relative image paths start from (default: the file's)."),
    out: Path = typer.Option(Path("results.json"), help="Where the JSON results (with every prediction) go."),
    metric: str = typer.Option("exact_match", help="exact_match; vqa (VQAv2 soft accuracy over a record's "
                               "'answers'); anls (over 'answers'); multiple_choice (the option letter named, over "
                               "'options').", **one_of(SCORES)),
    decoder: str = typer.Option(None, parser=decoder_variant,
                                help="Run the saved weights under another decoder policy with the same parameters, "
                                     "with options: a trained vanilla model as pool+keep_tokens=16, divprune, "
                                     "random, vica or vanilla+frozen_vision_layers=[8,9]."),
) -> None:
    """Greedy answers to each record's last question, asked with the conversation template the model was trained
    with, scored by exact match (or --metric) overall and per family. Prints a table and writes JSON."""
    from rich.console import Console

    from leanvlm.eval import exact_match
    from leanvlm.reports import write_json

    console = Console()
    result = exact_match.run(str(model_dir), str(data), str(image_root) if image_root else None, batch_size,
                             max_new_tokens, max_samples, console, metric, decoder)
    write_json(str(out), result)
    exact_match.render(result, console, str(out))


@app.command()
@user_errors()
def export(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor."),
    out: Path = typer.Argument(..., help="Directory for the exported checkpoint and processor."),
    to: str = typer.Option(..., help="Target layout: llava (Hugging Face LlavaForConditionalGeneration).",
                           **one_of(("llava",))),
) -> None:
    """Write a saved model in another project's layout. --to llava: a single-crop vanilla model as a Hugging Face
    Llava checkpoint + LlavaProcessor (with the chat template) that plain transformers loads with equal logits."""
    from rich.console import Console

    from leanvlm.interop.llava import export as export_llava

    files = export_llava(str(model_dir), str(out))
    Console().print(f"wrote {len(files)} files to {out}: LlavaForConditionalGeneration.from_pretrained({str(out)!r})")


@app.command("import")
@user_errors()
def import_command(
    src: Path = typer.Argument(..., help="The released checkpoint directory."),
    out: Path = typer.Argument(..., help="Directory for the leanvlm model and processor."),
    source: str = typer.Option(..., "--from", help="Layout of SRC: himix (the released HiMix code's TinyLLaVA "
                               "layout) or proxyv (the released ProxyV code's LLaVA-NeXT layout).",
                               **one_of(("himix", "proxyv"))),
    vision_config: Path = typer.Option(None, help="proxyv: the encoder's config (a local model directory or its "
                                       "config.json); the checkpoint names it only by its hub id."),
) -> None:
    """Convert a checkpoint saved by a paper's released code into a leanvlm model (key names from a table; any key
    it does not map, or that is missing, is an error naming it)."""
    from rich.console import Console

    console = Console()
    if source == "himix":
        from leanvlm.interop.himix import import_himix

        report = import_himix(str(src), str(out))
        console.print(f"imported a HiMix model with {report['layers']} vision K/V layers")
    else:
        from leanvlm.interop.proxyv import import_proxyv

        report = import_proxyv(str(src), str(out), str(vision_config) if vision_config else None)
        console.print(f"imported a ProxyV model: start layer {report['proxyv_start_layer']}, reduce factor "
                      f"{report['proxyv_reduce_factor']}, {report['proxyv_proxy_init']} proxies, max_crops "
                      f"{report['max_crops']}")
    console.print(f"vision_feature_layer={report['vision_feature_layer']}, vision_feature_select="
                  f"{report['vision_feature_select']!r} (the released token selection), template "
                  f"{report['template']!r}; wrote {out}")
    for note in report.get("notes", []):
        console.print(f"note: {note}")


@app.command()
@user_errors()
def serve(
    model_dir: Path = typer.Argument(..., help="A saved leanvlm model with its processor."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default: other machines cannot reach "
                             "it unless you say so)."),
    port: int = typer.Option(8000, min=1, max=65535),
    served_model_name: str = typer.Option(None, help="The name clients send as `model` (default: the directory's)."),
    api_key: str = typer.Option(None, envvar="LEANVLM_API_KEY", help="Require `Authorization: Bearer KEY` on "
                                "every route but /health."),
    dtype: str = typer.Option(None, help="Run the weights in this dtype (default: as saved).", **one_of(DTYPES)),
    max_batch_size: int = typer.Option(16, min=1, help="Most requests decoded together."),
    max_prefill_tokens: int = typer.Option(4096, min=1, help="Most decoder tokens prefilled in one engine step."),
    max_waiting: int = typer.Option(64, min=1, help="Requests that may wait; more are answered 429."),
    image_cache_mb: float = typer.Option(1024, min=0, help="Memory for encoded images (0: no cache)."),
    max_images: int = typer.Option(4, min=0, help="Most images in one request."),
    max_image_mb: float = typer.Option(20, min=0, help="Largest image file accepted."),
    allowed_local_media_path: Path = typer.Option(None, help="Let requests name image files under this "
                                                  "directory (by path or file:// URL)."),
    allow_remote_images: bool = typer.Option(False, help="Fetch http(s) image URLs."),
    image_fetch_timeout: float = typer.Option(5.0, min=0.1, help="Seconds to wait for a remote image."),
    max_tokens: int = typer.Option(256, min=1, help="Answer length when a request sets no max_tokens."),
) -> None:
    """An OpenAI-compatible server (POST /v1/chat/completions, streamed or not; GET /v1/models, /health,
    /metrics) on a continuous-batching engine with an image-context cache."""
    from leanvlm.serve.images import ImageSources
    from leanvlm.serve.server import ServerSettings
    from leanvlm.serve.server import serve as run_server

    if allowed_local_media_path is not None and not allowed_local_media_path.is_dir():
        raise typer.BadParameter(f"{allowed_local_media_path} is not a directory",
                                 param_hint="--allowed-local-media-path")
    images = ImageSources(int(max_image_mb * (1 << 20)),
                          str(allowed_local_media_path) if allowed_local_media_path else None,
                          allow_remote_images, image_fetch_timeout)
    run_server(str(model_dir), ServerSettings(
        host=host, port=port, model_name=served_model_name, api_key=api_key, dtype=dtype,
        max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens, max_waiting=max_waiting,
        image_cache_mb=image_cache_mb, max_images=max_images, default_max_tokens=max_tokens, images=images))


@app.command()
@user_errors()
def loadtest(
    llm: str = typer.Option("smollm2-135m", help="A packaged part or an LLM preset of `leanvlm flops`."),
    vision: str = typer.Option("dinov2-s14", help="A packaged part or a vision preset."),
    decoder: list[str] = typer.Option(None, help="Decoders to serve, one server each (default: all).",
                                      **one_of(DECODERS)),
    requests: int = typer.Option(64, min=1, help="Requests per scenario."),
    concurrency: str = typer.Option("1,4,16", help="Concurrent clients, comma-separated scenarios."),
    max_tokens: str = typer.Option("1,32", help="Answer lengths in tokens, comma-separated scenarios."),
    images: str = typer.Option("distinct,repeated", help="distinct: a new image per request; repeated: one image."),
    dtype: str = typer.Option("auto", help="auto: bfloat16 where the CPU multiplies it natively, else float32.",
                              **one_of(AUTO_DTYPES)),
    max_batch_size: int = typer.Option(16, min=1),
    time_limit: float = typer.Option(600, min=1, help="Seconds per scenario; unanswered requests count as failed."),
    out: Path = typer.Option(Path("loadtest"), help="Directory for loadtest.json, .md and .png."),
) -> None:
    """Throughput, TTFT and per-token latency of `leanvlm serve` under a bounded load, per decoder: a real server
    on a free loopback port, streamed requests at each concurrency, distinct or repeated images."""
    from rich.console import Console

    from leanvlm.serve import loadtest as lt

    def numbers(text: str, name: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise typer.BadParameter(f"{text!r}: give comma-separated whole numbers", param_hint=name) from error

    console = Console()
    settings = lt.LoadSettings(llm=llm, vision=vision, decoders=decoder or list(HEADLINE), requests=requests,
                               concurrency=numbers(concurrency, "--concurrency"),
                               max_tokens=numbers(max_tokens, "--max-tokens"),
                               images=[part.strip() for part in images.split(",") if part.strip()], dtype=dtype,
                               max_batch_size=max_batch_size, time_limit=time_limit)
    report = lt.run(settings, console)
    for path in lt.write_report(report, str(out)):
        console.print(f"wrote {path}")


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
