"""The vision encoder's analytic FLOPs equal torch's FLOP counter on the Hugging Face encoders and on leanvlm's own
encoder forward (with token merging), and `leanvlm flops` shows them next to the decoder's."""

import json

import pytest
import torch
from tiny import build, pixels
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel
from typer.testing import CliRunner

from leanvlm.cli import app
from leanvlm.encoder import layers_needed
from leanvlm.measure.flops import VISION_CONFIGS, encoder_flops
from leanvlm.vision import encode_features

TINY = {  # image sizes that are not all multiples of the patch: the patch embedding drops the remainder
    "siglip": ("siglip_vision_model", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=30, patch_size=7, vision_use_head=False)),
    "clip": ("clip_vision_model", dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14)),
    "dinov2": ("dinov2", dict(hidden_size=64, mlp_ratio=3, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)),
    # SwiGLU width: int(160 * 2 / 3) = 106, rounded up to a multiple of 8 = 112
    "dinov2-swiglu": ("dinov2", dict(hidden_size=40, mlp_ratio=4, use_swiglu_ffn=True, num_hidden_layers=3,
                                     num_attention_heads=4, image_size=45, patch_size=7)),
}


def counted(function, *args, **kwargs) -> int:
    """FLOPs torch counts for `function(*args, **kwargs)`; SDPA on its math kernel, so that attention is counted."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def tiny_encoder(kind: str):
    model_type, fields = TINY[kind]
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    return config, AutoModel.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kind", list(TINY))
def test_encoder_flops_equal_the_counted_hugging_face_forward(kind):
    config, model = tiny_encoder(kind)
    size = config.image_size
    for crops in (1, 3):
        images = torch.randn(crops, 3, size, size)
        assert encoder_flops(config, crops)["total_flops"] == counted(model, pixel_values=images)
    # the same config as a dict (as config.json holds it) gives the same count
    assert encoder_flops(config.to_dict())["total_flops"] == encoder_flops(config)["total_flops"]


@pytest.mark.parametrize("kind", ["siglip", "clip", "dinov2-swiglu"])
def test_fewer_layers_count_only_the_layers_that_run(kind):
    config, model = tiny_encoder(kind)
    images = torch.randn(2, 3, config.image_size, config.image_size)
    encoder = model.encoder
    name = "layer" if config.model_type == "dinov2" else "layers"
    layers = getattr(encoder, name)
    for keep in range(config.num_hidden_layers):
        setattr(encoder, name, torch.nn.ModuleList(list(layers)[:keep]))
        measured = counted(model, pixel_values=images)
        assert encoder_flops(config, 2, layers=keep)["total_flops"] == measured


@pytest.mark.parametrize("name", list(VISION_CONFIGS))
def test_presets_equal_the_counted_full_size_encoder(name):
    """The presets at full size, on the meta device (shapes only, nothing computed), without SigLIP's pooling head
    (leanvlm never runs it)."""
    model_type, fields = VISION_CONFIGS[name]
    config = AutoConfig.for_model(model_type, **fields)
    config.vision_use_head = False
    with torch.device("meta"):
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    images = torch.empty(2, 3, config.image_size, config.image_size, device="meta")
    assert encoder_flops(name, 2)["total_flops"] == counted(model, pixel_values=images)


def test_token_merging_by_hand():
    # CLIP-like: 3 x 3 patches + CLS = 10 tokens, d = 8, 2 heads (keys averaged over heads: 4 wide), MLP 16, r = 3
    config = {"model_type": "clip_vision_model", "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16,
              "num_hidden_layers": 3, "image_size": 21, "patch_size": 7}
    # layer 1: 10 tokens, 9 mergeable, r = 3; A x B = 5 x 5 over all 10 tokens; MLP on 7
    # layer 2: 7 tokens, 6 mergeable, r = 3; A x B = 4 x 3; MLP on 4
    # layer 3: 4 tokens, 3 mergeable, at most 3 // 2 = 1 merges; A x B = 2 x 2; MLP on 3
    result = encoder_flops(config, merge_per_layer=3)
    assert result["tokens"] == {"input": 10, "output": 3, "prefix": 1, "patches": 2}
    assert result["breakdown"] == {
        "patch_embed": 2 * 9 * (3 * 7 * 7) * 8,
        "qkvo": 2 * 4 * (10 + 7 + 4) * 8 * 8,
        "attention": 2 * 2 * (10 * 10 + 7 * 7 + 4 * 4) * 8,
        "mlp": 2 * 2 * (7 + 4 + 3) * 8 * 16,
        "merge": 2 * (5 * 5 + 4 * 3 + 2 * 2) * 4,
    }
    assert "merge" not in encoder_flops(config)["breakdown"]
    # SigLIP-like, no CLS: 16 tokens halve while they can; one token is always left
    siglip = {"model_type": "siglip_vision_model", "hidden_size": 8, "num_attention_heads": 2,
              "intermediate_size": 16, "num_hidden_layers": 6, "image_size": 28, "patch_size": 7}
    outputs = [encoder_flops(siglip, layers=k, merge_per_layer=10)["tokens"]["output"] for k in range(7)]
    assert outputs == [16, 8, 4, 2, 1, 1, 1]
    assert (encoder_flops(siglip, layers=6, merge_per_layer=10)["breakdown"]["merge"]
            == encoder_flops(siglip, layers=4, merge_per_layer=10)["breakdown"]["merge"])  # nothing left to score


@pytest.mark.parametrize("decoder,vision,options", [
    ("himix", "dinov2", {"vision_feature_layer": 2, "tome_r": 3}),
    ("vanilla", "clip", {"tome_r": 5}),
    ("vanilla", "siglip", {"vision_feature_layer": 1}),
    ("visionzip", "dinov2", {"vision_feature_layer": 1}),  # the CLS row's attention summary
    ("visionzip", "siglip", {"vision_feature_layer": 2}),  # every row's
])
def test_encoder_flops_equal_the_counted_leanvlm_encoder(decoder, vision, options):
    """What leanvlm's own encoder forward runs for a model: up to its feature layer, merging tome_r tokens, with
    the attention summaries token selection reads."""
    from leanvlm.measure.flops import model_encoder_flops

    model = build(decoder, vision=vision, **options)
    config, images = model.config, pixels(2)
    measured = counted(encode_features, model.vision_model, images, config.feature_keys,
                       config.vision_feature_select, config.tome_r)
    assert model_encoder_flops(config, images.shape[-1], crops=2)["total_flops"] == measured


def test_layers_needed():
    assert layers_needed(27, [-2]) == 26
    assert layers_needed(12, [8]) == 8
    assert layers_needed(12, [3, -1]) == 12
    assert layers_needed(12, [0]) == 0 and layers_needed(12, [-13]) == 0
    for wrong in ([13], [-14], []):
        with pytest.raises(ValueError, match="from -13 to 12"):
            layers_needed(12, wrong)


def test_encoder_flops_refuse_what_they_cannot_count():
    with pytest.raises(ValueError, match="siglip_vision_model, clip_vision_model, dinov2"):
        encoder_flops({"model_type": "vit", "hidden_size": 8})
    with pytest.raises(ValueError, match="use a preset"):
        encoder_flops("eva-clip")
    with pytest.raises(ValueError, match="has 12 layers"):
        encoder_flops("dinov2-s14-224", layers=13)


def test_flops_cli_shows_the_encoder_and_the_end_to_end_total():
    base = ["flops", "--llm", "qwen2-0.5b", "--vision", "siglip-so400m-384", "--text-tokens", "64", "--json"]

    def run(*args) -> dict:
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    vanilla, himix = run("--decoder", "vanilla"), run("--decoder", "himix")
    # SigLIP-so400m-384 to hidden state -2: 26 of its 27 layers on 27 x 27 = 729 patch tokens
    s, d, ffn = 729, 1152, 4304
    layer = 4 * s * d * d + 2 * s * s * d + 2 * s * d * ffn
    assert himix["encoder_flops"] == vanilla["encoder_flops"] == 2 * (s * 3 * 14 * 14 * d + 26 * layer)
    assert himix["end_to_end_flops"] == himix["total_flops"] + himix["encoder_flops"]
    assert himix["end_to_end_ratio_to_vanilla"] == pytest.approx(
        himix["end_to_end_flops"] / (vanilla["total_flops"] + vanilla["encoder_flops"]))
    assert himix["ratio_to_vanilla"] < 0.2 < 0.5 < himix["end_to_end_ratio_to_vanilla"]  # the encoder dominates
    assert run("--vision-feature-layer", "-1")["encoder_flops"] - vanilla["encoder_flops"] == 2 * layer
    merged = run("--tome-r", "8")
    assert merged["encoder"]["tokens"]["output"] == 729 - 8 * 26 and merged["tokens"]["vision"] == 729 - 8 * 26
    assert merged["encoder_flops"] < vanilla["encoder_flops"] and merged["total_flops"] < vanilla["total_flops"]
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*base[:-1], "--crops", "2"])
    assert table.exit_code == 0, table.output
    assert "encoder" in table.output and "end-to-end" in table.output
    per_crop = vanilla["encoder_flops"] / 1e9
    assert f"{per_crop:.1f} GFLOPs per crop, {2 * per_crop:.1f} for 2 crops" in table.output
    bad = CliRunner().invoke(app, [*base, "--vision-feature-layer", "28"])
    assert bad.exit_code == 2 and "from -28 to 27" in " ".join(bad.output.replace("│", " ").split())
    grid = CliRunner().invoke(app, [*base, "--tome-r", "8", "--decoder", "proxyv"])
    assert grid.exit_code == 2 and "patch grid" in " ".join(grid.output.replace("│", " ").split())
