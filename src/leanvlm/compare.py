"""`leanvlm compare`: the demo recipe trained for several decoders on the same data, steps and seed; accuracy
against analytic FLOPs and measured prefill time, as a table, JSON and a plot."""

from __future__ import annotations

import os
import statistics
import time

import yaml

from leanvlm.decoders import BASELINE, DECODERS, all_option_names, option_names
from leanvlm.reports import figure
from leanvlm.reports import write_report as write_files


def parse_variant(text: str) -> tuple[str, str, dict]:
    """A decoder name, optionally with options: `NAME+key=value+...` (e.g. `proxyv+proxyv_start_layer=12`) ->
    (label, decoder, LeanVLMConfig options)."""
    decoder, *settings = text.split("+")
    if decoder not in DECODERS:
        *others, last = DECODERS
        raise ValueError(f"{text!r}: a variant starts with {', '.join(others)} or {last}.")
    options = {}
    for setting in settings:
        if "=" not in setting:
            raise ValueError(f"{text!r}: options look like +key=value, got {setting!r}.")
        key, value = setting.split("=", 1)
        if key in all_option_names() and key not in option_names(DECODERS[decoder]):
            raise ValueError(f"{text!r}: {key} is not an option of {decoder}.")
        options[key] = yaml.safe_load(value)
    return text, decoder, options


def prefill_seconds(models: dict, batch: dict, repeats: int = 5) -> dict[str, float]:
    """Median prefill time per model from an encoded image (the decoder's own work), the models interleaved in a
    rotating order so that machine noise falls on all of them alike."""
    import torch

    contexts = {name: model.encode_images(batch["pixel_values"], batch.get("image_crops"))
                for name, model in models.items()}
    names = list(models)
    times = {name: [] for name in names}
    with torch.no_grad():
        for repeat in range(repeats + 1):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                start = time.perf_counter()
                models[name](batch["input_ids"], batch["attention_mask"], image_context=contexts[name],
                             logits_to_keep=1)
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_compare(out: str, variants: list[str], seed: int = 0, train: int = 3000, test: int = 350,
                overrides: list[str] = (), console=None) -> dict:
    import torch
    from PIL import Image
    from rich.console import Console

    from leanvlm.data.llava import LLaVADataset, read_records
    from leanvlm.data.templates import generation_prompt, to_messages
    from leanvlm.demo import data_dir, demo_recipe, flops_per_sample, mean_text_tokens
    from leanvlm.eval.exact_match import encode_prompts, evaluate
    from leanvlm.train.trainer import Trainer

    console = console or Console()
    parsed = [parse_variant(v) for v in variants]
    data = data_dir(seed, train, 200, test)
    records = read_records(os.path.join(data, "test.json"))
    results, models = {}, {}
    for label, decoder, options in parsed:
        console.rule(label)
        recipe = demo_recipe(data, os.path.join(out, label.replace("+", "_").replace("=", "")), decoder,
                             overrides, **options)
        trainer = Trainer(recipe)
        summary = trainer.run()
        model, processor = trainer.model.to(torch.bfloat16).eval(), trainer.processor
        scores = evaluate(model, processor, records, image_root=data, batch_size=32, max_new_tokens=8)
        text_tokens = mean_text_tokens(LLaVADataset(os.path.join(data, "test.json"), processor,
                                                    template=processor.template))
        flops = flops_per_sample(decoder, text_tokens, model.config)["total_flops"]
        results[label] = {
            "decoder": decoder, "options": options, "accuracy": scores["accuracy"],
            "families": {k: v["accuracy"] for k, v in scores["families"].items()},
            "decoder_gflops": round(flops / 1e9, 3),
            "train_seconds_per_step": {s["name"]: s["seconds_per_step"] for s in summary["stages"]},
            "model": summary["model"],
        }
        models[label] = model
        # what is finished is on disk even if a later variant fails
        write_report({"data": data, "seed": seed, "results": results, "partial": True}, out)
    # one test question, prompted as in training, for the prefill timing
    first = records[0]
    prompt = generation_prompt(to_messages(first["conversations"][:-1], "test"), processor.template,
                               processor.tokenizer)
    input_ids, attention_mask = encode_prompts(processor, [prompt])
    pixel_values, image_crops = processor.preprocess_images(
        [Image.open(os.path.join(data, first["image"])).convert("RGB")])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
             "image_crops": image_crops}
    for label, seconds in prefill_seconds(models, batch).items():
        results[label]["prefill_ms"] = round(seconds * 1000, 2)
    report = {"data": data, "seed": seed, "train_samples": train, "test_samples": len(records),
              "overrides": list(overrides), "torch_threads": torch.get_num_threads(), "results": results}
    write_report(report, out)
    return report


def markdown(report: dict) -> str:
    results = report["results"]
    baseline = results.get(BASELINE)
    families = sorted({f for r in results.values() for f in r["families"]})
    header = ["variant", "accuracy", f"vs {BASELINE}", "decoder GFLOPs", f"vs {BASELINE}", "prefill ms",
              "train s/step", *families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        steps = " / ".join(f"{v:.2f}" for v in r["train_seconds_per_step"].values())
        row = [label, f"{r['accuracy']:.1%}",
               f"{r['accuracy'] / baseline['accuracy']:.1%}" if baseline and baseline["accuracy"] else "-",
               f"{r['decoder_gflops']:.2f}",
               f"{r['decoder_gflops'] / baseline['decoder_gflops']:.1%}" if baseline else "-",
               f"{r.get('prefill_ms', float('nan')):.1f}", steps,
               *(f"{r['families'].get(f, float('nan')):.0%}" for f in families)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> list[str]:
    """compare.json, compare.md and compare.png in `out`."""
    return write_files(report, out, "compare", markdown=markdown(report), plot=plot)


def plot(report: dict):
    """Accuracy against analytic FLOPs and against measured prefill time, one point per variant."""
    canvas, axes = figure(2, (10, 4))
    for axis, key, label in ((axes[0], "decoder_gflops", "decoder prefill GFLOPs per sample (analytic)"),
                             (axes[1], "prefill_ms", "measured prefill ms (batch 1, encoded image)")):
        for name, r in report["results"].items():
            if key in r:
                axis.scatter(r[key], 100 * r["accuracy"])
                axis.annotate(name, (r[key], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel(label)
        axis.set_ylabel("ShapesVQA test accuracy (%)")
        axis.grid(alpha=0.3)
    canvas.suptitle("Accuracy against cost, same data, steps and seed")
    canvas.tight_layout()
    return canvas


def render(report: dict, console, out: str) -> None:
    """The comparison table and the files `run_compare` wrote to `out`."""
    from rich.markdown import Markdown

    console.print(Markdown(markdown(report)))
    json_path, md_path, png_path = (os.path.join(out, f"compare.{ext}") for ext in ("json", "md", "png"))
    console.print(f"wrote {json_path}, {md_path} and {png_path}")
