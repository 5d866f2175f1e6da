"""`himix` against an explicit mixture-attention reference written from the spec (reference/himix.md §2.2-2.4)."""

import math

import pytest
import torch
from reference import attention
from tiny import build, left_padded, pixels, prompt
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leanvlm import ImageContext
from leanvlm.decoders.himix import feature_layer_per_decoder_layer


def vision_hidden(model, images, layer):
    """Encoder hidden states straight from the HF vision model (SigLIP: no CLS, so every token is a patch)."""
    with torch.no_grad():
        return model.vision_model(pixel_values=images, output_hidden_states=True).hidden_states[layer]


@torch.no_grad()
def reference_logits(model, text_ids, vision_per_layer, separate=False):
    """One sample. text_ids: text tokens only (placeholder removed); vision_per_layer[l]: (N, d_v) or None.

    Every layer: queries from text; keys/values = [vision K/V (own RMSNorm + K/V Linear, no RoPE) ; text K/V
    (RoPE at positions 0..M-1)]; mask = [all vision visible | causal text]; o_proj + FFN on text only.
    `separate` (himix_separate_vision_softmax): one softmax over the causal text keys, another over the vision keys,
    the two attention outputs added before o_proj."""
    llm = model.language_model
    x = llm.model.embed_tokens(torch.tensor([text_ids]))
    m = x.shape[1]
    rope = llm.model.rotary_emb(x, torch.arange(m)[None])
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    window = getattr(llm.config, "sliding_window", None)  # Mistral: text keys only, never the vision keys
    if window is not None:
        causal &= ~torch.ones(m, m, dtype=torch.bool).tril(-window)
    decoder = model.decoder  # with himix_layers, the layers without their own vision K/V see no vision keys
    own = dict(decoder.vision_kv.items())
    modules = [own.get(str(i)) for i in range(len(llm.model.layers))]
    for layer, vision_kv, vision in zip(llm.model.layers, modules, vision_per_layer, strict=True):
        hd = layer.self_attn.head_dim
        prefix, n = None, 0
        if vision is not None and vision_kv is not None:
            n = vision.shape[0]
            y = vision_kv.norm(vision[None])
            prefix = (vision_kv.k_proj(y).view(1, n, -1, hd).transpose(1, 2),
                      vision_kv.v_proj(y).view(1, n, -1, hd).transpose(1, 2))
        allowed = torch.cat([torch.ones(m, n, dtype=torch.bool), causal], dim=1)
        h = layer.input_layernorm(x)
        if separate:
            x = x + attention(layer, h, h, rope, rope, causal)
            if prefix is not None:
                x = x + vision_only_attention(layer, h, rope, prefix)
        else:
            x = x + attention(layer, h, h, rope, rope, allowed, prefix)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return llm.lm_head(llm.model.norm(x))[0]


