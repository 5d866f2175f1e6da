"""`leanvlm demo`: turn the packaged SmolLM2-135M + DINOv2-S into a ShapesVQA VLM on a CPU, end to end, and show
what it learned and what it cost. The pieces (data, recipe, FLOPs) are shared with `leanvlm compare`."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from importlib import resources

import yaml

from leanvlm.decoders import BASELINE
from leanvlm.reports import write_json
from leanvlm.train.recipe import Recipe, apply_override, recipe_from_dict

DEMO_RECIPE = "demo.yaml"
# ShapesVQA sizes: training images, validation and test questions (200 and 30 per family: tight intervals)
DEMO_TRAIN, DEMO_VAL, DEMO_TEST = 3000, 210, 1400
LLM_PRESET, VISION_PRESET = "smollm2-135m", "dinov2-s14-224"  # the analytic shapes of the packaged parts


def data_dir(seed: int, train: int, val: int, test: int) -> str:
    """ShapesVQA for the demo, generated once into the cache directory (atomically: complete or absent)."""
    from leanvlm.data.synthetic import synthesize
    from leanvlm.hub import cache_dir

    target = os.path.join(cache_dir(), "shapesvqa", f"seed{seed}-train{train}-val{val}-test{test}")
    if os.path.isfile(os.path.join(target, "README.md")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    work = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".shapesvqa-")
    try:
        synthesize(work, train, val, test, seed)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def demo_recipe(data: str, output_dir: str, decoder: str | None, overrides: list[str] = (),
                **model_options) -> Recipe:
    """The packaged demo recipe on `data`, writing to `output_dir`, for `decoder` (None: the recipe's own), then
    `overrides`."""
    text = resources.files("leanvlm.train").joinpath("recipes", DEMO_RECIPE).read_text()
    raw = yaml.safe_load(text)
    raw["output_dir"] = output_dir
    if decoder is not None:
        raw["model"]["decoder"] = decoder
    raw["model"]["options"] = {**(raw["model"].get("options") or {}), **model_options}
    # One feature cache per data set, shared by every run on it.
    raw["features"] = os.path.join(data, "features")
    for override in overrides:
        apply_override(raw, override)
    # The packaged recipe may set options of its own decoder's policy; another decoder trains without them.
    from leanvlm.decoders import DECODERS, all_option_names, option_names

    decoder = raw["model"]["decoder"]
    if decoder in DECODERS:  # an unknown name is reported by the recipe check
        foreign = set(all_option_names()) - set(option_names(DECODERS[decoder]))
        options = raw["model"].get("options") or {}
        raw["model"]["options"] = {k: v for k, v in options.items() if k not in foreign or k in model_options}
    return recipe_from_dict(raw, where=DEMO_RECIPE, base=data)


def flops_per_sample(decoder: str, text_tokens: int, model_config=None, vision_tokens: int | None = None) -> dict:
    """Analytic decoder prefill FLOPs of one demo sample (one 224-pixel image = 256 DINOv2 patch tokens, unless
    `vision_tokens` says what the encoder left, e.g. after token merging)."""
    from leanvlm.decoders import all_option_names
    from leanvlm.measure.flops import decoder_flops

    options = {}
    if model_config is not None:  # the model's decoder options (proxyv settings, probes)
        options = {name: getattr(model_config, name) for name in all_option_names()}
    return decoder_flops(LLM_PRESET, VISION_PRESET, text_tokens, decoder, vision_tokens=vision_tokens, **options)


def mean_text_tokens(dataset) -> int:
    """Mean non-vision tokens per sample (the `<image>` placeholder excluded)."""
    lengths = [len(dataset.tokenize(i)[0]) - 1 for i in range(min(len(dataset), 256))]
    return round(statistics.mean(lengths))


def new_question(out_dir: str, seed: int) -> dict:
    """A freshly generated scene (a seed no split used), its image written to out_dir, with its question."""
    from leanvlm.data.synthetic import SYSTEM_PROMPT, generate, render, scene_from_dict

    sample = generate(1, seed)[0]
    path = os.path.join(out_dir, "new-image.png")
    render(scene_from_dict(sample["scene"])).save(path)
    return {"image": path, "system": SYSTEM_PROMPT, "question": sample["question"], "answer": sample["answer"],
            "family": sample["family"]}


def ask(model, processor, question: dict) -> str:
    """The model's answer to a `new_question`, prompted as in training."""
    from PIL import Image

    from leanvlm.config import IMAGE_TOKEN
    from leanvlm.data.templates import generation_prompt
    from leanvlm.eval.exact_match import answer

    messages = [{"role": "system", "content": question["system"]},
                {"role": "user", "content": f"{IMAGE_TOKEN}\n{question['question']}"}]
    prompt = generation_prompt(messages, processor.template, processor.tokenizer)
    return answer(model, processor, [prompt], [Image.open(question["image"]).convert("RGB")], max_new_tokens=8)[0]


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (Linux and macOS report it in different units)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class Timer:
    """Wall-clock seconds per named phase, in order."""

    def __init__(self):
        self.phases: dict[str, float] = {}
        self.started = time.perf_counter()

    def phase(self, name: str):
        from contextlib import contextmanager

        @contextmanager
        def timed():
            start = time.perf_counter()
            yield
            self.phases[name] = round(time.perf_counter() - start, 1)

        return timed()

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 1)


