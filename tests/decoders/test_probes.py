"""Redundancy probes of the vanilla decoder (reference/proxyv.md section 7)."""

import pytest
import torch
from tiny import build, left_padded, pixels, prompt

from leanvlm import ImageContext

PROBES = [
    dict(probe_mask_vision_to_vision_from_layer=3),
    dict(probe_skip_vision_attention_from_layer=3),
    dict(probe_skip_vision_ffn_from_layer=3),
    dict(probe_skip_vision_ffn_from_layer=5, probe_vision_light_mlp=True),
]


@pytest.mark.parametrize("probe", PROBES)
def test_probes_starting_after_the_last_layer_equal_vanilla(probe):
    vanilla = build("vanilla")
    probed = build("vanilla", **probe)
    probed.load_state_dict(vanilla.state_dict(), strict=False)
    ids, mask = left_padded([prompt(vanilla, 5, "<image>", 7), prompt(vanilla, "<image>", 8, 9, 10)])
    with torch.no_grad():
        assert torch.equal(probed(ids, mask, pixel_values=pixels(2)).logits,
                           vanilla(ids, mask, pixel_values=pixels(2)).logits)


def vision_states_after_perturbing_one_token(model, token=3):
    """Final-layer states of the vision tokens, for an image and for the same image with one vision token changed."""
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8)])
    with torch.no_grad():
        context = model.encode_images(pixels(1))
        changed = context.tokens.clone()
        changed[0, token] += 1.0
        runs = [model(ids, image_context=c, output_hidden_states=True)
                for c in (context, ImageContext(context.decoder, changed, grid=context.grid))]
    vision = runs[0].vision_mask[0]
    return [r.hidden_states[-1][0, vision] for r in runs], [r.hidden_states[-1][0, ~vision] for r in runs]


@pytest.mark.parametrize("probe", [dict(probe_mask_vision_to_vision_from_layer=0),
                                   dict(probe_skip_vision_attention_from_layer=0)])
def test_probes_cut_the_vision_to_vision_flow(probe):
    (plain_a, plain_b), _ = vision_states_after_perturbing_one_token(build("vanilla"))
    others = [i for i in range(16) if i != 3]
    assert (plain_a[others] - plain_b[others]).abs().max() > 1e-4  # vanilla: one vision token moves the others
    (a, b), (text_a, text_b) = vision_states_after_perturbing_one_token(build("vanilla", **probe))
    torch.testing.assert_close(a[others], b[others], atol=1e-6, rtol=0)
    assert (text_a[-1] - text_b[-1]).abs().max() > 1e-4  # text still reads every vision token


def test_light_mlp_probe_replaces_attention_and_ffn_of_vision_tokens():
    model = build("vanilla", probe_skip_vision_ffn_from_layer=1, probe_vision_light_mlp=True)
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    with torch.no_grad():
        out = model(ids, pixel_values=pixels(1), output_hidden_states=True)
    vision = out.vision_mask[0]
    expected = out.hidden_states[1][0, vision]  # after layer 0 (a plain layer)
    for light in model.decoder.light_mlps:  # layers 1 and 2
        expected = light(expected)
    torch.testing.assert_close(out.hidden_states[-1][0, vision], expected, atol=1e-6, rtol=0)
    assert set(model.decoder.parameter_groups()) == {"connector", "probe_light_mlps"}
    assert sum(p.numel() for p in model.decoder.light_mlps[0].parameters()) == 32 * 8 + 8 * 8 + 8 * 32 + 32


def test_skip_ffn_probe_changes_vision_states_only_through_attention():
    model = build("vanilla", probe_skip_vision_ffn_from_layer=2)
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    with torch.no_grad():
        out = model(ids, pixel_values=pixels(1), output_hidden_states=True)
        layer = model.language_model.model.layers[2]
        h = out.hidden_states[2]
        ffn = layer.mlp(layer.post_attention_layernorm(out.hidden_states[3]))
    vision = out.vision_mask[0]
    # the FFN would have moved the vision states; with the probe the last layer adds attention only
    assert ffn[0, vision].abs().max() > 1e-4
    reference = build("vanilla")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain = reference(ids, pixel_values=pixels(1), output_hidden_states=True)
    torch.testing.assert_close(plain.hidden_states[2], h)  # identical before the probed layer
    assert (plain.hidden_states[3][0, vision] - out.hidden_states[3][0, vision]).abs().max() > 1e-4


def test_probes_belong_to_vanilla():
    with pytest.raises(ValueError, match="a vanilla option"):
        build("himix", probe_mask_vision_to_vision_from_layer=1)
    with pytest.raises(ValueError, match="set that layer too"):
        build("vanilla", probe_vision_light_mlp=True)


def test_vision_to_vision_mask_hides_the_diagonal_unless_the_row_would_be_empty():
    from leanvlm.decoders.attention import CAUSAL
    from leanvlm.decoders.vanilla import VanillaDecoder

    vision = torch.tensor([[False, True, True, False], [True, True, False, False]])
    mask = VanillaDecoder._mask_vision_to_vision(CAUSAL, vision)[:, 0]
    assert mask[0].tolist() == [
        [True, False, False, False],
        [True, False, False, False],  # a vision token sees the prefix text, not itself
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert mask[1].tolist() == [
        [True, False, False, False],  # nothing else to see: keeps its own key
        [False, True, False, False],
        [True, True, True, False],
        [True, True, True, True],
    ]
