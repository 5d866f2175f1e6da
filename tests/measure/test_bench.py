"""`leanvlm bench` on a tiny saved model (the protocol, the report; no timing is asserted)."""

import json
from pathlib import Path

import pytest
import torch
from tiny import build
from typer.testing import CliRunner

from leanvlm.cli import app
from leanvlm.measure.bench import BenchSettings, peak_memory, run_bench, write_report


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench") / "model"
    build("vanilla").save_pretrained(directory)
    return directory


def test_bench_reports_every_metric_for_every_decoder(tiny_model_dir, tmp_path):
    settings = BenchSettings(model=str(tiny_model_dir), text_tokens=8, repeats=2, warmup=1, decode_steps=3,
                             decoders=["vanilla", "himix", "proxyv", "himix+tome_r=2"],
                             options={"proxyv_start_layer": 1, "proxyv_reduce_factor": 2}, dtype="float32")
    seen = []
    report = run_bench(settings, progress=seen.append)
    assert "vanilla: warm-up" in seen and "himix: repeat 2" in seen
    results = report["results"]
    assert set(results) == {"vanilla", "himix", "proxyv", "himix+tome_r=2"}
    stages = ("preprocess_ms", "encoder_ms", "projection_ms", "prefill_ms")
    for name, row in results.items():
        for key in (*stages, "ttft_from_pixels_ms", "decode_ms_per_token", "train_step_ms"):
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"] and row[key]["min"] > 0, (name, key)
        assert row["ttft_from_pixels_ms"]["min"] >= sum(row[key]["min"] for key in stages) * (1 - 1e-9)
        # fp32 keys and values of 3 layers, 2 KV heads x 8 dims, for 16 vision (12 after merging 2 tokens in each of
        # the 2 encoder layers up to hidden state -2) + 8 text tokens
        vision = 12 if "tome" in name else 16
        assert row["kv_cache_bytes"] == 3 * 2 * 2 * 8 * (vision + 8) * 4, name
        assert row["prefill_peak_bytes"] > 0 and row["train_peak_bytes"] > 0
        assert row["tokens_per_s"] == pytest.approx(1e3 / row["decode_ms_per_token"]["median"])
    assert results["himix+tome_r=2"]["options"] == results["himix"]["options"]
    assert results["himix+tome_r=2"]["encoder_flops"] < results["himix"]["encoder_flops"] > 0
    assert report["matmul_flops_per_s"] > 0
    assert results["vanilla"]["prefill_speedup"] == 1.0
    assert results["vanilla"]["prefill_speedup"] == 1.0
    assert results["himix"]["analytic_flops_ratio"] < results["proxyv"]["analytic_flops_ratio"] < 1
    json_path, md_path, png_path = write_report(report, str(tmp_path), "tiny")
    assert json.loads(Path(json_path).read_text())["machine"]["cpu_count"] >= 1
    table = Path(md_path).read_text()
    assert table.count("\n| ") == 10 and "| himix+tome_r=2 |" in table  # two tables: header + 4 variants each
    assert Path(png_path).read_bytes()[:4] == b"\x89PNG"


def test_cpu_peak_memory_follows_torch_allocations():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more while a lives
        del a
        return b + 1  # after a is freed

    peak, method = peak_memory(work, torch.device("cpu"))
    assert peak == pytest.approx(8e6, rel=0.01)
    assert "profiler" in method


def test_bench_cli_writes_the_report(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_model_dir), "--decoder", "vanilla",
                                      "--decoder", "himix", "--text-tokens", "4", "--repeats", "1",
                                      "--decode-steps", "2", "--no-train", "--dtype", "float32",
                                      "--out", str(tmp_path), "--name", "cli"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cli.json").read_text())
    assert set(report["results"]) == {"vanilla", "himix"}
    assert "train_step_ms" not in report["results"]["himix"]


def test_bench_cli_refuses_bad_input_before_building_anything(tiny_model_dir, tmp_path):
    runner = CliRunner()
    for args, hint in [(["--decoder", "sparsevlm"], "sparsevlm"), (["--repeats", "0"], "repeats"),
                       (["--model", str(tmp_path)], "no saved model"), (["--llm", "gpt-9"], "qwen2-0.5b"),
                       (["--device", "tpu"], "device")]:
        result = runner.invoke(app, ["bench", "--out", str(tmp_path), *args])
        text = " ".join(result.output.replace("│", " ").split())  # the error panel wraps lines
        assert result.exit_code != 0 and hint in text, (args, result.output)


def test_plot_labels_write_evenly_spaced_layer_lists_as_ranges():
    from leanvlm.reports import short_label

    frozen = "vanilla+frozen_vision_layers=[" + ",".join(map(str, range(12, 30))) + "]"
    assert short_label(frozen) == "vanilla+frozen_vision_layers=[12..29]"
    assert short_label("himix+himix_layers=[0, 4, 8, 12]") == "himix+himix_layers=[0..12/4]"
    for kept in ("x=[1,2]", "x=[3,1,2]", "x=[1,2,4]", "pool+keep_tokens=16", "x=[5,5,5]"):
        assert short_label(kept) == kept
    long = "proxyv+proxyv_token_reduction=visionzip+keep_tokens=64+proxyv_proxy_init=learned"
    assert short_label(long) == "proxyv+proxyv_token_reduction=visionzip\n+keep_tokens=64\n+proxyv_proxy_init=learned"