def vision_only_attention(layer, h, rope, prefix):
    """o_proj (without its bias) of a softmax over the vision keys alone, for queries h (1, M, d) at RoPE `rope`."""
    attn = layer.self_attn
    hd = attn.head_dim
    q = attn.q_proj(h).view(1, h.shape[1], -1, hd)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), *rope)  # (1, H, M, hd)
    groups = q.shape[1] // prefix[0].shape[1]
    keys, values = (t.repeat_interleave(groups, dim=1) for t in prefix)
    out = ((q @ keys.transpose(-1, -2)) / math.sqrt(hd)).softmax(-1) @ values  # (1, H, M, hd)
    bias = attn.o_proj.bias if attn.o_proj.bias is not None else 0
    return attn.o_proj(out.transpose(1, 2).flatten(2)) - bias


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("separate", [False, True])
def test_logits_equal_explicit_reference(family, separate):
    model = build("himix", family, himix_separate_vision_softmax=separate)
    images = pixels(3)
    feats = vision_hidden(model, images, -2)
    rows = [
        prompt(model, 5, "<image>", 7, 8, 9),  # one image; placeholder removed, text positions 0..3
        prompt(model, "<image>", 10, "<image>", 11, 12),  # two images: their vision keys concatenate
        prompt(model, 13, 14, 15, 16, 17, 18),  # text only: no vision keys at all
    ]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images)
    layers = len(model.decoder.vision_kv)
    expected = [
        reference_logits(model, [5, 7, 8, 9], [feats[0]] * layers, separate),
        reference_logits(model, [10, 11, 12], [torch.cat([feats[1], feats[2]])] * layers, separate),
        reference_logits(model, [13, 14, 15, 16, 17, 18], [None] * layers, separate),
    ]
    for b, reference in enumerate(expected):
        torch.testing.assert_close(out.logits[b, out.attention_mask[b]], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("separate", [False, True])
def test_sparse_layers_equal_the_reference_with_vision_keys_in_those_layers_only(separate):
    model = build("himix", "llama", himix_layers=[2, 0], himix_separate_vision_softmax=separate)
    assert model.decoder.vision_layers == [0, 2] and len(model.decoder.vision_kv) == 2
    images = pixels(2)
    feats = vision_hidden(model, images, -2)
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8, 9), prompt(model, 13, 14, 15, 16, 17),
                             prompt(model, "<image>", 10, 11)])
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images)
    expected = [reference_logits(model, [5, 7, 8, 9], [feats[0]] * 3, separate),
                reference_logits(model, [13, 14, 15, 16, 17], [None] * 3, separate),
                reference_logits(model, [10, 11], [feats[1]] * 3, separate)]
    for b, reference in enumerate(expected):
        torch.testing.assert_close(out.logits[b, out.attention_mask[b]], reference, atol=1e-5, rtol=0)
    dense = build("himix", "llama", himix_separate_vision_softmax=separate)
    with torch.no_grad():  # the same weights in layers 0 and 2: the middle layer's vision keys made the difference
        dense.decoder.vision_kv["0"].load_state_dict(model.decoder.vision_kv["0"].state_dict())
        dense.decoder.vision_kv["2"].load_state_dict(model.decoder.vision_kv["2"].state_dict())
        dense.language_model.load_state_dict(model.language_model.state_dict())
        assert (dense(ids, mask, pixel_values=images).logits - out.logits).abs().max() > 1e-4


def test_sparse_weights_are_keyed_by_their_layer(tmp_path):
    """A sparse model's vision K/V are saved under their decoder layer's index (the dense layout when every layer has
    them), so loading them into other layers shows as missing and unexpected keys instead of passing silently."""
    from leanvlm import LeanVLMForConditionalGeneration

    model = build("himix", himix_layers=[0, 2])
    assert {k.split(".")[2] for k in model.state_dict() if k.startswith("decoder.vision_kv.")} == {"0", "2"}
    model.save_pretrained(tmp_path)
    _, info = LeanVLMForConditionalGeneration.from_pretrained(tmp_path, himix_layers=[0, 1], output_loading_info=True)
    assert any(k.startswith("decoder.vision_kv.1.") for k in info["missing_keys"])
    assert any(k.startswith("decoder.vision_kv.2.") for k in info["unexpected_keys"])


@pytest.mark.parametrize("layers", [[], [3], [0, 0], [-1], "0"])
def test_bad_sparse_layers_are_refused_with_the_accepted_range(layers):
    with pytest.raises(ValueError, match=r"himix_layers must be .* in 0\.\.2"):
        build("himix", "llama", himix_layers=layers)


def test_sliding_window_never_hides_vision_keys():
    model = build("himix", "mistral")  # sliding_window = 7
    images = pixels(1)
    text = list(range(3, 23))  # 20 text tokens, well past the window
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, "<image>", *text)]), pixel_values=images).logits[0]
    vision = [vision_hidden(model, images, -2)[0]] * len(model.decoder.vision_kv)
    torch.testing.assert_close(out, reference_logits(model, text, vision), atol=1e-5, rtol=0)


