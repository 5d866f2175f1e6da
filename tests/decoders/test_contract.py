"""The contract every registered decoder policy keeps, run for each policy and each option preset it declares.

A policy that registers in `leanvlm.decoders.DECODERS` gets these tests without writing them: batched greedy
generation equals one-by-one, cached decoding equals recomputation, save/load round trip, FlopCounterMode equals the
analytic count, parameter groups cover every new parameter, its flags match what it does, and bad options fail
with an error that names them.
"""

from dataclasses import fields

import pytest
import torch
from tiny import VISION_KINDS, build, cached_and_recomputed, left_padded, pixels, prompt

from leanvlm import LeanVLMConfig, LeanVLMForConditionalGeneration
from leanvlm.decoders import DECODERS, Preset, option_names
from leanvlm.decoders.base import _default
from leanvlm.decoders.cost import LLMShape
from leanvlm.measure.flops import Convention, VisionShape, decoder_flops, measured_flops

VARIANTS = [
    pytest.param(name, preset, id=f"{name}-{label}")
    for name, policy in DECODERS.items()
    for label, preset in {"default": Preset({}), **policy.presets}.items()
]
TOKENS_PER_CROP = 16  # tiny encoders: 32-pixel images, 8-pixel patches


def prompts(model):
    """Different lengths, one or two images or none; images in placeholder order."""
    rows = [
        prompt(model, 5, "<image>", 7, 8),
        prompt(model, 9, 10, 11, "<image>", 12, 13, "<image>", 14, 15, 16),
        prompt(model, 17, 18),
    ]
    return rows, [[0], [1, 2], []], pixels(3, seed=3)


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_batched_greedy_equals_one_by_one(name, preset):
    model = build(name, **preset.options)
    rows, images_per_row, images = prompts(model)
    ids, mask = left_padded(rows)
    batched = model.generate(ids, mask, pixel_values=images, max_new_tokens=6, eos_token_id=[])
    for b, row in enumerate(rows):
        own = images[images_per_row[b]] if images_per_row[b] else None
        single = model.generate(torch.tensor([row]), pixel_values=own, max_new_tokens=6, eos_token_id=[])
        assert batched[b, ids.shape[1] :].tolist() == single[0, len(row) :].tolist(), b


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_cached_decoding_equals_recomputation(name, preset):
    model = build(name, "qwen2", **preset.options)
    rows, _, images = prompts(model)
    ids, mask = left_padded(rows)
    new = torch.randint(3, 90, (3, 4))
    stepped, full, _ = cached_and_recomputed(model, ids, mask, new, pixel_values=images)
    torch.testing.assert_close(stepped, full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_save_and_load_round_trip(name, preset, tmp_path):
    model = build(name, vision=VISION_KINDS[-1], **preset.options)
    rows, _, images = prompts(model)
    ids, mask = left_padded(rows)
    model.save_pretrained(tmp_path)
    loaded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    own_fields = set(LeanVLMConfig.__annotations__) - {"text_config", "vision_config"}
    assert {key: getattr(loaded.config, key) for key in own_fields} == {
        key: getattr(model.config, key) for key in own_fields}
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask, pixel_values=images).logits,
                                   model(ids, mask, pixel_values=images).logits, atol=0, rtol=0)


@pytest.mark.parametrize("crops", [1, 3])
@pytest.mark.parametrize("name,preset", VARIANTS)
def test_counted_flops_equal_the_analytic_count(name, preset, crops):
    if not preset.flops_exact:
        pytest.skip("the analytic count of this preset is what it could save, not what leanvlm computes")
    model = build(name, "qwen2", max_crops=crops, **preset.options)
    ids = torch.tensor([prompt(model, "<image>", *range(5, 25))])
    measured = measured_flops(model, ids, pixel_values=pixels(crops), image_crops=[crops])
    newlines = crops if model.config.uses_image_newline else 0
    options = {option: getattr(model.config, option) for option in option_names(DECODERS[name])}
    analytic = decoder_flops(LLMShape.from_config(model.config), VisionShape(TOKENS_PER_CROP, 24, 2), 20 + newlines,
                             name, crops=crops, convention=Convention(attention="full", lm_head="last"), **options)
    assert measured == analytic["total_flops"]


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_parameter_groups_cover_every_new_parameter_once(name, preset):
    model = build(name, image_newline=DECODERS[name].keeps_vision_tokens, **preset.options)
    groups = model.decoder.parameter_groups()
    assert set(groups) <= set(DECODERS[name].groups), "a group the policy does not declare"
    grouped = [id(p) for params in groups.values() for p in params]
    assert len(grouped) == len(set(grouped)), "a parameter in two groups"
    assert set(grouped) == {id(p) for p in model.decoder.parameters()}, "a new parameter in no group"
    everything = [id(p) for params in model.parameter_groups().values() for p in params]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("name,preset", VARIANTS)
def test_flags_match_the_layout(name, preset):
    model = build(name, **preset.options)
    rows, images_per_row, images = prompts(model)
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=images)
    keeps = DECODERS[name].keeps_vision_tokens
    assert (out.vision_mask is not None and bool(out.vision_mask.any())) == keeps
    images = torch.tensor([len(row) for row in images_per_row])
    # kept: each placeholder becomes its image's tokens in place (as many as its context holds, fewer than the
    # encoder's under a token reduction); otherwise the placeholders leave the text alone
    per_crop = model.encode_images(pixels(1)).tokens.shape[1] if keeps else 0
    expected = mask.sum(dim=1) + (images * (per_crop - 1) if keeps else -images)
    assert out.attention_mask.sum(dim=1).tolist() == expected.tolist()
    if keeps:
        assert out.vision_mask.sum(dim=1).tolist() == (images * per_crop).tolist()


@pytest.mark.parametrize("name", list(DECODERS))
def test_options_of_other_policies_are_refused_by_name(name):
    own = set(option_names(DECODERS[name]))
    for preset in [preset for policy in DECODERS.values() for preset in policy.presets.values()]:
        foreign = [option for option in preset.options if option not in own]
        if foreign:
            with pytest.raises(ValueError, match=f"{foreign[0]}.*this config's decoder is '{name}'"):
                build(name, **preset.options)
    with pytest.raises(TypeError, match="not_an_option"):
        build(name, not_an_option=1)


@pytest.mark.parametrize("name", list(DECODERS))
def test_options_are_config_fields_with_the_same_defaults(name):
    config_fields = {option.name: option for option in fields(LeanVLMConfig)}
    for option in fields(DECODERS[name].Options):
        assert option.name in config_fields, f"{option.name} is not a LeanVLMConfig field"
        assert _default(option) == _default(config_fields[option.name]), option.name
    assert DECODERS[name].name == name
