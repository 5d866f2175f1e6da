"""Frozen vision layers of the vanilla decoder: in a chosen set of layers the vision rows skip their query, attention
update and FFN (and pass through unchanged) but still give keys/values to the text; the skipped work is not run."""

import json

import pytest
import torch
from reference import vanilla_layout_start
from tiny import build, left_padded, pixels, prompt
from typer.testing import CliRunner

from leanvlm.cli import app
from leanvlm.config import parse_variant
from leanvlm.measure.flops import Convention, LLMShape, VisionShape, decoder_flops, measured_flops


def batch(model):
    """Left-padded prompts of different lengths: an image in the middle of the text, a text-only prompt, and one
    with two images."""
    rows = [
        prompt(model, 5, 6, "<image>", 7, 8),
        prompt(model, 9, 10, 11, 12, "<image>", 13, 14, 15, 16, 17, 18),
        prompt(model, 19, 20, 21),
        prompt(model, 22, "<image>", 23, "<image>", 24),
    ]
    ids, mask = left_padded(rows)
    return ids, mask, pixels(4, seed=1)


def reference_states(model, out, frozen: set[int]) -> list[torch.Tensor]:
    """Every layer's output by a plain forward through the Hugging Face layers' own attention and MLP modules, where
    the vision rows' attention and FFN updates are computed and zeroed in the `frozen` layers."""
    text_model = model.language_model.model
    hidden, valid, vision, (cos, sin), causal = vanilla_layout_start(model, out)
    length = hidden.shape[1]
    allowed = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)  # (B, T, T); padding sees itself
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    states = []
    for index, layer in enumerate(text_model.layers):
        keep = (~vision if index in frozen else torch.ones_like(vision))[..., None].float()
        update = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=(cos, sin), attention_mask=mask)[0]
        hidden = hidden + keep * update
        hidden = hidden + keep * layer.mlp(layer.post_attention_layernorm(hidden))
        states.append(hidden)
    return states


@pytest.mark.parametrize("frozen", [[1], [0, 2], [2, 0, 1]])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_frozen_layers_equal_a_forward_that_zeroes_the_vision_updates(family, frozen):
    model = build("vanilla", family, frozen_vision_layers=frozen)
    ids, mask, images = batch(model)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images, output_hidden_states=True)
        reference = reference_states(model, out, set(frozen))
        plain = reference_states(model, out, set())[-1]  # vanilla
    valid = out.attention_mask.bool()
    for layer, (state, expected) in enumerate(zip(out.hidden_states[1:], reference, strict=True)):
        torch.testing.assert_close(state[valid], expected[valid], atol=1e-5, rtol=0, msg=f"layer {layer}")
    assert (plain[valid] - reference[-1][valid]).abs().max() > 1e-3  # the frozen layers changed the result


def test_gradients_equal_the_reference():
    model = build("vanilla", "qwen2", frozen_vision_layers=[0, 2]).train()
    ids, mask, images = batch(model)
    weights = torch.randn(32)

    def gradients(final_state) -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(ids, mask, pixel_values=images, output_hidden_states=True)
        valid = out.attention_mask.bool()
        (final_state(out)[valid] @ weights).square().sum().backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    skipped = gradients(lambda out: out.hidden_states[-1])
    reference = gradients(lambda out: reference_states(model, out, {0, 2})[-1])
    assert set(skipped) == set(reference) and "decoder.connector.linear_1.weight" in skipped
    for name, grad in skipped.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_prompts_of_only_an_image_leave_no_text_rows_to_compute():
    model = build("vanilla", frozen_vision_layers=[0, 1, 2])
    ids = torch.tensor([prompt(model, "<image>")] * 2)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels(2), output_hidden_states=True)
    for state in out.hidden_states[1:]:  # nothing but vision rows, frozen in every layer
        assert torch.equal(state, out.hidden_states[0])


