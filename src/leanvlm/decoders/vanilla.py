"""`vanilla`: LLaVA-style decoding. Each `<image>` placeholder is replaced by that image's projected vision tokens and
the whole sequence runs through every decoder layer with a causal mask."""

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
        sequences, sequence_labels = [], []
        for b, images in enumerate(images_per_sample):
            ids, embeds = input_ids[b, valid[b]], token_embeds[b, valid[b]]
            sample_labels = labels[b, valid[b]] if labels is not None else None
            cuts = (ids == image_token_id).nonzero().flatten().tolist()
            pieces, label_pieces, start = [], [], 0
            for cut, image in zip(cuts, images):
                image_tokens = context.tokens[image].to(embeds.dtype)
                pieces += [embeds[start:cut], image_tokens]
                if sample_labels is not None:
                    label_pieces += [
                        sample_labels[start:cut],
                        sample_labels.new_full((image_tokens.shape[0],), IGNORE_INDEX),
                    ]
                start = cut + 1
            pieces.append(embeds[start:])
            sequences.append(torch.cat(pieces))
            if sample_labels is not None:
                label_pieces.append(sample_labels[start:])
                sequence_labels.append(torch.cat(label_pieces))
        inputs_embeds, new_valid = left_pad(sequences, 0.0)
        new_labels = left_pad(sequence_labels, IGNORE_INDEX)[0] if labels is not None else None
        return DecoderInputs(inputs_embeds, positions_from_valid(new_valid), new_valid, new_labels)

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        """Causal over all tokens (vision and text alike), padding keys hidden."""
        if prefix_len:
            raise ValueError("the vanilla decoder has no prefix keys")
        return build_mask(key_valid, num_queries, window=window)
