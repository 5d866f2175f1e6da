"""The analytic cost model reproduces both papers and agrees with torch's FLOP counter."""

import json

import pytest
import torch
from tiny import build, pixels, prompt
from typer.testing import CliRunner

from leanvlm.cli import app
from leanvlm.decoders import DECODERS
from leanvlm.measure.flops import Convention, LLMShape, VisionShape, decode_flops, decoder_flops, measured_flops


# HiMix's table (reference/himix.md section 3): N = 728 SigLIP tokens, M = 64 text tokens, lm_head on all positions.
@pytest.mark.parametrize("llm,vanilla,himix", [
    ("qwen2-0.5b", 837, 78), ("tinyllama-1.1b", 1750, 161), ("vicuna-7b", 10800, 1310),
    ("llama-3.2-1b", 2040, 192), ("llama-3.2-3b", 5310, 525),
])
def test_himix_paper_gflops(llm, vanilla, himix):
    kwargs = dict(vision_tokens=728, convention="himix-paper")
    ours_vanilla = decoder_flops(llm, "siglip-so400m-384", 64, "vanilla", **kwargs)["total_flops"] / 1e9
    ours_himix = decoder_flops(llm, "siglip-so400m-384", 64, "himix", **kwargs)["total_flops"] / 1e9
    assert ours_vanilla == pytest.approx(vanilla, rel=0.005)
    assert ours_himix == pytest.approx(himix, rel=0.005)


# ProxyV's reductions (reference/proxyv.md section 5.2): 5 crops = 2880 CLIP tokens, 50 text + 5 newlines, no lm_head.
@pytest.mark.parametrize("llm,start,reduction", [
    ("vicuna-7b", 12, 46), ("vicuna-7b", 16, 36), ("qwen2-7b", 16, 37), ("qwen2-7b", 20, 25),
])
def test_proxyv_paper_reductions(llm, start, reduction):
    kwargs = dict(crops=5, convention="proxyv-paper")
    vanilla = decoder_flops(llm, "clip-l-336", 55, "vanilla", **kwargs)["total_flops"]
    proxyv = decoder_flops(llm, "clip-l-336", 55, "proxyv", proxyv_start_layer=start, **kwargs)["total_flops"]
    assert 100 * (1 - proxyv / vanilla) == pytest.approx(reduction, abs=1.5)


@pytest.mark.parametrize("start,reduction", [(0, 80), (12, 50), (16, 40)])
def test_light_mlp_probe_matches_proxyv_table_2(start, reduction):
    kwargs = dict(crops=5, convention="proxyv-paper")
    vanilla = decoder_flops("vicuna-7b", "clip-l-336", 55, "vanilla", **kwargs)["total_flops"]
    probe = decoder_flops("vicuna-7b", "clip-l-336", 55, "vanilla", probe_skip_vision_ffn_from_layer=start,
                          probe_vision_light_mlp=True, **kwargs)["total_flops"]
    assert 100 * (1 - probe / vanilla) == pytest.approx(reduction, abs=1.5)


CASES = [
    ("vanilla", {}),
    ("himix", {}),
    ("himix", {"max_crops": 3}),
    ("proxyv", {"proxyv_start_layer": 1, "proxyv_reduce_factor": 2}),
    ("proxyv", {"proxyv_start_layer": 0, "proxyv_reduce_factor": 2, "proxyv_proxy_init": "learned", "max_crops": 3}),
    ("vanilla", {"max_crops": 3}),
    # proxies of the pooled 3x3 grid (one), not of the encoder's 4x4 (four); learned ones of the 4x4, over 5 tokens
    ("proxyv", {"proxyv_token_reduction": "pool", "keep_tokens": 9, "proxyv_reduce_factor": 2, "max_crops": 3}),
    ("proxyv", {"proxyv_token_reduction": "divprune", "keep_tokens": 5, "proxyv_reduce_factor": 2,
                "proxyv_proxy_init": "learned"}),
]


@pytest.mark.parametrize("decoder,options", CASES)
def test_measured_flops_agree_with_the_analytic_count(decoder, options):
    model = build(decoder, "qwen2", **options)
    crops = options.get("max_crops", 1)
    ids = torch.tensor([prompt(model, "<image>", *range(5, 25))])
    measured = measured_flops(model, ids, pixel_values=pixels(crops), image_crops=[crops])
    newlines = crops if model.config.uses_image_newline else 0
    decoder_options = {k: v for k, v in options.items() if k != "max_crops"}
    analytic = decoder_flops(LLMShape.from_config(model.config), VisionShape(16, 24), 20 + newlines, decoder,
                             crops=crops, convention=Convention(attention="full", lm_head="last"), **decoder_options)
    assert measured == analytic["total_flops"]


def test_causal_convention_and_decode_cost():
    full = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, convention="himix-paper")
    causal = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, convention="prefill")
    assert causal["breakdown"]["attention"] == pytest.approx(full["breakdown"]["attention"] / 2, rel=0.01)
    assert causal["breakdown"]["lm_head"] == 2 * 896 * 151936
    assert set(causal["breakdown"]) >= {"qo", "kv", "attention", "ffn", "connector", "lm_head"}
    step = decode_flops("qwen2-0.5b", 793)
    assert step["breakdown"]["attention"] == 2 * 24 * 2 * 794 * 896


