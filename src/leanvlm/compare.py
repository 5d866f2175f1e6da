"""`leanvlm compare`: the demo recipe trained for several decoders on the same data, steps and seed; accuracy
against analytic FLOPs and measured prefill time, as a table, JSON and a plot."""

from __future__ import annotations

import os
import statistics
import time

from leanvlm.config import parse_variant
from leanvlm.decoders import BASELINE
from leanvlm.demo import DEMO_TEST, DEMO_TRAIN, DEMO_VAL
from leanvlm.reports import figure
from leanvlm.reports import write_report as write_files
from leanvlm.stats import mcnemar

EVAL_TOKENS = 8  # tokens generated per test answer, as the demo evaluates
SCORES_FILE = "test-scores.json"  # a finished run's test scores, so that a later comparison does not re-evaluate


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


def train_variant(out: str, data: str, records: list, label: str, decoder: str, options: dict, overrides: list[str],
                  console) -> tuple[dict, object, object]:
    """Train the demo recipe for one variant and score it on `records`: (result, model, processor)."""
    from PIL import Image

    from leanvlm.data.llava import LLaVADataset
    from leanvlm.demo import demo_recipe, flops_per_sample, mean_text_tokens
    from leanvlm.eval.exact_match import evaluate
    from leanvlm.measure.flops import model_encoder_flops
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.precision import AUTO, resolve_dtype
    from leanvlm.processing import LeanVLMProcessor
    from leanvlm.train.trainer import Trainer

    console.rule(label)
    directory = os.path.join(out, label.replace("+", "_").replace("=", "").replace("@", "_at_"))
    recipe = demo_recipe(data, directory, decoder, overrides, **options)
    summary = finished_run(recipe)
    reused = summary is not None
    if not reused:
        trainer = Trainer(recipe)
        summary = trainer.run()
        model, processor = trainer.model, trainer.processor
    else:  # an earlier compare trained this exact recipe to the end: reuse it
        console.print(f"reusing the finished run in {directory}")
        model = LeanVLMForConditionalGeneration.from_pretrained(summary["model"])
        processor = LeanVLMProcessor.from_pretrained(summary["model"])
    # evaluated as it trained (a run finished before the trainer recorded it: as this machine computes fastest)
    precision = summary.get("mixed_precision")
    model = model.to(resolve_dtype("bfloat16" if precision == "bf16" else "float32" if precision else AUTO)).eval()
    scores = scores_on_test(directory, records, reused, lambda: evaluate(
        model, processor, records, image_root=data, batch_size=64, max_new_tokens=EVAL_TOKENS, console=console))
    text_tokens = mean_text_tokens(LLaVADataset(os.path.join(data, "test.json"), processor,
                                                template=processor.template))
    # the crops the processor makes of a test image (ShapesVQA's images are all one size)
    crops = len(processor.crops_of(Image.open(os.path.join(data, records[0]["image"])).convert("RGB")))
    encoder_cost = model_encoder_flops(model.config, processor.crop_size, crops)
    vision_tokens = encoder_cost["tokens"]["patches"] * crops  # after any token merging
    flops = flops_per_sample(decoder, text_tokens, model.config, vision_tokens=vision_tokens)["total_flops"]
    encoder = encoder_cost["total_flops"]
    result = {
        "decoder": decoder, "options": options, "overrides": list(overrides),
        "accuracy": scores["accuracy"], "ci95": scores["ci95"], "answer_prior": scores["answer_prior"],
        "families": {k: v["accuracy"] for k, v in scores["families"].items()},
        "families_ci95": {k: v["ci95"] for k, v in scores["families"].items()},
        "family_priors": {k: v["answer_prior"] for k, v in scores["families"].items()},
        "correct": "".join("1" if p["correct"] else "0" for p in scores["predictions"]),  # per test question
        "decoder_gflops": round(flops / 1e9, 3),
        "encoder_gflops": round(encoder / 1e9, 3),
        "end_to_end_gflops": round((flops + encoder) / 1e9, 3),
        "train_steps": {s["name"]: s["steps"] for s in summary["stages"]},
        "train_seconds_per_step": {s["name"]: s["seconds_per_step"] for s in summary["stages"]},
        "train_seconds": round(sum(s["steps"] * s["seconds_per_step"] for s in summary["stages"]), 1),
        "model": summary["model"],
        "dtype": str(model.dtype).removeprefix("torch."),  # of the evaluation; training autocast to it
    }
    return result, model, processor


