"""The main job end to end on the real packaged parts, shrunk to a few steps, and the compare report."""

import json

import pytest
import torch
from typer.testing import CliRunner

from leanvlm.cli import app


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_demo_runs_end_to_end_on_the_packaged_parts(tmp_path, monkeypatch):
    from leanvlm import LeanVLMForConditionalGeneration, LeanVLMProcessor

    monkeypatch.setenv("LEANVLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--train", "16", "--val", "4", "--test", "7",
                                      "stages.0.steps=1", "stages.1.steps=1", "eval.max_samples=4"])
    assert result.exit_code == 0, result.output
    assert "new image:" in result.output and "overall" in result.output
    report = json.loads((out / "demo.json").read_text())
    assert report["test"]["samples"] == 7 and len(report["test"]["families"]) == 7  # every family asked
    flops = report["decoder_gflops_per_sample"]
    assert flops["himix"] < 0.25 * flops["vanilla"]
    assert [stage["name"] for stage in report["stages"]] == ["align", "instruct"]
    assert (out / "new-image.png").is_file() and report["new_question"]["prediction"] is not None
    model = LeanVLMForConditionalGeneration.from_pretrained(report["model"])
    assert model.config.decoder == "himix" and model.config.text_config.num_hidden_layers == 30
    assert LeanVLMProcessor.from_pretrained(report["model"]).template == "chat"
    # the same command again reuses the generated data and the converted parts
    assert (tmp_path / "cache" / "shapesvqa").is_dir() and (tmp_path / "cache" / "smollm2-135m").is_dir()


def test_compare_report_and_variants(tmp_path):
    from tiny import build, pixels

    from leanvlm.compare import parse_variant, prefill_seconds, write_report

    assert parse_variant("vanilla+probe_skip_vision_ffn_from_layer=2") == (
        "vanilla+probe_skip_vision_ffn_from_layer=2", "vanilla", {"probe_skip_vision_ffn_from_layer": 2})
    with pytest.raises(ValueError, match="starts with vanilla, himix or proxyv"):
        parse_variant("fastv")
    models = {"vanilla": build("vanilla"), "himix": build("himix")}
    image_id = models["vanilla"].config.image_token_id
    batch = {"input_ids": torch.tensor([[5, image_id, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "pixel_values": pixels(1), "image_crops": torch.tensor([1])}
    seconds = prefill_seconds(models, batch, repeats=2)
    assert set(seconds) == {"vanilla", "himix"} and all(v > 0 for v in seconds.values())
    results = {name: {"decoder": name, "options": {}, "accuracy": acc, "families": {"colour": acc},
                      "decoder_gflops": gflops, "train_seconds_per_step": {"align": 1.0, "instruct": 2.0},
                      "prefill_ms": 1000 * seconds[name]}
               for name, acc, gflops in (("vanilla", 0.8, 60.0), ("himix", 0.6, 9.0))}
    paths = write_report({"results": results}, str(tmp_path))
    table = (tmp_path / "compare.md").read_text()
    assert "| himix | 60.0% | 75.0% | 9.00 | 15.0% |" in table
    assert json.loads((tmp_path / "compare.json").read_text())["results"]["himix"]["accuracy"] == 0.6
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and len(paths) == 3