def test_separate_softmax_with_zero_values_is_the_plain_llm_and_learns_to_see():
    """With its own vision softmax and zero vision values the untrained model gives the LLM's text-only logits
    exactly, whatever the image; one gradient step on the values makes the image matter."""
    model = build("himix", "qwen2", himix_separate_vision_softmax=True, himix_zero_init_values=True)
    ids = torch.tensor([prompt(model, 5, "<image>", 6, 7)])
    with torch.no_grad():
        out = model(ids, pixel_values=pixels(1)).logits[0]
        plain = model.language_model(input_ids=torch.tensor([[5, 6, 7]])).logits[0]
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    loss = model(ids, pixel_values=pixels(1), labels=ids).loss
    loss.backward()
    assert all(m.v_proj.weight.grad.abs().sum() > 0 for m in model.decoder.vision_kv.values())
    with torch.no_grad():
        for m in model.decoder.vision_kv.values():
            m.v_proj.weight -= 0.1 * m.v_proj.weight.grad.sign()
        seen = model(ids, pixel_values=pixels(1)).logits[0]
        other = model(ids, pixel_values=pixels(1, seed=7)).logits[0]
    assert (seen - other).abs().max() > 1e-4


def test_text_only_sample_equals_plain_llm():
    model = build("himix", "qwen2")
    ids, mask = left_padded([prompt(model, 5, "<image>", 6), [7, 8, 9, 10, 11]])
    with torch.no_grad():
        out = model(ids, mask, pixel_values=pixels(1))
        plain = model.language_model(input_ids=torch.tensor([[7, 8, 9, 10, 11]])).logits[0]
    torch.testing.assert_close(out.logits[1], plain, atol=1e-5, rtol=0)


def test_permuting_vision_tokens_leaves_logits_unchanged_and_the_image_matters():
    model = build("himix")
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8, 9)])
    with torch.no_grad():
        context = model.encode_images(pixels(1))
        permuted = ImageContext("himix", context.tokens[..., torch.randperm(context.tokens.shape[-2]), :])
        base = model(ids, image_context=context).logits
        shuffled = model(ids, image_context=permuted).logits
        other = model(ids, pixel_values=pixels(1, seed=7)).logits
    torch.testing.assert_close(shuffled, base, atol=1e-5, rtol=0)
    assert (other - base).abs().max() > 1e-3


