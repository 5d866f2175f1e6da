"""`leanvlm loadtest`: a bounded load on loopback whose counts add up (every request answered with exactly its
token budget, repeated images served from the cache), its report files, and a model from the packaged parts behind
the real server answering the official client."""

import json

import pytest
from serving_helpers import chat, expected_answer, png, tiny_parts

from leanvlm.serve import loadtest
from leanvlm.serve.loadtest import LoadSettings


def test_a_small_load_is_answered_in_full_and_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(loadtest, "build_model", lambda settings, decoder: tiny_parts(decoder))
    settings = LoadSettings(decoders=["vanilla", "himix"], requests=6, concurrency=[1, 3], max_tokens=[1, 4],
                            image_size=32, time_limit=120)
    report = loadtest.run(settings)
    rows = report["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # decoders x image modes x lengths x concurrencies
    for row in rows:
        assert row["failed"] == 0 and row["requests"] == 6
        # ignore_eos: every answer has exactly max_tokens tokens
        assert row["output_tokens_per_s"] == pytest.approx(row["max_tokens"] * row["requests_per_s"])
        expected_hits = 0 if row["images"] == "distinct" else 5 / 6  # one image, encoded for the first request
        assert row["image_cache_hit_rate"] == pytest.approx(expected_hits)
        assert 0 <= row["engine_overhead"] < 1 and row["ttft_p95_ms"] >= row["ttft_p50_ms"] > 0
    assert set(report["ratios"]["himix"]) == {"throughput_vs_vanilla_c3_1tok", "throughput_vs_vanilla_c3_4tok",
                                              "scaling_c3_vs_c1_4tok", "cached_ttft_vs_vanilla_uncached_c1",
                                              "engine_overhead_c3_4tok"}
    top = {(r["decoder"], r["max_tokens"]): r["requests_per_s"] for r in rows
           if r["concurrency"] == 3 and r["images"] == "distinct"}
    assert report["ratios"]["himix"]["throughput_vs_vanilla_c3_1tok"] == top["himix", 1] / top["vanilla", 1]
    paths = loadtest.write_report(report, str(tmp_path))
    assert [p.rsplit(".", 1)[1] for p in paths] == ["json", "md", "png"]
    assert json.loads((tmp_path / "loadtest.json").read_text())["rows"] == rows
    assert "| himix | repeated | 4 | 3 |" in (tmp_path / "loadtest.md").read_text()


def test_the_packaged_parts_serve_the_openai_client():
    openai = pytest.importorskip("openai")
    from leanvlm.serve.server import ServerSettings, build_app, running_server

    model, processor = loadtest.build_model(LoadSettings(dtype="float32"), "himix")
    image = png(2, size=64)
    with running_server(build_app("demo-parts", ServerSettings(model_name="tiny"), model, processor)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)
        reply = client.chat.completions.create(**chat(image, max_tokens=4))
    assert reply.choices[0].message.content == expected_answer(model, processor, image, 4)
    assert reply.usage.prompt_tokens > 10