def run_demo(out: str, seed: int = 0, train: int = DEMO_TRAIN, val: int = DEMO_VAL, test: int = DEMO_TEST,
             decoder: str | None = None, overrides: list[str] = (), console=None) -> dict:
    """Data -> parts -> two-stage training -> test accuracy per family -> FLOPs against vanilla -> a new question.
    Writes <out>/demo.json and the model to <out>/run/model; returns the report."""
    import torch
    from rich.console import Console

    from leanvlm.data.llava import LLaVADataset, read_records
    from leanvlm.eval.exact_match import evaluate
    from leanvlm.hub import pretrained_part
    from leanvlm.measure.flops import model_encoder_flops
    from leanvlm.train.trainer import Trainer

    console = console or Console()
    os.makedirs(out, exist_ok=True)
    timer = Timer()
    with timer.phase("data"), console.status("generating ShapesVQA (once)"):
        data = data_dir(seed, train, val, test)
    console.print(f"data: {data}")
    with timer.phase("parts"), console.status("preparing SmolLM2-135M and DINOv2-S/14 (converted once)"):
        for part in ("smollm2-135m", "dinov2-s14"):
            pretrained_part(part)
    recipe = demo_recipe(data, os.path.join(out, "run"), decoder, overrides)
    decoder = recipe.model.decoder
    with timer.phase("train"):
        trainer = Trainer(recipe)
        summary = trainer.run()
    precision = "bf16" if summary["mixed_precision"] == "bf16" else "fp32"  # the evaluation computes as training did
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, processor = trainer.model.to(dtype).eval(), trainer.processor
    with timer.phase("eval"):
        results = evaluate(model, processor, read_records(os.path.join(data, "test.json")), image_root=data,
                           batch_size=64, max_new_tokens=8, console=console)
    text_tokens = mean_text_tokens(LLaVADataset(os.path.join(data, "test.json"), processor,
                                                template=processor.template))
    flops = {name: flops_per_sample(name, text_tokens, model.config if name == decoder else None)["total_flops"]
             for name in dict.fromkeys([decoder, BASELINE])}
    encoder = model_encoder_flops(model.config, processor.crop_size)["total_flops"]  # every decoder reads this layer
    question = new_question(out, seed + 1_000_003)
    question["prediction"] = ask(model, processor, question)
    report = {
        "decoder": decoder,
        "data": data,
        "model": summary["model"],
        "stages": summary["stages"],
        "test": {k: v for k, v in results.items() if k != "predictions"},
        "text_tokens_per_sample": text_tokens,
        "vision_tokens_per_sample": 256,
        "decoder_gflops_per_sample": {k: round(v / 1e9, 3) for k, v in flops.items()},
        "encoder_gflops_per_sample": round(encoder / 1e9, 3),
        "new_question": question,
        "seconds": {**timer.phases, "total": timer.total()},
        # the recipe's `auto`: bf16 where the machine multiplies it natively, else fp32; it sets the times above
        "precision": precision,
        "peak_memory_mib": peak_memory_mib(),
    }
    write_json(os.path.join(out, "demo.json"), report)
    return report


def render(report: dict, console, report_path: str) -> None:
    """Test accuracy per family, decoder and end-to-end FLOPs against vanilla, the new question and the time per
    phase."""
    from rich.table import Table

    from leanvlm.eval.exact_match import results_table

    test = report["test"]
    console.print(results_table(test, f"ShapesVQA test exact match ({report['decoder']}, {test['samples']} questions)"))
    flops, encoder = report["decoder_gflops_per_sample"], report["encoder_gflops_per_sample"]
    table = Table(title=f"Prefill per sample ({report['vision_tokens_per_sample']} vision + "
                        f"{report['text_tokens_per_sample']} text tokens, analytic GFLOPs)")
    for column in ("decoder", "decoder GFLOPs", f"vs {BASELINE}", "+ encoder", f"vs {BASELINE}"):
        table.add_column(column, justify="left" if column == "decoder" else "right")
    for name, value in flops.items():
        table.add_row(name, f"{value:.2f}", f"{value / flops[BASELINE]:.1%}", f"{value + encoder:.2f}",
                      f"{(value + encoder) / (flops[BASELINE] + encoder):.1%}")
    console.print(table)
    question = report["new_question"]
    console.print(f"new image: {question['image']}\nquestion:  {question['question']}\n"
                  f"answer:    {question['prediction']}   (true: {question['answer']})")
    seconds = report["seconds"]
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                  + f"; peak memory {report['peak_memory_mib']:.0f} MiB; computed in {report['precision']}")
    curves = os.path.join(os.path.dirname(report["model"]), "training.png")
    console.print(f"model saved to {report['model']}; learning curves {curves}; report {report_path}")
