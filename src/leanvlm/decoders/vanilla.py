"""`vanilla`: LLaVA-style decoding. Each `<image>` placeholder is replaced by that image's projected vision tokens
(crop by crop, each crop optionally followed by a learned newline embedding) and the whole sequence runs through
every decoder layer with a causal mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanvlm.decoders.attention import CAUSAL, build_mask
from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    DecoderPolicy,
    ImageContext,
    left_pad,
    positions_from_valid,
)
from leanvlm.decoders.connector import build_connector
from leanvlm.decoders.layer import attention_update, project_qkv
from leanvlm.decoders.llm import decoder_layers


class LightVisionMLP(nn.Module):
    """Probe: replaces attention + FFN of the vision tokens in one layer, RMSNorm(W2 SiLU(W1 Win x) + x) with
    d -> d/4 -> d/4 -> d and no bias."""

    def __init__(self, width: int, norm: nn.Module):
        super().__init__()
        self.input_proj = nn.Linear(width, width // 4, bias=False)
        self.fc1 = nn.Linear(width // 4, width // 4, bias=False)
        self.fc2 = nn.Linear(width // 4, width, bias=False)
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.silu(self.fc1(self.input_proj(hidden)))) + hidden)


class VanillaDecoder(DecoderPolicy):
    name = "vanilla"

    def __init__(self, config, language_model: nn.Module):
        super().__init__()
        self.feature_layer = config.vision_feature_layer
        self.connector = build_connector(
            config.connector_type,
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
            config.connector_act,
            config.connector_bias,
        )
        width = config.text_config.hidden_size
        # LLaVA-NeXT's init for the newline vector: N(0, 1/d).
        self.image_newline = nn.Parameter(torch.randn(width) * width**-0.5) if config.uses_image_newline else None
        # Redundancy probes (vanilla only; None = off).
        self.probe_mask_from = config.probe_mask_vision_to_vision_from_layer
        self.probe_skip_attention_from = config.probe_skip_vision_attention_from_layer
        self.probe_skip_ffn_from = config.probe_skip_vision_ffn_from_layer
        self.light_mlps = None
        if config.probe_vision_light_mlp:
            layers = decoder_layers(language_model)
            norm_class, eps = type(layers[0].input_layernorm), config.text_config.rms_norm_eps
            self.light_mlps = nn.ModuleList(
                LightVisionMLP(width, norm_class(width, eps=eps))
                for _ in range(min(self.probe_skip_ffn_from, len(layers)), len(layers))
            )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"connector": list(self.connector.parameters())}
        if self.image_newline is not None:
            groups["image_newline"] = [self.image_newline]
        if self.light_mlps is not None:
            groups["probe_light_mlps"] = list(self.light_mlps.parameters())
        return groups

    def image_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        """One image's crops (c, N, d) -> its tokens in the sequence, with a newline after each crop if enabled."""
        if self.image_newline is None:
            return crops.flatten(0, 1)
        newline = self.image_newline.to(crops.dtype).expand(crops.shape[0], 1, -1)
        return torch.cat([crops, newline], dim=1).flatten(0, 1)

    def project_images(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        return self.connector(features[self.feature_layer])  # (n_images, N, d)

    def build_inputs(
        self,
        embed: nn.Embedding,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        image_token_id: int,
        images_per_sample: list[list[int]],
        context: ImageContext | None,
        labels: torch.Tensor | None,
    ) -> DecoderInputs:
        token_embeds = embed(input_ids)
        sequences, sequence_labels, vision_flags = [], [], []
        for b, images in enumerate(images_per_sample):
            ids, embeds = input_ids[b, valid[b]], token_embeds[b, valid[b]]
            sample_labels = labels[b, valid[b]] if labels is not None else None
            cuts = (ids == image_token_id).nonzero().flatten().tolist()
            pieces, label_pieces, flags, start = [], [], [], 0
            for cut, image in zip(cuts, images, strict=True):
                image_tokens = self.image_tokens(context.image(image).to(embeds.dtype))
                pieces += [embeds[start:cut], image_tokens]
                flags += [torch.zeros(cut - start, dtype=torch.bool), self._vision_flags(context.crops[image], context)]
                if sample_labels is not None:
                    label_pieces += [
                        sample_labels[start:cut],
                        sample_labels.new_full((image_tokens.shape[0],), IGNORE_INDEX),
                    ]
                start = cut + 1
            pieces.append(embeds[start:])
            flags.append(torch.zeros(len(ids) - start, dtype=torch.bool))
            sequences.append(torch.cat(pieces))
            vision_flags.append(torch.cat(flags).to(embeds.device))
            if sample_labels is not None:
                label_pieces.append(sample_labels[start:])
                sequence_labels.append(torch.cat(label_pieces))
        inputs_embeds, new_valid = left_pad(sequences, 0.0)
        new_labels = left_pad(sequence_labels, IGNORE_INDEX)[0] if labels is not None else None
        crops = [[context.crops[image] for image in images] for images in images_per_sample] if context else None
        return DecoderInputs(
            inputs_embeds,
            positions_from_valid(new_valid),
            new_valid,
            new_labels,
            vision=left_pad(vision_flags, False)[0],
            image_crops=crops,
            vision_grid=context.grid if context is not None else None,
        )

    def _vision_flags(self, num_crops: int, context: ImageContext) -> torch.Tensor:
        """Per token of one image: True for vision tokens, False for the newlines."""
        per_crop = torch.ones(context.tokens.shape[1] + (self.image_newline is not None), dtype=torch.bool)
        if self.image_newline is not None:
            per_crop[-1] = False
        return per_crop.repeat(num_crops)

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        """Causal over all tokens (vision and text alike), padding keys hidden."""
        if prefix_len:
            raise ValueError("the vanilla decoder has no prefix keys")
        return build_mask(key_valid, num_queries, window=window)

    # ------------------------------------------------------------------ redundancy probes
    def layer_step(self, layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        def active(start):
            return start is not None and layer_idx >= start

        vision = inputs.vision
        light = self.light_mlps is not None and active(self.probe_skip_ffn_from)
        probing = [active(self.probe_mask_from), active(self.probe_skip_attention_from),
                   active(self.probe_skip_ffn_from)]
        if vision is None or not any(probing):  # decode steps carry no vision tokens: nothing to probe
            return super().layer_step(layer_idx, layer, hidden, cos, sin, mask, kv_store, inputs)
        if probing[0]:
            mask = self._mask_vision_to_vision(mask, vision)
        query, key, value = project_qkv(layer, layer.input_layernorm(hidden), cos, sin)
        key, value = kv_store(layer_idx, key, value)
        text_rows = (~vision)[..., None].to(hidden.dtype)
        update = attention_update(layer, query, key, value, mask)
        out = hidden + (update * text_rows if probing[1] or light else update)
        update = layer.mlp(layer.post_attention_layernorm(out))
        out = out + (update * text_rows if probing[2] else update)
        if light:  # vision rows: the light MLP instead of attention + FFN
            out = torch.where(vision[..., None], self.light_mlps[layer_idx - self.probe_skip_ffn_from](hidden), out)
        return out

    @staticmethod
    def _mask_vision_to_vision(mask, vision: torch.Tensor) -> torch.Tensor:
        """Hide vision keys from vision queries (self included); a row left empty keeps its own key."""
        batch, length = vision.shape
        if mask is None or isinstance(mask, str):
            dense = torch.ones(length, length, dtype=torch.bool, device=vision.device)
            dense = (dense.tril() if mask == CAUSAL else dense).expand(batch, 1, length, length)
        else:
            dense = mask
        dense = dense & ~(vision[:, None, :, None] & vision[:, None, None, :])
        own = torch.eye(length, dtype=torch.bool, device=vision.device)
        return dense | (own & ~dense.any(dim=-1, keepdim=True))