def scores_on_test(directory: str, records: list, reused: bool, evaluate_now) -> dict:
    """The run's scores on the test `records`: read back from `directory` when the run was reused and scored on
    exactly these records before, else `evaluate_now()`, saved there for the next comparison."""
    import hashlib
    import json

    from leanvlm.reports import write_json

    asked = hashlib.sha256(json.dumps({"records": records, "max_new_tokens": EVAL_TOKENS},
                                      sort_keys=True).encode()).hexdigest()
    path = os.path.join(directory, SCORES_FILE)
    if reused and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("asked") == asked:
            return saved["scores"]
    scores = evaluate_now()
    write_json(path, {"asked": asked, "scores": scores})
    return scores


def finished_run(recipe) -> dict | None:
    """The summary of a run of exactly this recipe that trained to the end in its output_dir, else None."""
    import json

    from leanvlm.train.recipe import recipe_to_dict

    paths = [os.path.join(recipe.output_dir, name) for name in ("recipe.json", "summary.json")]
    if not all(os.path.isfile(path) for path in paths):
        return None
    with open(paths[0]) as f:
        if json.load(f) != json.loads(json.dumps(recipe_to_dict(recipe))):
            return None
    with open(paths[1]) as f:
        summary = json.load(f)
    return summary if os.path.isfile(os.path.join(summary["model"], "config.json")) else None


def equal_time_overrides(result: dict, baseline: dict) -> list[str]:
    """Stage steps scaled so that this variant's optimizer steps take as long as the baseline's did."""
    scale = baseline["train_seconds"] / result["train_seconds"]
    steps = result["train_steps"].values()
    return [f"stages.{i}.steps={max(1, round(count * scale))}" for i, count in enumerate(steps)]


def paired_verdict(result: dict, baseline: dict, label: str) -> dict:
    """McNemar's exact test of a variant against the baseline on the same test questions, with a sentence."""
    test = mcnemar([c == "1" for c in result["correct"]], [c == "1" for c in baseline["correct"]])
    difference = 100 * (result["accuracy"] - baseline["accuracy"])
    direction = "above" if difference > 0 else "below" if difference < 0 else "away from"
    if test["p_value"] < 0.05:
        words = (f"{label} is {abs(difference):.1f} points {direction} {BASELINE}: significant "
                 f"(p = {test['p_value']:.2g})")
    else:
        words = (f"{label} is {abs(difference):.1f} points {direction} {BASELINE}: not significant "
                 f"(p = {test['p_value']:.2g}); the test cannot tell them apart")
    return {**test, "difference_points": round(difference, 2), "significant": test["p_value"] < 0.05,
            "verdict": words}


