"""The vision encoder side: checking pixel inputs and picking feature tokens out of an HF encoder's hidden states."""

from __future__ import annotations

import torch
from torch import nn

from leanvlm.encoder import CLS_FIRST, run_encoder, split_feature_keys

# Encoders whose learned position embeddings fix the input resolution (no interpolation by default).
FIXED_RESOLUTION_ENCODERS = ("clip_vision_model", "siglip_vision_model")


def check_pixel_values(pixel_values: torch.Tensor, vision_config) -> None:
    channels = getattr(vision_config, "num_channels", 3)
    size = getattr(vision_config, "image_size", None)
    expected = f"(num_images, {channels}, H, W)"
    if vision_config.model_type in FIXED_RESOLUTION_ENCODERS and size is not None:
        expected = f"(num_images, {channels}, {size}, {size})"
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(
            f"pixel_values must have shape {expected}, got {shape}. Build it with the model's processor "
            "(LeanVLMProcessor), which stacks one preprocessed image per <image> placeholder."
        )
    height, width = pixel_values.shape[-2:]
    patch = vision_config.patch_size
    if vision_config.model_type in FIXED_RESOLUTION_ENCODERS and size is not None and (height, width) != (size, size):
        raise ValueError(
            f"pixel_values has images of {height}x{width} pixels but this {vision_config.model_type} encoder takes "
            f"{size}x{size}; preprocess them with the encoder's image processor."
        )
    if height < patch or width < patch:  # the patch embedding ignores a remainder (SigLIP-384: 27 patches of 14)
        raise ValueError(f"pixel_values height/width ({height}x{width}) are smaller than the patch size {patch}.")


def select_tokens(hidden: torch.Tensor, prefix: int, select: str) -> torch.Tensor:
    """hidden (n, S, d_v) -> the tokens the decoder consumes.

    "patch" drops the encoder's `prefix` tokens (CLS, registers; SigLIP has none), "full" keeps everything,
    "drop_first" drops token 0 whatever it is (LLaVA's "default" strategy).
    """
    if select == "full":
        return hidden
    if select == "drop_first":
        return hidden[:, 1:]
    return hidden[:, prefix:]


def encode_features(
    vision_model: nn.Module, pixel_values: torch.Tensor, keys: list, select: str, merge_per_layer: int = 0
) -> dict:
    """Run the encoder once, up to the deepest requested layer; return {key: (n_images, N, ...)} for `keys`:
    hidden-state indices (features (n_images, N, d_v)) and `leanvlm.encoder.attention_key`s (attention summaries
    (n_images, N, 1 + D)), over the same selected tokens. merge_per_layer: ToMe's r (`leanvlm.tome`), 0 = the plain
    encoder."""
    config = vision_model.config
    check_pixel_values(pixel_values, config)
    dtype = next(vision_model.parameters()).dtype
    states, summaries = split_feature_keys(keys)
    outputs = run_encoder(vision_model, pixel_values.to(dtype), sorted(set(states)), merge_per_layer,
                          sorted(set(summaries)))
    patch = config.patch_size
    patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
    # tokens before the patches: CLS or registers, wherever tokens were not merged; merging keeps only CLS
    prefix = int(config.model_type in CLS_FIRST) if merge_per_layer else next(iter(outputs.values())).shape[1] - patches
    return {key: select_tokens(tensor, prefix, select) for key, tensor in outputs.items()}


def patch_grid(pixel_values: torch.Tensor, patch: int, num_tokens: int) -> tuple[int, int] | None:
    """(rows, cols) of the patch grid when the selected tokens are exactly the patches, else None."""
    grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    return grid if grid[0] * grid[1] == num_tokens else None