def test_flops_cli_prints_one_json_object(tmp_path):
    result = CliRunner().invoke(app, ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384",
                                      "--text-tokens", "64", "--vision-tokens", "728", "--decoder", "himix",
                                      "--convention", "himix-paper", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total_flops"] == pytest.approx(78e9, rel=0.005)
    assert data["breakdown"]["vision_kv"] > 0
    assert data["ratio_to_vanilla"] == pytest.approx(78 / 837, rel=0.01)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                                  "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936}))
    table = CliRunner().invoke(app, ["flops", "--llm", str(config), "--vision", "siglip-so400m-384",
                                     "--text-tokens", "64"])
    assert table.exit_code == 0 and "himix" in table.output and "proxyv" in table.output
    bad = CliRunner().invoke(app, ["flops", "--llm", "gpt-9", "--vision", "clip-l-336", "--text-tokens", "8"])
    assert bad.exit_code != 0 and "qwen2-0.5b" in bad.output


@pytest.mark.parametrize("decoder,options", [
    ("random", {"keep_tokens": 64}), ("pool", {"keep_tokens": 70}), ("divprune", {"keep_ratio": 64 / 576}),
])
def test_a_token_reduction_runs_the_layers_on_the_kept_tokens_and_the_connector_on_all(decoder, options):
    """576 CLIP tokens cut to 64 (pool: 70 pools to 8 x 8): vanilla's layers at 64 vision tokens, vanilla's connector
    at 576, and DivPrune's similarities of every token pair; a budget of every token is vanilla exactly."""
    full = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "vanilla")
    kept = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "vanilla", vision_tokens=64)
    similarity = {"similarity": 2 * 576 * 576 * 896} if decoder == "divprune" else {}
    expected = {**kept["breakdown"], "connector": full["breakdown"]["connector"], **similarity}
    assert decoder_flops("qwen2-0.5b", "clip-l-336", 64, decoder, **options)["breakdown"] == expected
    whole = decoder_flops("qwen2-0.5b", "clip-l-336", 64, decoder, keep_tokens=576)
    assert whole["breakdown"] == full["breakdown"]


def test_proxyv_over_a_token_reduction_counts_its_layers_on_the_kept_tokens():
    """576 CLIP tokens pooled to 8 x 8: ProxyV's layers and proxies (2 x 2 of the pooled grid) as for 64 tokens, the
    connector on all 576; DivPrune adds its similarities and learned proxies stay 6 x 6, as many as for 576 tokens."""
    kwargs = dict(proxyv_start_layer=12, crops=2)
    pooled = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", proxyv_token_reduction="pool", keep_tokens=64,
                           **kwargs)["breakdown"]
    full = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", **kwargs)["breakdown"]
    small = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", vision_tokens=128, **kwargs)["breakdown"]
    assert pooled == {**small, "connector": full["connector"]}
    learned = dict(proxyv_proxy_init="learned", **kwargs)
    pruned = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", proxyv_token_reduction="divprune",
                           keep_tokens=64, **learned)["breakdown"]
    assert pruned["similarity"] == 2 * 2 * 576 * 576 * 896
    proxies, kept, inner = 2 * 36, 2 * 64, 448  # d' = 896 / 2
    assert pruned["proxy_init"] == 2 * (kept * 896 * inner + proxies * 64 * (inner + 896))
    assert pruned["connector"] == full["connector"] and pruned["ffn"] < full["ffn"]


def test_the_flops_cli_prints_a_row_for_proxyv_over_a_token_reduction():
    variant = "proxyv+proxyv_token_reduction=pool+keep_tokens=64"
    base = ["flops", "--llm", "qwen2-0.5b", "--vision", "clip-l-336", "--text-tokens", "64", "--variant", variant]
    table = CliRunner().invoke(app, base)
    assert table.exit_code == 0, table.output
    assert any(variant in line for line in table.output.splitlines() if line.startswith("│"))
    result = CliRunner().invoke(app, [*base, "--decoder", variant, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = decoder_flops("qwen2-0.5b", "clip-l-336", 64, "proxyv", proxyv_token_reduction="pool", keep_tokens=64)
    assert data["total_flops"] == expected["total_flops"] < data["all_decoders"]["proxyv"]


def test_the_flops_table_lists_every_decoder():
    result = CliRunner().invoke(app, ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384",
                                      "--text-tokens", "64", "--option", "keep_tokens=100"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[1] for line in result.output.splitlines() if line.startswith("│")]
    assert set(DECODERS) <= set(rows)


def test_variants_are_extra_rows_with_their_own_options():
    """`--variant` adds a row per variant, counted with its options on top, next to the plain decoders; its JSON
    compares it with plain vanilla; a row that is not in the report is named."""
    base = ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384", "--text-tokens", "64"]
    sparse, frozen = "himix+himix_layers=[0,8,16]", "vanilla+frozen_vision_layers=[8,9,10,11]"
    result = CliRunner().invoke(app, [*base, "--variant", sparse, "--variant", frozen, "--decoder", sparse, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    expected = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, "himix", himix_layers=[0, 8, 16])
    dense = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, "himix")
    assert data["total_flops"] == expected["total_flops"] < dense["total_flops"]
    assert data["all_decoders"]["himix"] == dense["total_flops"]  # the plain row keeps the defaults
    vanilla = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, "vanilla")["total_flops"]
    assert data["ratio_to_vanilla"] == pytest.approx(expected["total_flops"] / vanilla)
    frozen_total = decoder_flops("qwen2-0.5b", "siglip-so400m-384", 64, "vanilla",
                                 frozen_vision_layers=[8, 9, 10, 11])["total_flops"]
    assert data["all_decoders"][frozen] == frozen_total < vanilla
    unread = CliRunner().invoke(app, [*base, "--variant", "proxyv+keep_tokens=16"])  # no reduction to spend it
    assert unread.exit_code != 0 and "keep_tokens" in unread.output and "proxyv_token_reduction" in unread.output
    missing = CliRunner().invoke(app, [*base, "--decoder", sparse, "--json"])
    assert missing.exit_code == 2 and "(or a --variant row)" in " ".join(missing.output.replace("│", " ").split())
