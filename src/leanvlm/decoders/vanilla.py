"""`vanilla`: LLaVA-style decoding. Each `<image>` placeholder is replaced by that image's projected vision tokens
(crop by crop, each crop optionally followed by a learned newline embedding) and the whole sequence runs through
every decoder layer with a causal mask."""

from __future__ import annotations

import torch
from torch import nn

from leanvlm.connector import build_connector
from leanvlm.decoders.attention import build_mask
from leanvlm.decoders.base import (
    IGNORE_INDEX,
    DecoderInputs,
    DecoderPolicy,
    ImageContext,
    left_pad,
    positions_from_valid,
)


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

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"connector": list(self.connector.parameters())}
        if self.image_newline is not None:
            groups["image_newline"] = [self.image_newline]
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
            for cut, image in zip(cuts, images):
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