def run_compare(out: str, variants: list[str], seed: int = 0, train: int = DEMO_TRAIN, test: int = DEMO_TEST,
                overrides: list[str] = (), console=None, equal_time: bool = False) -> dict:
    """Each variant trained on the demo recipe with the same data, steps and seed; with `equal_time`, each
    non-baseline variant is trained again for the steps that fit the baseline's training time."""
    import torch
    from PIL import Image
    from rich.console import Console

    from leanvlm.data.llava import read_records
    from leanvlm.data.templates import generation_prompt, to_messages
    from leanvlm.demo import data_dir
    from leanvlm.eval.exact_match import encode_prompts

    console = console or Console()
    parsed = [parse_variant(v) for v in variants]
    if equal_time and BASELINE not in [decoder for _, decoder, options in parsed if not options]:
        raise ValueError(f"Equal-time comparison measures against plain {BASELINE}; add --decoder {BASELINE}.")
    data = data_dir(seed, train, DEMO_VAL, test)
    records = read_records(os.path.join(data, "test.json"))
    results, models, processors = {}, {}, []

    def keep(label, outcome):
        results[label], models[label], processor = outcome
        processors.append(processor)
        for other, result in results.items():  # every variant paired with the baseline, whichever came first
            if BASELINE in results and other != BASELINE:
                result["vs_baseline"] = paired_verdict(result, results[BASELINE], other)
        # what is finished is on disk even if a later variant fails
        write_report({"data": data, "seed": seed, "results": results, "partial": True}, out)

    for label, decoder, options in parsed:
        keep(label, train_variant(out, data, records, label, decoder, options, list(overrides), console))
    if equal_time:
        for label, decoder, options in parsed:
            if label == BASELINE:
                continue
            extra = equal_time_overrides(results[label], results[BASELINE])
            keep(f"{label}@{BASELINE}-time",
                 train_variant(out, data, records, f"{label}@{BASELINE}-time", decoder, options,
                               [*overrides, *extra], console))
    # one test question, prompted as in training, for the prefill timing
    first, processor = records[0], processors[-1]
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
    """The comparison table (accuracy with its 95% interval, each family's accuracy, the answer priors as a row),
    then each variant's paired test against the baseline in words."""
    results = report["results"]
    baseline = results.get(BASELINE)
    families = sorted({f for r in results.values() for f in r["families"]})
    header = ["variant", "accuracy [95% CI]", f"vs {BASELINE}", "decoder GFLOPs", f"vs {BASELINE}", "encoder GFLOPs",
              "end-to-end GFLOPs", f"vs {BASELINE}", "prefill ms", "train s/step", "train s", *families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in results.items():
        steps = " / ".join(f"{v:.2f}" for v in r["train_seconds_per_step"].values())
        low, high = r.get("ci95", (float("nan"), float("nan")))
        row = [label, f"{r['accuracy']:.1%} [{100 * low:.1f}, {100 * high:.1f}]",
               f"{r['accuracy'] / baseline['accuracy']:.1%}" if baseline and baseline["accuracy"] else "-",
               f"{r['decoder_gflops']:.2f}",
               f"{r['decoder_gflops'] / baseline['decoder_gflops']:.1%}" if baseline else "-",
               *end_to_end_cells(r, baseline),
               f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "-", steps,
               f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-",
               *(f"{r['families'].get(f, float('nan')):.0%}" for f in families)]
        lines.append("| " + " | ".join(row) + " |")
    priors = next((r["family_priors"] for r in results.values() if "family_priors" in r), None)
    if priors:
        overall = next(r["answer_prior"] for r in results.values() if "answer_prior" in r)
        lines.append("| answer prior | " + f"{overall:.1%} | " + " | " * 9
                     + " | ".join(f"{priors.get(f, float('nan')):.0%}" for f in families) + " |")
    verdicts = [r["vs_baseline"]["verdict"] for r in results.values() if "vs_baseline" in r]
    if verdicts:
        lines += ["", f"Paired against {BASELINE} on the same questions (McNemar's exact test):", ""]
        lines += [f"- {verdict}." for verdict in verdicts]
    return "\n".join(lines) + "\n"


def end_to_end_cells(result: dict, baseline: dict | None) -> list[str]:
    """Encoder GFLOPs, encoder + decoder GFLOPs and that against the baseline's; dashes in reports from before the
    encoder was counted."""
    if "end_to_end_gflops" not in result:
        return ["-", "-", "-"]
    ratio = "-"
    if baseline and "end_to_end_gflops" in baseline:
        ratio = f"{result['end_to_end_gflops'] / baseline['end_to_end_gflops']:.1%}"
    return [f"{result['encoder_gflops']:.2f}", f"{result['end_to_end_gflops']:.2f}", ratio]


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
