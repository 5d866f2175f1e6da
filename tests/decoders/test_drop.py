"""FastV and PyramidDrop against an explicit reference: a plain forward through the Hugging Face layers' own modules
that ranks each crop's vision tokens by the last token's attention (written out: q, k, RoPE, softmax, mean over
heads) in the layer before each stage, keeps the best ones, and from the stage on hides the others' keys from every
query. The policies must keep the same tokens and give the same logits, while running the dropped rows nowhere."""

import pytest
import torch
from reference import vanilla_layout_start
from tiny import build, left_padded, pixels, prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from leanvlm import KVCache
from leanvlm.decoders import DECODERS

TOKENS_PER_CROP = 16


def batch(model):
    """An image in the middle of the text, two images in one prompt, and a text-only prompt; left-padded."""
    rows = [
        prompt(model, 5, 6, "<image>", 7, 8),
        prompt(model, 9, 10, "<image>", 11, "<image>", 12, 13, 14),
        prompt(model, 15, 16, 17),
    ]
    ids, mask = left_padded(rows)
    return ids, mask, pixels(3, seed=2)


def last_token_attention(layer, normed, cos, sin, allowed_last):
    """The last query's attention (B, T) over the keys `allowed_last` (B, T) lets it see, mean over heads."""
    attn = layer.self_attn
    batch_size, length, _ = normed.shape
    q = attn.q_proj(normed[:, -1:]).view(batch_size, 1, -1, attn.head_dim)
    k = attn.k_proj(normed).view(batch_size, length, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos[:, -1:], sin[:, -1:])
    k, _ = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q @ k.transpose(-1, -2))[:, :, 0] * attn.head_dim**-0.5  # (B, H, T)
    return scores.masked_fill(~allowed_last[:, None], float("-inf")).softmax(-1).mean(dim=1)


def reference(model, out, stages):
    """(logits (B, T, V), the vision tokens kept after the last stage (B, T)) by the explicit forward."""
    text_model = model.language_model.model
    hidden, valid, vision, (cos, sin), causal = vanilla_layout_start(model, out)
    length = hidden.shape[1]
    seen, kept = valid.clone(), vision.clone()  # keys not hidden; vision tokens still kept
    drops = dict(stages)
    for index, layer in enumerate(text_model.layers):
        normed = layer.input_layernorm(hidden)
        allowed = (causal & seen[:, None, :]) | torch.eye(length, dtype=torch.bool)  # (B, T, T)
        if index + 1 in drops:  # rank each crop's kept tokens by this layer's last-token attention
            ranking = last_token_attention(layer, normed, cos, sin, allowed[:, -1])
            for b in range(len(hidden)):
                if not _crops(out, b):
                    continue
                slots = kept[b].nonzero().flatten()
                for crop in slots.view(-1, len(slots) // _crops(out, b)):
                    best = crop[ranking[b, crop].topk(drops[index + 1]).indices]
                    worst = crop[~torch.isin(crop, best)]
                    kept[b, worst] = False
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
        hidden = hidden + layer.self_attn(normed, position_embeddings=(cos, sin), attention_mask=mask)[0]
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if index + 1 in drops:
            seen &= ~vision | kept
    return model.language_model.lm_head(text_model.norm(hidden)), kept


def _crops(out, b: int) -> int:
    return int(out.vision_mask[b].sum()) // TOKENS_PER_CROP


CASES = [
    ("fastv", {"fastv_layer": 1, "keep_tokens": 5}),
    ("fastv", {"fastv_layer": 2, "keep_ratio": 0.25}),
    ("pyramiddrop", {}),  # 3 layers: stages at layers 1 and 2, 16 -> 8 -> 4 tokens per crop
    ("pyramiddrop", {"pyramid_layers": [2], "pyramid_keep": 0.2}),
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("name,options", CASES)
def test_kept_tokens_and_logits_equal_the_explicit_reference(name, options, family):
    model = build(name, family, **options)
    ids, mask, images = batch(model)
    stages = DECODERS[name].stages(model.decoder.options, TOKENS_PER_CROP)
    assert stages and all(kept < TOKENS_PER_CROP for _, kept in stages), "the case must drop tokens"
    cache = KVCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images, output_hidden_states=True, cache=cache)
        expected, kept = reference(model, out, stages)
    # which tokens the layers after the last stage read: the cache hides the others' keys from them
    last_stage = stages[-1][0]
    readable = out.attention_mask.bool() & (cache.key_until > last_stage)
    assert (readable & out.vision_mask).tolist() == kept.tolist()
    assert kept.sum(dim=1).tolist() == [stages[-1][1] * _crops(out, b) for b in range(len(kept))]
    text = out.attention_mask.bool() & ~out.vision_mask  # dropped rows are never computed past their stage
    torch.testing.assert_close(out.logits[text], expected[text], atol=1e-5, rtol=1e-4)


def test_a_trained_vanilla_model_loads_into_the_drop_policies_and_keeping_every_token_is_vanilla(tmp_path):
    vanilla = build("vanilla")
    vanilla.save_pretrained(tmp_path)
    ids, mask, images = batch(vanilla)
    from leanvlm import LeanVLMForConditionalGeneration

    with torch.no_grad():
        expected = vanilla(ids, mask, pixel_values=images).logits
        for name, options in [("fastv", {"keep_tokens": TOKENS_PER_CROP}), ("pyramiddrop", {"pyramid_keep": 0.99})]:
            model = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder=name, **options).eval()
            torch.testing.assert_close(model(ids, mask, pixel_values=images).logits, expected, atol=0, rtol=0)
        dropping = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder="fastv", keep_tokens=4).eval()
        assert not torch.allclose(dropping(ids, mask, pixel_values=images).logits, expected)


@pytest.mark.parametrize("options,message", [
    ({"fastv_layer": 0}, "fastv_layer must be a decoder layer index in 1..2"),
    ({"fastv_layer": 3}, "fastv_layer must be"),
])
def test_fastv_refuses_a_layer_without_a_layer_before_or_after(options, message):
    with pytest.raises(ValueError, match=message):
        build("fastv", **options)


@pytest.mark.parametrize("options,message", [
    ({"pyramid_layers": [0, 2]}, "cannot hold layer 0"),
    ({"pyramid_layers": [1, 1]}, "distinct decoder layer indices"),
    ({"pyramid_keep": 1.0}, "pyramid_keep must be a fraction in"),
    ({"pyramid_keep": 0}, "pyramid_keep must be a fraction in"),
])
def test_pyramiddrop_refuses_bad_stages(options, message):
    with pytest.raises(ValueError, match=message):
        build("pyramiddrop", **options)


def test_pyramiddrop_scales_its_stages_to_the_depth():
    options = DECODERS["pyramiddrop"].Options()
    assert options.resolved(32).pyramid_layers == [8, 16, 24]
    assert DECODERS["pyramiddrop"].Options().resolved(30).pyramid_layers == [8, 15, 23]
    assert DECODERS["pyramiddrop"].stages(DECODERS["pyramiddrop"].Options().resolved(32), 576) == [
        (8, 288), (16, 144), (24, 72)]