def test_feature_layers_map_onto_consecutive_decoder_layer_groups():
    assert feature_layer_per_decoder_layer([-2], 4) == [-2, -2, -2, -2]
    assert feature_layer_per_decoder_layer([-1, -3], 4) == [-1, -1, -3, -3]
    assert feature_layer_per_decoder_layer([-1, -2, -3], 3) == [-1, -2, -3]
    assert feature_layer_per_decoder_layer([-1, -2], 3) == [-1, -1, -2]

    model = build("himix", himix_feature_layers=[-1, -3])  # 3 decoder layers -> [-1, -1, -3]
    images = pixels(1)
    per_layer = [vision_hidden(model, images, layer)[0] for layer in (-1, -1, -3)]
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, "<image>", 7, 8)]), pixel_values=images).logits[0]
    torch.testing.assert_close(out, reference_logits(model, [7, 8], per_layer), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,bias", [("llama", False), ("qwen2", True)])
def test_new_vision_kv_modules_follow_the_llm(family, bias):
    model = build("himix", family)
    text, vision = model.config.text_config, model.config.vision_config
    kv_width = text.num_key_value_heads * model.language_model.model.layers[0].self_attn.head_dim
    d_v = vision.hidden_size
    assert len(model.decoder.vision_kv) == text.num_hidden_layers
    for module in model.decoder.vision_kv.values():
        count = sum(p.numel() for p in module.parameters())
        assert count == 2 * d_v * kv_width + (2 * kv_width if bias else 0) + d_v
        assert torch.equal(module.norm.weight, torch.ones(d_v))
        assert (module.k_proj.bias is not None) == bias
        if bias:
            assert not module.k_proj.bias.any() and not module.v_proj.bias.any()
    weights = torch.cat([p.flatten() for n, p in model.decoder.named_parameters() if n.endswith("proj.weight")])
    assert weights.mean().abs() < 0.003
    assert weights.std().item() == pytest.approx(text.initializer_range, rel=0.1)


def test_loss_trains_vision_kv_and_never_the_frozen_encoder():
    model = build("himix").train()
    assert not model.vision_model.training  # frozen encoder stays in eval mode
    ids = torch.tensor([prompt(model, 5, "<image>", 7, 8, 9)])
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(ids, pixel_values=pixels(1), labels=labels)
    out.loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    # text layout [5, 7, 8, 9] (placeholder removed): 5 predicts 7, 7 predicts 8, 8 predicts 9
    logits = out.logits[0].detach()
    expected = torch.nn.functional.cross_entropy(logits[0:3], torch.tensor([7, 8, 9]))
    torch.testing.assert_close(out.loss.detach(), expected)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch):
    import leanvlm.decoders.runner as runner

    calls = []
    real_checkpoint = runner.checkpoint
    monkeypatch.setattr(runner, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    ids = torch.tensor([[5, 96, 7, 8, 9, 10]])
    grads = []
    for checkpointing in (False, True):
        model = build("himix").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(ids, pixel_values=pixels(1), labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.decoder.parameters()]))
    assert len(calls) == 3  # one checkpointed segment per decoder layer, only when enabled
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for with_ckpt, without in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(with_ckpt, without)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_zero_initialised_values_start_from_attention_mass_only(family, tmp_path):
    """With `himix_zero_init_values` every vision V starts at zero (bias too) while K starts random: the image then
    only dilutes the text's attention, which the explicit reference with all-zero vision values reproduces. Loading
    a saved model keeps its trained values."""
    model = build("himix", family, himix_zero_init_values=True)
    for module in model.decoder.vision_kv.values():
        assert not module.v_proj.weight.any() and (module.v_proj.bias is None or not module.v_proj.bias.any())
        assert module.k_proj.weight.std() > 0
    images = pixels(1)
    vision = vision_hidden(model, images, model.config.vision_feature_layer)[0]
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, "<image>", 7, 8)]), pixel_values=images).logits[0]
    layers = model.config.text_config.num_hidden_layers
    torch.testing.assert_close(out, reference_logits(model, [7, 8], [vision] * layers), atol=1e-5, rtol=0)
    with torch.no_grad():
        for module in model.decoder.vision_kv.values():
            module.v_proj.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert all(bool((m.v_proj.weight == 0.5).all()) for m in loaded.decoder.vision_kv.values())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_matmul_projection_equals_each_layers_norm_and_projections(family, dtype):
    model = build("himix", family, himix_feature_layers=[-1, -2]).to(dtype)
    for module in model.decoder.vision_kv.values():  # norm weights and biases away from their initial values
        for parameter in module.parameters():
            parameter.data.normal_(1.0 if parameter.dim() == 1 else 0.0, 0.5)
    g = torch.Generator().manual_seed(0)
    features = {layer: torch.randn(2, 16, 24, generator=g).to(dtype) for layer in (-1, -2)}
    with torch.no_grad():
        projected = model.decoder.project_images(features)  # (n, L, 2, H_kv, N, D)
        modules = model.decoder.vision_kv.values()
        for layer, (module, feature_layer) in enumerate(zip(modules, model.decoder.layer_feature, strict=True)):
            key, value = module(features[feature_layer])  # (n, N, H_kv * D)
            for i, expected in enumerate((key, value)):
                got = projected[:, layer, i].transpose(1, 2).flatten(2)  # (n, N, H_kv * D)
                tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
                torch.testing.assert_close(got, expected, **tolerance)
    assert model.decoder.layer_feature[0] != model.decoder.layer_feature[-1]  # both groups were exercised