@pytest.mark.parametrize("frozen", [[1], [0, 2]])
def test_only_the_layers_in_the_set_freeze_the_vision_rows(frozen):
    model = build("vanilla", frozen_vision_layers=frozen)
    vanilla = build("vanilla")
    vanilla.load_state_dict(model.state_dict())
    ids, mask, images = batch(model)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images, output_hidden_states=True)
        plain = vanilla(ids, mask, pixel_values=images, output_hidden_states=True)
    valid = out.attention_mask.bool()
    vision, text = out.vision_mask, valid & ~out.vision_mask
    states = out.hidden_states
    for layer in range(len(states) - 1):
        if layer < min(frozen):  # before the first frozen layer: vanilla
            torch.testing.assert_close(states[layer + 1][valid], plain.hidden_states[layer + 1][valid])
        if layer in frozen:  # vision rows pass through; text rows take their updates
            assert torch.equal(states[layer + 1][vision], states[layer][vision]), layer
        else:
            assert bool(((states[layer + 1][vision] - states[layer][vision]).abs().amax(dim=-1) > 1e-6).all()), layer
        assert (states[layer + 1][text] - states[layer][text]).abs().max() > 1e-3, layer
    # in the first frozen layer the text reads the same keys/values as in vanilla
    first = min(frozen) + 1
    torch.testing.assert_close(states[first][text], plain.hidden_states[first][text], atol=1e-5, rtol=0)


def test_counted_flops_fall_by_exactly_the_skipped_work():
    frozen = [0, 2]
    vanilla, model = build("vanilla", "qwen2"), build("vanilla", "qwen2", frozen_vision_layers=frozen)
    text = 20
    ids = torch.tensor([prompt(model, "<image>", *range(5, 5 + text))])
    measured = [measured_flops(m, ids, pixel_values=pixels(1)) for m in (vanilla, model)]
    llm = LLMShape.from_config(model.config)
    n, t = 16, 16 + text
    # per frozen layer, the n vision rows' q and o projections, their attention rows over all t keys (QK^T and AV:
    # the counter sees the whole rectangle) and their FFN; FLOPs = 2 x MACs
    per_layer = n * 2 * llm.hidden * llm.q_width + 2 * n * t * llm.q_width + n * 3 * llm.hidden * llm.ffn
    assert measured[0] - measured[1] == 2 * len(frozen) * per_layer
    convention = Convention(attention="full", lm_head="last")
    analytic = [decoder_flops(llm, VisionShape(n, 24), text, "vanilla", convention=convention, **options)
                for options in ({}, {"frozen_vision_layers": frozen})]
    assert [a["total_flops"] for a in analytic] == measured
    assert analytic[0]["breakdown"]["kv"] == analytic[1]["breakdown"]["kv"]  # keys/values from every row


def test_flops_cli_and_variants_take_the_option():
    assert parse_variant("vanilla+frozen_vision_layers=[2,3]") == (
        "vanilla+frozen_vision_layers=[2,3]", "vanilla", {"frozen_vision_layers": [2, 3]})
    args = ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384", "--text-tokens", "64", "--json"]
    totals = []
    for extra in ([], ["--option", "frozen_vision_layers=[2,3]"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        totals.append(json.loads(result.output)["total_flops"])
    n, d, ffn = 729, 896, 4864  # SigLIP-so400m's 27 x 27 tokens; qwen2-0.5b (q width = d)
    # causal pairs: the image comes first, so the vision rows are the first n queries
    per_layer = n * 2 * d * d + 2 * (n * (n + 1) // 2) * d + n * 3 * d * ffn
    assert totals[0] - totals[1] == 2 * 2 * per_layer


def test_cached_greedy_generation_equals_recomputation():
    model = build("vanilla", "qwen3", frozen_vision_layers=[1, 2])
    ids, mask, images = batch(model)
    generated = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=[])
    tokens, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(6):  # no cache: every step recomputes the whole sequence, frozen layers included
            logits = model(tokens, full_mask, pixel_values=images).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(dim=-1, keepdim=True)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    assert generated.tolist() == tokens.tolist()


@pytest.mark.parametrize("value,message", [
    ([3], r"frozen_vision_layers must be a non-empty list of distinct decoder layer indices in 0\.\.2"),
    ([-1], r"frozen_vision_layers must be .* in 0\.\.2, got \[-1\]"),
    (1, r"frozen_vision_layers must be a non-empty list"),
    ([True], r"frozen_vision_layers must be a non-empty list"),
    ([1, 2, 1], r"frozen_vision_layers must be a non-empty list of distinct"),
    ([], r"frozen_vision_layers must be a non-empty list"),
])
def test_bad_layer_sets_are_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        build("vanilla", frozen_vision_layers=value)


def test_other_decoders_refuse_the_option():
    with pytest.raises(ValueError, match=r"frozen_vision_layers: a vanilla option.*decoder is 'himix'"):
        build("himix", frozen_vision_layers=[1])
