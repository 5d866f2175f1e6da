import json

from typer.testing import CliRunner

import leanvlm
from leanvlm.cli import app


def test_info_lists_version_decoders_and_families():
    for args in ([], ["info"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert f"leanvlm {leanvlm.__version__}" in result.output
        assert "decoders: vanilla, himix, proxyv" in result.output
        assert "qwen3" in result.output


def message(result) -> str:
    """A usage error's text, unwrapped from its panel."""
    assert result.exit_code == 2, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_user_errors_turn_fixable_errors_into_usage_errors_with_the_hint():
    import pytest
    import typer

    from leanvlm.cli import user_errors

    toy = typer.Typer()

    @toy.command()
    @user_errors("see {out}/log.txt")
    def fail(kind: str, out: str = typer.Option("here")) -> None:
        raise {"value": ValueError("the value is wrong"), "key": KeyError("no such key"),
               "bug": RuntimeError("a bug")}[kind]

    assert "Invalid value: the value is wrong (see there/log.txt)" in message(
        CliRunner().invoke(toy, ["value", "--out", "there"]))
    assert "Invalid value: no such key (see here/log.txt)" in message(CliRunner().invoke(toy, ["key"]))
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: the traceback stays
        CliRunner().invoke(toy, ["bug"], catch_exceptions=False)


def test_a_bad_input_names_the_problem_and_writes_nothing(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "gpt2", "hidden_size": 32}')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "encode", "--data", str(tmp_path / "missing.json"), "--vision",
                                      "dinov2-s14", "--out", str(out)])
    assert "missing.json" in message(result) and "does not exist" in message(result)
    result = CliRunner().invoke(app, ["bench", "--llm", str(config), "--out", str(out)])
    assert "model_type 'gpt2'" in message(result) and "qwen2" in message(result)
    config.write_text('{"model_type": "qwen2", "hidden_size": 32}')
    result = CliRunner().invoke(app, ["bench", "--llm", str(config), "--out", str(out)])
    assert "a config.json needs hidden_size, num_hidden_layers" in message(result)
    assert not out.exists()


def test_choices_come_from_the_registries(tmp_path):
    from leanvlm.cli import AUTO_DTYPES
    from leanvlm.config import VISION_FEATURE_SELECTS
    from leanvlm.measure.flops import CONVENTIONS

    out = ["--out", str(tmp_path / "out")]
    flops = ["flops", "--llm", "qwen2-0.5b", "--vision", "clip-l-336", "--text-tokens", "8"]
    encode = ["data", "encode", "--data", "a.json", "--vision", "dinov2-s14", *out]
    for command, choices in [(["demo", *out, "--decoder", "no_such_policy"], leanvlm.DECODERS),
                             ([*flops, "--decoder", "no_such_policy"], leanvlm.DECODERS),
                             ([*flops, "--convention", "no_such_policy"], CONVENTIONS),
                             (["bench", *out, "--dtype", "no_such_policy"], AUTO_DTYPES),
                             ([*encode, "--select", "no_such_policy"], VISION_FEATURE_SELECTS)]:
        text = message(CliRunner().invoke(app, command))
        assert f"'no_such_policy': choose one of {', '.join(choices)}" in text, command
    for command in (["bench", *out], ["compare", *out]):  # decoders with options: the variant parser's message
        text = message(CliRunner().invoke(app, [*command, "--decoder", "no_such_policy+tome_r=2"]))
        assert "'no_such_policy+tome_r=2': a variant starts with" in text
        assert all(name in text for name in leanvlm.DECODERS)
    assert not (tmp_path / "out").exists()


def test_report_writer_writes_json_markdown_and_png(tmp_path):
    import json

    from leanvlm.reports import figure, write_report

    def plot(report):
        canvas, (axis,) = figure(1, (4, 3))
        axis.plot(report["x"], report["y"])
        return canvas

    report = {"x": [1, 2, 3], "y": [0.5, 0.25, 0.125], "title": "tiny"}
    paths = write_report(report, str(tmp_path / "new"), "tiny", markdown="| a |\n|---|\n", plot=plot)
    assert paths == [str(tmp_path / "new" / f"tiny.{ext}") for ext in ("json", "md", "png")]
    assert json.loads((tmp_path / "new" / "tiny.json").read_text()) == report
    assert (tmp_path / "new" / "tiny.md").read_text() == "| a |\n|---|\n"
    assert (tmp_path / "new" / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_report(report, str(tmp_path / "plain"), "only") == [str(tmp_path / "plain" / "only.json")]


def test_bench_builds_the_llm_of_a_config_json(tmp_path):
    import json

    from leanvlm.measure.bench import llm_family

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                                  "vocab_size": 300}))
    assert llm_family(str(config)) == "qwen2" and llm_family("qwen2-0.5b") == "qwen2"
    assert llm_family("vicuna-7b") == "llama"
    result = CliRunner().invoke(app, ["bench", "--llm", str(config), "--vision", "dinov2-s14-224", "--decoder",
                                      "vanilla", "--decoder", "himix", "--text-tokens", "4", "--repeats", "1",
                                      "--warmup", "0", "--decode-steps", "1", "--no-train", "--dtype", "float32",
                                      "--out", str(tmp_path / "out"), "--name", "cfg"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert set(report["results"]) == {"vanilla", "himix"} and report["llm_layers"] == 2
    # fp32 keys and values of 2 layers, 2 KV heads x 8 dims, for 256 DINOv2 patches + 4 text tokens
    assert report["results"]["vanilla"]["kv_cache_bytes"] == 2 * 2 * 2 * 8 * (256 + 4) * 4


def test_any_decoder_option_reaches_flops():
    base = ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384", "--text-tokens", "64", "--json"]
    plain = json.loads(CliRunner().invoke(app, base).output)["total_flops"]
    probed = CliRunner().invoke(app, [*base, "--option", "probe_skip_vision_ffn_from_layer=12"])
    assert probed.exit_code == 0, probed.output
    assert json.loads(probed.output)["total_flops"] < plain  # vanilla's FFN skips the vision rows from layer 12
    bad = CliRunner().invoke(app, [*base, "--option", "no_such_option=1"])
    assert bad.exit_code == 2 and "proxyv_start_layer" in message(bad)
