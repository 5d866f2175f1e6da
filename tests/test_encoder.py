"""leanvlm's own encoder forward against Hugging Face's, the layers it skips, and ToMe inside it."""

from __future__ import annotations

import pytest
import torch
from tiny import VISION_KINDS, build, pixels, vision_config
from transformers import AutoModel

from leanvlm.decoders.base import attention_key
from leanvlm.encoder import CLS_FIRST, layer_modules, run_encoder


def encoder(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = vision_config(kind)
    config._attn_implementation = "sdpa"
    return AutoModel.from_config(config).eval()


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_every_hidden_state_equals_hugging_faces(kind):
    model = encoder(kind)
    images = pixels(3)
    with torch.no_grad():
        reference = model(pixel_values=images, output_hidden_states=True).hidden_states
        ours = run_encoder(model, images, [0, 1, 2, -2, -1])
    for index, hidden in ours.items():
        torch.testing.assert_close(hidden, reference[index], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("state", [1, 2, -1])
def test_the_attention_summary_equals_hugging_faces_attention_weights_and_keys(kind, state):
    """Column 0: the CLS row of the layer's attention probabilities (CLIP, DINOv2) or their mean over queries
    (SigLIP), averaged over heads; the rest: the layer's keys averaged over heads. From HF's eager attention."""
    model = encoder(kind)
    model.config._attn_implementation = "eager"
    images = pixels(3)
    layer = layer_modules(model)[state - 1 if state > 0 else state]
    keys = []
    projection = layer.attention.k_proj if kind == "dinov2" else layer.self_attn.k_proj
    projection.register_forward_hook(lambda module, args, out: keys.append(out))
    with torch.no_grad():
        out = model(pixel_values=images, output_hidden_states=True, output_attentions=True)
        ours = run_encoder(model, images, [state], summaries=[state])
    probs = out.attentions[state - 1 if state > 0 else state]  # (n, heads, S, S)
    received = probs[:, :, 0].mean(dim=1) if model.config.model_type in CLS_FIRST else probs.mean(dim=(1, 2))
    heads = model.config.num_attention_heads
    mean_key = keys[0].unflatten(-1, (heads, -1)).mean(dim=2)  # (n, S, D)
    summary = ours[attention_key(state)]
    torch.testing.assert_close(summary[..., 0], received, rtol=0, atol=1e-6)
    torch.testing.assert_close(summary[..., 1:], mean_key, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[state], out.hidden_states[state], rtol=0, atol=1e-5)  # SDPA against eager


@pytest.mark.parametrize(("summaries", "options", "message"), [
    ([0], {}, "embeddings"), ([1], {"merge_per_layer": 2}, "tome_r=0"),
])
def test_attention_summaries_refuse_what_they_cannot_describe(summaries, options, message):
    with pytest.raises(ValueError, match=message):
        run_encoder(encoder("clip"), pixels(1), [1], summaries=summaries, **options)


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize(("states", "layers_run"), [([-2], 2), ([1], 1), ([0], 0), ([1, -1], 3)])
def test_only_the_layers_up_to_the_deepest_state_run(kind, states, layers_run):
    model = encoder(kind)
    calls = []
    for i, layer in enumerate(layer_modules(model)):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda *_, i=i: calls.append(i))
    with torch.no_grad():
        run_encoder(model, pixels(1), states)
    assert sorted(set(calls)) == list(range(layers_run))


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_merging_removes_r_tokens_per_layer_and_keeps_the_cls_token_first(kind):
    model = encoder(kind)
    images = pixels(2)
    with torch.no_grad():
        plain = run_encoder(model, images, [0, -1])
        merged = run_encoder(model, images, [1, -1], merge_per_layer=3)
    tokens = plain[0].shape[1]
    assert merged[1].shape[1] == tokens - 3
    assert merged[-1].shape[1] == tokens - 3 * len(layer_modules(model))
    if kind != "siglip":  # the CLS token never merges, so after one layer it is the plain encoder's CLS token
        with torch.no_grad():
            first = run_encoder(model, images, [1])[1]
        torch.testing.assert_close(merged[1][:, 0], first[:, 0], rtol=0, atol=1e-6)


def test_merging_nothing_is_the_plain_encoder():
    model = encoder("dinov2")
    images = pixels(2)
    with torch.no_grad():
        reference = model(pixel_values=images, output_hidden_states=True).hidden_states
        ours = run_encoder(model, images, [-1], merge_per_layer=0)
    torch.testing.assert_close(ours[-1], reference[-1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("decoder", ["vanilla", "himix"])
def test_a_model_with_token_merging_reads_fewer_vision_tokens(decoder):
    plain, merged = build(decoder, vision="clip"), build(decoder, vision="clip", tome_r=2)
    images = pixels(2)
    with torch.no_grad():
        tokens = plain.encode_images(images).tokens.shape[-2], merged.encode_images(images).tokens.shape[-2]
    layers_run = len(layer_modules(plain.vision_model)) - 1  # up to hidden state -2
    assert tokens == (16, 16 - 2 * layers_run)
    assert merged.encode_images(images).grid is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(decoder="proxyv", tome_r=2), "patch grid"),
        (dict(decoder="himix", tome_r=2, himix_feature_layers=[-2, -1]), "one layer"),
        (dict(decoder="vanilla", tome_r=-1), "tome_r must be"),
    ],
)
def test_token_merging_refuses_what_it_cannot_serve(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


def test_other_encoders_run_their_own_forward_and_refuse_merging():
    from tiny import text_config
    from transformers import Dinov2WithRegistersConfig

    from leanvlm import LeanVLMForConditionalGeneration

    vision = Dinov2WithRegistersConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=2)
    model = LeanVLMForConditionalGeneration.from_parts(language_model=text_config("llama"), vision_model=vision,
                                                       decoder="himix").eval()
    images = pixels(2)
    with torch.no_grad():
        reference = model.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        features = run_encoder(model.vision_model, images, [-2])[-2]
        tokens = model.encode_images(images).tokens
    torch.testing.assert_close(features, reference, rtol=0, atol=0)
    assert tokens.shape[-2] == 16  # CLS and both registers dropped by the "patch" selection
    with pytest.raises(ValueError, match="token merging runs in"):
        LeanVLMForConditionalGeneration.from_parts(language_model=text_config("llama"), vision_model=vision,
                                                   decoder="himix", tome_r=2)
