"""The main job end to end on the real packaged parts, shrunk to a few steps, and the compare report."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from leanvlm.cli import app


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_demo_runs_end_to_end_on_the_packaged_parts(tmp_path):
    from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor
    from leanvlm.hub import cache_dir
    from leanvlm.precision import native_bf16

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--train", "16", "--val", "4", "--test", "7",
                                      "stages.0.steps=2", "eval.max_samples=4"])
    assert result.exit_code == 0, result.output
    assert "new image:" in result.output and "overall" in result.output
    report = json.loads((out / "demo.json").read_text())
    assert report["test"]["samples"] == 7 and len(report["test"]["families"]) == 7  # every family asked
    flops = report["decoder_gflops_per_sample"]
    assert flops["himix"] < 0.25 * flops["vanilla"]
    # the encoder as the demo runs it: DINOv2-S at 224 pixels up to hidden state 8
    from leanvlm.measure.flops import encoder_flops

    expected = encoder_flops("dinov2-s14-224", layers=8)["total_flops"] / 1e9
    assert report["encoder_gflops_per_sample"] == pytest.approx(expected, abs=1e-3)
    assert "+ encoder" in result.output
    assert [stage["name"] for stage in report["stages"]] == ["train"]
    assert report["precision"] == ("bf16" if native_bf16() else "fp32") and f"computed in {report['precision']}" in \
        result.output
    assert (out / "new-image.png").is_file() and report["new_question"]["prediction"] is not None
    model = LeanVLMForConditionalGeneration.from_pretrained(report["model"])
    assert model.config.decoder == "himix" and model.config.text_config.num_hidden_layers == 30
    assert LeanVLMProcessor.from_pretrained(report["model"]).template == "plain"
    # the same command again reuses the generated data and the converted parts
    cache = Path(cache_dir())
    assert (cache / "shapesvqa" / "seed0-train16-val4-test7").is_dir() and (cache / "smollm2-135m").is_dir()


def test_compare_report_and_variants(tmp_path):
    from tiny import build, pixels

    from leanvlm.compare import equal_time_overrides, paired_verdict, prefill_seconds, write_report
    from leanvlm.config import parse_variant
    from leanvlm.stats import wilson_interval

    assert parse_variant("vanilla+probe_skip_vision_ffn_from_layer=2") == (
        "vanilla+probe_skip_vision_ffn_from_layer=2", "vanilla", {"probe_skip_vision_ffn_from_layer": 2})
    with pytest.raises(ValueError, match="'no_such_policy': a variant starts with vanilla, himix, proxyv"):
        parse_variant("no_such_policy")
    models = {"vanilla": build("vanilla"), "himix": build("himix")}
    image_id = models["vanilla"].config.image_token_id
    batch = {"input_ids": torch.tensor([[5, image_id, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "pixel_values": pixels(1), "image_crops": torch.tensor([1])}
    seconds = prefill_seconds(models, batch, repeats=2)
    assert set(seconds) == {"vanilla", "himix"} and all(v > 0 for v in seconds.values())
    correct = {"vanilla": "1" * 80 + "0" * 20, "himix": "1" * 60 + "0" * 40}  # himix wrong on 20 of vanilla's
    results = {name: {"decoder": name, "options": {}, "accuracy": acc, "ci95": list(wilson_interval(n, 100)),
                      "answer_prior": 0.25, "families": {"colour": acc}, "family_priors": {"colour": 1 / 6},
                      "correct": correct[name], "decoder_gflops": gflops, "train_seconds": 100 * gflops,
                      "train_steps": {"align": 5, "instruct": 10},
                      "train_seconds_per_step": {"align": 1.0, "instruct": 2.0}, "prefill_ms": 1000 * seconds[name]}
               for name, acc, n, gflops in (("vanilla", 0.8, 80, 60.0), ("himix", 0.6, 60, 9.0))}
    results["himix"]["vs_baseline"] = paired_verdict(results["himix"], results["vanilla"], "himix")
    assert results["himix"]["vs_baseline"]["only_second"] == 20 and results["himix"]["vs_baseline"]["significant"]
    assert equal_time_overrides(results["himix"], results["vanilla"]) == ["stages.0.steps=33", "stages.1.steps=67"]
    for result in results.values():  # the same encoder under both: 600 GFLOPs
        result.update(encoder_gflops=600.0, end_to_end_gflops=result["decoder_gflops"] + 600.0)
    paths = write_report({"results": results}, str(tmp_path))
    table = (tmp_path / "compare.md").read_text()
    assert "| himix | 60.0% [50.2, 69.1] | 75.0% | 9.00 | 15.0% | 600.00 | 609.00 | 92.3% |" in table
    assert "| answer prior | 25.0% |" in table and "17% |" in table
    assert "himix is 20.0 points below vanilla: significant (p = 1.9e-06)" in table
    assert json.loads((tmp_path / "compare.json").read_text())["results"]["himix"]["accuracy"] == 0.6
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and len(paths) == 3


def test_compare_reuses_only_a_finished_run_of_the_same_recipe(tmp_path):
    from leanvlm.compare import finished_run
    from leanvlm.demo import demo_recipe
    from leanvlm.train.recipe import recipe_to_dict

    recipe = demo_recipe(str(tmp_path / "data"), str(tmp_path / "run"), "himix")
    assert finished_run(recipe) is None  # nothing there
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "recipe.json").write_text(json.dumps(recipe_to_dict(recipe)))
    summary = {"model": str(tmp_path / "run" / "model"), "stages": []}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    assert finished_run(recipe) is None  # no saved model in it
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    assert finished_run(recipe) == summary
    other = demo_recipe(str(tmp_path / "data"), str(tmp_path / "run"), "himix", ["stages.0.steps=7"])
    assert finished_run(other) is None  # a different recipe in the same place is trained again


def test_compare_scores_a_reused_run_once_per_test_set(tmp_path):
    from leanvlm.compare import scores_on_test

    calls = []

    def evaluate_now():
        calls.append(1)
        return {"accuracy": len(calls) / 10}

    records = [{"id": "q0", "conversations": []}]
    assert scores_on_test(str(tmp_path), records, False, evaluate_now) == {"accuracy": 0.1}  # a new run: evaluated
    assert scores_on_test(str(tmp_path), records, True, evaluate_now) == {"accuracy": 0.1}  # reused: read back
    assert len(calls) == 1
    other = [{"id": "q1", "conversations": []}]
    assert scores_on_test(str(tmp_path), other, True, evaluate_now) == {"accuracy": 0.2}  # other questions
    assert scores_on_test(str(tmp_path), other, False, evaluate_now) == {"accuracy": 0.3}  # trained again


def test_demo_recipe_keeps_its_policy_options_for_its_own_decoder_only(tmp_path):
    from leanvlm.config import LeanVLMConfig
    from leanvlm.demo import demo_recipe

    own = demo_recipe(str(tmp_path), str(tmp_path / "run"), None)
    assert own.model.decoder == "himix" and own.model.options["himix_zero_init_values"] is True
    for recipe in (demo_recipe(str(tmp_path), str(tmp_path / "run"), "vanilla"),
                   demo_recipe(str(tmp_path), str(tmp_path / "run"), None, ["model.decoder=vanilla"])):
        assert recipe.model.decoder == "vanilla" and "himix_zero_init_values" not in recipe.model.options
        assert recipe.model.options["vision_feature_layer"] == 8
        LeanVLMConfig(decoder="vanilla", **recipe.model.options)  # a valid vanilla configuration


def test_a_compare_variant_with_token_merging_reaches_the_model_config(tmp_path):
    from leanvlm.config import LeanVLMConfig, parse_variant
    from leanvlm.demo import demo_recipe

    _, decoder, options = parse_variant("himix+tome_r=16")
    recipe = demo_recipe(str(tmp_path), str(tmp_path / "run"), decoder, **options)
    assert recipe.model.options["tome_r"] == 16 and recipe.model.options["vision_feature_layer"] == 8
    assert LeanVLMConfig(decoder=decoder, **recipe.model.options).tome_r == 16
