"""`vica` against an explicit reference written from its definition: frozen vision tokens that serve keys/values,
made by the chosen layers' own k/v projections at vanilla's positions, to the text of those layers only."""

import pytest
import torch
from reference import attention
from tiny import build, cached_and_recomputed, left_padded, pixels, prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

N = 16  # tokens per tiny image (4 x 4 patches)


@torch.no_grad()
def reference_logits(model, pieces, images):
    """One sample. pieces: ints and "<image>"; images: (k, 3, H, W) for its k placeholders, in order.

    Vanilla's positions: text tokens count every image token before them. Layer l: queries = text; keys = text
    (causal) and, if l is a chosen layer, [k_proj/v_proj(input_layernorm(projected tokens)), RoPE at the tokens'
    vanilla positions] visible to every text query."""
    llm, chosen = model.language_model, model.config.vica_layers
    text, text_pos, vision_pos, position = [], [], [], 0
    for piece in pieces:
        if piece == "<image>":
            vision_pos += range(position, position + N)
            position += N
        else:
            text.append(piece)
            text_pos.append(position)
            position += 1
    vision = None
    if images is not None:
        vision = model.encode_images(images).tokens.flatten(0, 1)[None]  # (1, k * N, d): connector outputs
    x = llm.model.embed_tokens(torch.tensor([text]))
    m = x.shape[1]
    rope = llm.model.rotary_emb(x, torch.tensor([text_pos]))
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    for index, layer in enumerate(llm.model.layers):
        h = layer.input_layernorm(x)
        if vision is not None and index in chosen:
            attn, hd = layer.self_attn, layer.self_attn.head_dim
            y = layer.input_layernorm(vision)
            k = attn.k_proj(y).view(1, y.shape[1], -1, hd)
            if hasattr(attn, "k_norm"):
                k = attn.k_norm(k)
            cos, sin = llm.model.rotary_emb(y, torch.tensor([vision_pos]))
            k, _ = apply_rotary_pos_emb(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = attn.v_proj(y).view(1, y.shape[1], -1, hd).transpose(1, 2)
            allowed = torch.cat([torch.ones(m, y.shape[1], dtype=torch.bool), causal], dim=1)
            x = x + attention(layer, h, h, rope, rope, allowed, (k, v))
        else:
            x = x + attention(layer, h, h, rope, rope, causal)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return llm.lm_head(llm.model.norm(x))[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_equal_explicit_reference(family):
    model = build("vica", family, vica_layers=[0, 2])
    images = pixels(3)
    samples = [
        ([5, "<image>", 7, 8, 9], images[:1]),  # text on both sides of the image
        (["<image>", 10, "<image>", 11, 12], images[1:]),  # two images: the second one's positions follow the text
        ([13, 14, 15, 16, 17, 18], None),  # text only
    ]
    ids, mask = left_padded([prompt(model, *pieces) for pieces, _ in samples])
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images)
    for b, (pieces, sample_images) in enumerate(samples):
        expected = reference_logits(model, pieces, sample_images)
        torch.testing.assert_close(out.logits[b, out.attention_mask[b]], expected, atol=1e-5, rtol=0)


def test_only_the_chosen_layers_read_the_image_and_the_default_is_every_fourth_layer():
    assert build("vica").config.vica_layers == [0]  # 3 layers: 0 only
    model = build("vica", vica_layers=[1])
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8)])
    with torch.no_grad():
        states = model(ids, pixel_values=pixels(1), output_hidden_states=True).hidden_states
        other = model(ids, pixel_values=pixels(1, seed=3), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states[1], other[1], atol=0, rtol=0)  # layer 0 never sees the image
    assert (states[2] - other[2]).abs().max() > 1e-4  # layer 1 does


def test_cached_decoding_continues_at_vanilla_positions():
    """After the prefill the next text position counts the images' tokens, so each cached step gives the logits of
    a forward over the whole sequence, and the cache reports the position vanilla would."""
    model = build("vica", vica_layers=[0, 1, 2])
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8), prompt(model, 9, 10, 11, 12, 13, 14, 15)])
    new = torch.tensor([[20, 21, 22], [23, 24, 25]])
    stepped, full, cache = cached_and_recomputed(model, ids, mask, new, pixel_values=pixels(1))
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert cache.next_position.tolist() == [3 + N + 3, 7 + 3]
    # a prompt that ends with its image continues after the image's tokens, where vanilla's would
    ids, mask = left_padded([prompt(model, 5, 6, "<image>")])
    stepped, full, cache = cached_and_recomputed(model, ids, mask, new[:1], pixel_values=pixels(1))
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert cache.next_position.tolist() == [2 + N + 3]


def test_a_trained_vanilla_checkpoint_runs_as_vica(tmp_path):
    vanilla = build("vanilla")
    vanilla.save_pretrained(tmp_path)
    from leanvlm import LeanVLMForConditionalGeneration

    model = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder="vica", vica_layers=[0, 1])
    torch.testing.assert_close(model.decoder.connector.state_dict(), vanilla.decoder.connector.state_dict())
    assert model.config.decoder == "vica" and model.decoder.vica_layers == [0, 1]


@pytest.mark.parametrize("layers", [[], [3], [1, 1], [-1]])
def test_bad_layers_are_refused_with_the_accepted_range(layers):
    with pytest.raises(ValueError, match=r"vica_layers must be .* in 0\.\.2"):
        build("vica", vica_layers=layers)

