"""`proxyv` against the spec (reference/proxyv.md sections 2-4): an explicit reference, masks, equivalences."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import attention
from tiny import build, cached_and_recomputed, left_padded, pixels, prompt

from leanvlm.decoders.proxyv import FULL, PROXY, REST, ProxyInitializer, build_proxy_mask, spatial_proxies

OPTIONS = dict(proxyv_reduce_factor=2)  # 4x4 patch grid -> 2x2 proxies per crop


@torch.no_grad()
def reference_logits(model, before, after, image):
    """One sample `before <image> after`, one crop, packed as the spec does: [full ; text] with logical positions,
    proxies [full; proxy; text] from layer s on."""
    llm, dec = model.language_model, model.decoder
    embed = llm.model.embed_tokens
    full = model.encode_images(image).tokens[0][None]  # (1, N, d)
    text = embed(torch.tensor([before + after]))
    o, n_full = len(before), full.shape[1]
    full_pos = torch.arange(o, o + n_full)
    text_pos = torch.cat([torch.arange(o), torch.arange(o + n_full, o + n_full + len(after))])
    rope = lambda pos: llm.model.rotary_emb(text, pos[None])  # noqa: E731
    s = model.config.proxyv_start_layer
    layers = llm.model.layers
    h = torch.cat([full, text], dim=1)
    pos = torch.cat([full_pos, text_pos])
    for layer in layers[:s]:
        normed = layer.input_layernorm(h)
        h = h + attention(layer, normed, normed, rope(pos), rope(pos), pos[:, None] >= pos[None, :])
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    f, x = h[:, :n_full], h[:, n_full:]
    p = F.interpolate(f.view(1, 4, 4, -1).permute(0, 3, 1, 2), size=(2, 2), mode="bilinear",
                      align_corners=False).flatten(2).transpose(1, 2)
    proxy_pos = torch.arange(o, o + p.shape[1])
    kv_pos = torch.cat([full_pos, proxy_pos, text_pos])
    q_pos = torch.cat([proxy_pos, text_pos])
    kinds = torch.tensor([FULL] * n_full + [PROXY] * p.shape[1] + [REST] * x.shape[1])
    q_kinds = kinds[n_full:]
    allowed = (q_pos[:, None] >= kv_pos[None, :])
    allowed &= ~((q_kinds[:, None] == PROXY) & (kinds[None, :] == FULL))
    allowed &= ~((q_kinds[:, None] == REST) & (kinds[None, :] == PROXY))
    cover = torch.tensor([(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)])  # nearest up-sampling
    for layer, mlp in zip(layers[s:], dec.vision_mlps, strict=True):
        z = layer.input_layernorm(torch.cat([f, p, x], dim=1))
        px = torch.cat([p, x], dim=1) + attention(layer, z[:, n_full:], z, rope(q_pos), rope(kv_pos), allowed)
        px = px + layer.mlp(layer.post_attention_layernorm(px))
        p, x = px[:, : p.shape[1]], px[:, p.shape[1]:]
        u = mlp.input_proj(f)
        g = mlp.proxy_proj(p)[:, cover]
        f = mlp.norm(mlp.fc2(F.silu(mlp.fc1(torch.cat([u, g], dim=-1)))) + f)
    out = llm.lm_head(llm.model.norm(torch.cat([f, x], dim=1)))[0]
    return out[n_full:]  # text rows, in order before + after


@pytest.mark.parametrize("family,start", [("llama", 1), ("qwen2", 0), ("qwen3", 2)])
def test_logits_equal_explicit_reference(family, start):
    model = build("proxyv", family, proxyv_start_layer=start, **OPTIONS)
    with torch.no_grad():  # large new weights and peaky attention, so proxies, guided updates and positions
        for param in model.decoder.parameters():  # visibly move the text logits
            param.normal_(0, 0.5)
        for layer in model.language_model.model.layers:
            layer.self_attn.q_proj.weight *= 20
            layer.self_attn.k_proj.weight *= 20
    before, after = [5, 6], [7, 8, 9]
    image = pixels(1)
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, *before, "<image>", *after)]), pixel_values=image)
    text_rows = ~out.vision_mask[0]
    torch.testing.assert_close(out.logits[0, text_rows], reference_logits(model, before, after, image),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("newline", [False, True])
def test_start_at_the_last_layer_equals_vanilla(newline):
    vanilla = build("vanilla", image_newline=newline)
    proxyv = build("proxyv", proxyv_start_layer=3, image_newline=newline, **OPTIONS)
    proxyv.load_state_dict(vanilla.state_dict())
    ids, mask = left_padded([prompt(vanilla, 5, "<image>", 7), prompt(vanilla, "<image>", 8, "<image>", 9, 10)])
    with torch.no_grad():
        a = vanilla(ids, mask, pixel_values=pixels(3)).logits
        b = proxyv(ids, mask, pixel_values=pixels(3)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("init", ["spatial", "learned"])
@pytest.mark.parametrize("start", [0, 1])
def test_forward_backward_and_generation_run(init, start):
    model = build("proxyv", proxyv_start_layer=start, proxyv_proxy_init=init, **OPTIONS).train()
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8), prompt(model, 9, 10)])
    out = model(ids, mask, pixel_values=pixels(1), labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    groups = model.decoder.parameter_groups()
    assert set(groups) == {"connector", "vision_mlps"} | ({"proxy_init"} if init == "learned" else set())
    for name in groups:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[name]), name
    assert all(p.grad is None for p in model.vision_model.parameters())
    model.eval()
    assert model.generate(ids, mask, pixel_values=pixels(1), max_new_tokens=3).shape[0] == 2


def crops_batch(model):
    """Prompts with 2 crops, 3 crops (two images of 1 and 2 crops), text only; newline after each crop."""
    rows = [
        prompt(model, 5, "<image>", 7, 8),
        prompt(model, 9, "<image>", 10, "<image>", 11, 12, 13),
        prompt(model, 14, 15, 16),
    ]
    return rows, [2, 1, 2], [[0], [1, 2], []]


@pytest.mark.parametrize("init", ["spatial", "learned"])
def test_batched_generation_equals_one_by_one_with_mixed_crops(init):
    model = build("proxyv", proxyv_start_layer=1, proxyv_proxy_init=init, max_crops=3, **OPTIONS)
    rows, crops, images_of_row = crops_batch(model)
    images = pixels(sum(crops), seed=4)
    context = model.encode_images(images, torch.tensor(crops))
    ids, mask = left_padded(rows)
    batched = model.generate(ids, mask, image_context=context, max_new_tokens=6, eos_token_id=[])
    for b, row in enumerate(rows):
        single_context = context[images_of_row[b]] if images_of_row[b] else None
        single = model.generate(torch.tensor([row]), image_context=single_context, max_new_tokens=6,
                                eos_token_id=[])
        assert batched[b, ids.shape[1]:].tolist() == single[0, len(row):].tolist()


def test_cached_decoding_equals_recomputation():
    """Decoding runs plain layers on the cache; that equals recomputing everything with ProxyV, because text rows
    of a ProxyV layer see exactly [full; newline; text] keys, and full/proxy states never see later text."""
    model = build("proxyv", "qwen3", proxyv_start_layer=1, max_crops=3, **OPTIONS)
    rows, crops, _ = crops_batch(model)
    context = model.encode_images(pixels(sum(crops), seed=4), torch.tensor(crops))
    ids, mask = left_padded(rows)
    stepped, full, cache = cached_and_recomputed(model, ids, mask, torch.randint(3, 90, (3, 3)),
                                                 image_context=context)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)
    with torch.no_grad():
        layout = model(ids, mask, image_context=context).attention_mask.shape[1]
    assert cache.length == layout + 3  # no proxy slots left after the prefill


def test_text_after_the_image_never_reaches_full_or_proxy_states():
    model = build("proxyv", proxyv_start_layer=1, **OPTIONS)
    image = pixels(1)
    outs = []
    for after in ([7, 8, 9], [30, 31, 32]):
        with torch.no_grad():
            outs.append(model(torch.tensor([prompt(model, 5, "<image>", *after)]), pixel_values=image,
                              output_hidden_states=True))
    vision = outs[0].vision_mask[0]
    for a, b in zip(outs[0].hidden_states, outs[1].hidden_states, strict=True):
        torch.testing.assert_close(a[0, vision], b[0, vision], atol=1e-6, rtol=0)
    # ... while the text rows do change
    assert (outs[0].hidden_states[-1][0, -1] - outs[1].hidden_states[-1][0, -1]).abs().max() > 1e-3


def test_built_masks_in_a_forward_follow_the_blocks(monkeypatch):
    import leanvlm.decoders.proxyv as proxyv

    seen = []
    real = proxyv.build_proxy_mask

    def record(q_pos, q_kind, k_pos, k_kind, k_valid, window=None):
        mask = real(q_pos, q_kind, k_pos, k_kind, k_valid, window)
        seen.append((q_pos, q_kind, k_pos, k_kind, k_valid, mask[:, 0]))
        return mask

    monkeypatch.setattr(proxyv, "build_proxy_mask", record)
    model = build("proxyv", proxyv_start_layer=1, **OPTIONS)
    with torch.no_grad():
        model(torch.tensor([prompt(model, 5, 6, "<image>", 7, 8)]), pixel_values=pixels(1))
    _, q_kind, k_pos, k_kind, _, mask = seen[0]
    proxy_rows, text_rows = q_kind[0] == PROXY, q_kind[0] == REST
    assert not mask[0][proxy_rows][:, k_kind[0] == FULL].any()  # proxies never see full tokens
    assert not mask[0][text_rows][:, k_kind[0] == PROXY].any()  # text never sees proxies
    later_text = (k_kind[0] == REST) & (k_pos[0] > 2)  # the 2 text tokens after the image (positions 18, 19)
    assert not mask[0][proxy_rows][:, later_text].any()  # proxies never see the question after the image
    assert mask[0][proxy_rows][:, (k_kind[0] == REST) & (k_pos[0] < 2)].all()  # but they see the text before it
    assert mask[0][text_rows][:, k_kind[0] == FULL].any()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_proxy_mask_matches_the_rule(data):
    k = data.draw(st.integers(2, 12))
    kinds = torch.tensor(data.draw(st.lists(st.sampled_from([FULL, PROXY, REST]), min_size=k, max_size=k)))
    pos = torch.tensor(data.draw(st.lists(st.integers(0, 9), min_size=k, max_size=k)))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    window = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    queries = (kinds != FULL).nonzero().flatten()
    if len(queries) == 0:
        return
    mask = build_proxy_mask(pos[queries][None], kinds[queries][None], pos[None], kinds[None], valid[None], window)
    for i, q in enumerate(queries.tolist()):
        expected = []
        for j in range(k):
            ok = bool(valid[j]) and pos[j] <= pos[q] and (window is None or pos[q] - pos[j] < window)
            ok &= not (kinds[q] == PROXY and kinds[j] == FULL) and not (kinds[q] != PROXY and kinds[j] == PROXY)
            expected.append(ok)
        row = mask[0, 0, i].tolist()
        assert row == expected if any(expected) else all(row)


def test_spatial_proxy_of_a_constant_grid_is_the_constant_and_learned_assignment_sums_to_one():
    crops = torch.full((3, 16, 5), 2.5)
    torch.testing.assert_close(spatial_proxies(crops, (4, 4), 2), torch.full((3, 4, 5), 2.5))
    torch.manual_seed(0)
    init = ProxyInitializer(width=5, inner=3, num_proxies=4)
    proxies, assignment = init(torch.randn(3, 16, 5))
    assert proxies.shape == (3, 4, 5) and assignment.shape == (3, 16, 4)
    torch.testing.assert_close(assignment.sum(dim=-1), torch.ones(3, 16))


def test_vision_mlp_parameter_count_follows_the_spec():
    model = build("proxyv", proxyv_start_layer=1, **OPTIONS)  # d = 32 < 1024 -> d' = d / 2
    d, inner = 32, 16
    assert len(model.decoder.vision_mlps) == 2  # layers 1 and 2 of 3
    for mlp in model.decoder.vision_mlps:
        assert sum(p.numel() for p in mlp.parameters()) == 3 * d * inner + 2 * inner * inner + d


def test_a_grid_that_does_not_divide_uses_nearest_up_sampling():
    from leanvlm.decoders.proxyv import covering_proxy, proxy_grid

    assert proxy_grid((27, 27), 4) == (6, 6)  # SigLIP-384
    cover = covering_proxy((27, 27), 4, 1, "cpu").view(27, 27)
    expected = F.interpolate(torch.arange(36.0).view(1, 1, 6, 6), size=(27, 27), mode="nearest")[0, 0].long()
    assert torch.equal(cover, expected)
    assert torch.equal(covering_proxy((4, 4), 2, 1, "cpu"), torch.tensor([0, 0, 1, 1] * 2 + [2, 2, 3, 3] * 2))
    model = build("proxyv", proxyv_start_layer=1, proxyv_reduce_factor=3)  # 4x4 grid -> 1x1 proxy
    with torch.no_grad():
        out = model(torch.tensor([prompt(model, 5, "<image>", 7)]), pixel_values=pixels(1))
    assert torch.isfinite(out.logits).all()


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids = None
    results = []
    for checkpointing in (False, True):
        model = build("proxyv", proxyv_start_layer=1, **OPTIONS).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        ids = torch.tensor([prompt(model, 5, "<image>", 7, 8, 9)])
        loss = model(ids, pixel_values=pixels(1), labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.decoder.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0])
    for with_ckpt, without in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(with_ckpt, without)


def test_a_vanilla_checkpoint_loads_as_proxyv_with_sane_new_weights(tmp_path):
    from leanvlm import LeanVLMForConditionalGeneration

    build("vanilla").save_pretrained(tmp_path)  # single crop: no newline, no VisionMLPs, no proxy queries
    model = LeanVLMForConditionalGeneration.from_pretrained(
        tmp_path, decoder="proxyv", proxyv_proxy_init="learned", proxyv_reduce_factor=2, max_crops=3
    )
    assert model.config.proxyv_start_layer == 1  # the middle layer, resolved although set by an override
    width = model.config.text_config.hidden_size
    assert model.decoder.image_newline.std().item() == pytest.approx(width**-0.5, rel=0.5)
    queries = model.decoder.proxy_init.queries
    assert queries.std().item() == pytest.approx((4 * queries.shape[1]) ** -0.5, rel=0.5)
    weights = torch.cat([p.flatten() for n, p in model.decoder.vision_mlps.named_parameters() if "proj" in n])
    assert weights.std().item() == pytest.approx(0.02, rel=0.3)
    with pytest.raises(ValueError, match="proxyv_reduce_factor must be >= 1"):
        LeanVLMForConditionalGeneration.from_pretrained(tmp_path, decoder="proxyv", proxyv_reduce_factor=0)


def test_learned_proxies_need_the_configured_tokens_per_crop():
    model = build("proxyv", vision="dinov2", proxyv_start_layer=1, proxyv_proxy_init="learned", **OPTIONS)
    ids = torch.tensor([prompt(model, 5, "<image>", 7)])
    with pytest.raises(ValueError, match=r"built for 16 tokens per crop .* the crops have 36"):
        model(ids, pixel_values=torch.randn(1, 3, 48, 48))
