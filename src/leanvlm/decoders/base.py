"""What every decoder policy shares: its interface, the image context, and the helpers that lay out a batch."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from leanvlm.decoders.cost import PrefillShape
from leanvlm.decoders.layer import layer_forward

IGNORE_INDEX = -100


def attention_key(layer: int) -> str:
    """The feature key of the attention summary of the encoder layer whose output is hidden state `layer`:
    (n, N, 1 + D), column 0 the attention each token receives, averaged over heads (from the CLS token where the
    encoder has one, else averaged over every query), columns 1..D its key averaged over heads. Computed by
    `leanvlm.encoder`, cached and passed around with the hidden states, which are keyed by their int index."""
    return f"attention{layer}"


@dataclass
class ImageContext:
    """Images already turned into what a decoder consumes, so any number of prompts can reuse them.

    `tokens` is stacked over crops (image i has `crops[i]` consecutive rows; single-crop images have one):
    policies with vision tokens in the sequence hold the projected tokens (n_crops, N, d); himix holds the vision
    keys and values of every layer that has them (n_crops, vision layers, 2, H_kv, N, head_dim). `grid` is the
    (rows, cols) patch grid of one crop's N tokens when they form one.
    """

    decoder: str
    tokens: torch.Tensor
    crops: list[int] | None = None  # crop counts, one per image
    grid: tuple[int, int] | None = None

    def __post_init__(self):
        if self.crops is None:
            self.crops = [1] * self.tokens.shape[0]
        self.crops = [int(c) for c in self.crops]
        if sum(self.crops) != self.tokens.shape[0] or min(self.crops, default=1) < 1:
            raise ValueError(
                f"The images declare {sum(self.crops)} crop(s) in total (per image: {self.crops}) but "
                f"there are {self.tokens.shape[0]} encoded crops; every image needs at least one crop."
            )
        self._offsets = [0]
        for count in self.crops:
            self._offsets.append(self._offsets[-1] + count)

    def __len__(self) -> int:
        return len(self.crops)

    def rows(self, index: int) -> range:
        """Row numbers of one image's crops in `tokens`."""
        return range(self._offsets[index], self._offsets[index + 1])

    def image(self, index: int) -> torch.Tensor:
        """The rows of one image's crops."""
        return self.tokens[self._offsets[index] : self._offsets[index + 1]]

    def __getitem__(self, index) -> ImageContext:
        """Select or repeat images, e.g. `ctx[[0, 0, 0]]` for three prompts about image 0."""
        indices = [index] if isinstance(index, int) else list(index)
        rows = [row for i in indices for row in self.rows(i)]
        return ImageContext(self.decoder, self.tokens[rows], [self.crops[i] for i in indices], self.grid)

    def to(self, *args, **kwargs) -> ImageContext:
        return ImageContext(self.decoder, self.tokens.to(*args, **kwargs), self.crops, self.grid)

    @classmethod
    def cat(cls, contexts: list[ImageContext]) -> ImageContext:
        """The images of several contexts of one decoder, in order (e.g. cached images of different requests)."""
        first = contexts[0]
        if any(c.decoder != first.decoder or c.grid != first.grid for c in contexts):
            raise ValueError("Only image contexts of one decoder and patch grid can be joined.")
        tokens = torch.cat([c.tokens for c in contexts]) if len(contexts) > 1 else first.tokens
        return cls(first.decoder, tokens, [n for c in contexts for n in c.crops], first.grid)

    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()


@dataclass
class VisionPrefix:
    """Position-free keys/values placed in front of the text keys of every layer (HiMix's vision keys)."""

    valid: torch.Tensor  # (B, P) bool
    keys: list[torch.Tensor | None]  # per layer: (B, H_kv, P, head_dim), None in a layer without prefix keys
    values: list[torch.Tensor | None]


@dataclass
class DecoderInputs:
    """A batch laid out for the decoder layers: left-padded, with the policy's own positions and labels."""

    inputs_embeds: torch.Tensor  # (B, T, d)
    position_ids: torch.Tensor  # (B, T)
    valid: torch.Tensor  # (B, T) bool, False for padding
    labels: torch.Tensor | None = None  # (B, T), IGNORE_INDEX where no loss
    prefix: VisionPrefix | None = None
    vision_mask: torch.Tensor | None = None  # (B, T) bool, True for vision tokens in the sequence
    image_crops: list[list[int]] | None = None  # crops of each image of each sample, in sequence order
    vision_grid: tuple[int, int] | None = None  # (rows, cols) patch grid of one crop's tokens, when they form one
    # (B,) the position after the block, where it is not the last token's + 1 (vica: a prompt ending in an image)
    next_position: torch.Tensor | None = None


@dataclass
class PolicyOptions:
    """A policy's own fields of `LeanVLMConfig`, with the same names and defaults. Subclasses add fields."""

    def resolved(self, num_layers: int) -> PolicyOptions:
        """Check the values (a ValueError names the option and what it accepts) and fill in what depends on the
        language model's depth; returns the options to use."""
        return self

    def refuse_unread(self) -> None:
        """Raise a ValueError naming options set away from their defaults that these (resolved) values never read,
        e.g. a token budget with no reduction to spend it. A model's config refuses them; a cost estimate, which
        spreads one set of options over every decoder, ignores them."""

    def changed(self) -> list[str]:
        """Names of the options set away from their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != _default(f)]


def layer_set(option: str, layers, num_layers: int) -> list[int]:
    """A policy option that names decoder layers, checked (a non-empty list of distinct indices in 0..L-1) and
    sorted."""
    if (not isinstance(layers, list | tuple) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < num_layers for x in layers)
            or len(set(layers)) < len(layers)):
        raise ValueError(f"{option} must be a non-empty list of distinct decoder layer indices in 0..{num_layers - 1}"
                         f", got {layers!r}.")
    return sorted(layers)


def _default(option) -> object:
    return option.default if option.default_factory is MISSING else option.default_factory()


@dataclass(frozen=True)
class Preset:
    """A named option set a policy declares (e.g. a probe); the contract tests run every one."""

    options: dict
    # False where the analytic count is what the variant could save rather than what leanvlm's code computes
    flops_exact: bool = True


class DecoderPolicy(nn.Module):
    """A way of running the language decoder over text and vision tokens. A subclass owns everything about itself:
    its name, options and their checks, its trainable vision-side modules (as submodules) with their parameter groups
    and initialisation, how images become an `ImageContext`, how a batch is laid out, its attention mask, and its
    analytic cost. Registering it in `leanvlm.decoders.DECODERS` is all the rest of leanvlm needs."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PolicyOptions]] = PolicyOptions
    options_are: ClassVar[str] = "options of this decoder"  # how an error names these options
    groups: ClassVar[tuple[str, ...]] = ()  # every parameter group the policy may create
    keeps_vision_tokens: ClassVar[bool] = True  # vision tokens are rows of the sequence (and may get newlines)
    # vision tokens take text positions (RoPE), so they count toward the context length (vica's do, as keys only)
    vision_takes_positions: ClassVar[bool] = True
    needs_patch_grid: ClassVar[bool] = False  # reads each crop's tokens as the encoder's patch grid
    # which vision tokens the layers read depends on the forward's last token (fastv, pyramiddrop): a forward over
    # prompt + continuation ranks by another token than the prompt's prefill did, which cached decoding continues
    ranks_by_last_token: ClassVar[bool] = False
    presets: ClassVar[dict[str, Preset]] = {}

    @classmethod
    def options_from(cls, config) -> PolicyOptions:
        return cls.Options(**{f.name: getattr(config, f.name) for f in fields(cls.Options)})

    @classmethod
    def feature_layers(cls, config) -> list[int]:
        """Vision-encoder hidden-state indices the policy consumes."""
        return [config.vision_feature_layer]

    @classmethod
    def feature_keys(cls, config) -> list:
        """Every encoder output the policy reads, as the feature cache keys them: its `feature_layers`, and the
        `attention_key`s of the layers whose attention it ranks tokens by."""
        return cls.feature_layers(config)

    @classmethod
    def prefill_macs(cls, shape: PrefillShape, options: PolicyOptions) -> tuple[dict[str, float], int]:
        """Multiply-accumulates of one sample's prefill by part, and the number of sequence positions (for an
        lm_head counted on every position), with `options` already `resolved`. A "connector" part is dropped by
        conventions that do not count it."""
        raise NotImplementedError

    def init_module(self, module: nn.Module) -> None:
        """Initialise the raw parameters of `module`, one of this policy's modules that is neither a Linear nor an
        RMSNorm layer (those are initialised as the LLM's own)."""

    def project_images(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Vision-encoder features {encoder layer: (n_images, N, d_v)} -> `ImageContext.tokens`."""
        raise NotImplementedError

    def reduce_tokens(self, tokens: torch.Tensor, grid: tuple[int, int] | None):
        """`project_images`' tokens (n_crops, N, ...) and the (rows, cols) patch grid each crop's N tokens form (None
        when they form none) -> the tokens the decoder reads and the grid those form. Every token by default;
        token-reduction policies select or pool here, where images become an `ImageContext`, so that cached contexts
        and cached encoder features serve them as they serve the others."""
        return tokens, grid

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
        raise NotImplementedError

    def build_mask(self, key_valid: torch.Tensor, num_queries: int, prefix_len: int, window: int | None):
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """This policy's new trainable parameters by group name (recipes pick groups per stage)."""
        raise NotImplementedError

    def layer_step(self, layer_idx: int, layer: nn.Module, hidden, cos, sin, mask, kv_store, inputs: DecoderInputs):
        """One decoder layer over the sequence; policies with per-layer variations override it."""
        return layer_forward(layer, hidden, cos, sin, mask, kv_store, layer_idx)

    def run(self, run):
        """Drive a `leanvlm.decoders.runner.DecoderRun` through all layers; returns `run.finish()`."""
        run.run_layers(0, len(run.layers))
        return run.finish()


def assign_images(input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int, num_images: int):
    """Map images, in order, to the `<image>` placeholders read row by row; return image indices per sample."""
    is_image = (input_ids == image_token_id) & valid
    counts = is_image.sum(dim=1).tolist()
    total = sum(counts)
    if total != num_images:
        raise ValueError(
            f"The prompts contain {total} <image> placeholder(s) (per sample: {counts}) but {num_images} image(s) "
            "were given. Write exactly one <image> placeholder per image, and pass the images in the order their "
            "placeholders appear, sample by sample (with several crops per image, also pass image_crops)."
        )
    per_sample, start = [], 0
    for count in counts:
        per_sample.append(list(range(start, start + count)))
        start += count
    return per_sample


def left_pad(sequences: list[torch.Tensor], pad_value) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_b, ...) tensors into (B, T_max, ...) with padding on the left; also return the valid mask."""
    length = max(seq.shape[0] for seq in sequences)
    first = sequences[0]
    out = first.new_full((len(sequences), length, *first.shape[1:]), pad_value)
    valid = torch.zeros(len(sequences), length, dtype=torch.bool, device=first.device)
    for b, seq in enumerate(sequences):
        if seq.shape[0]:
            out[b, length - seq.shape[0] :] = seq
            valid[b, length - seq.shape[0] :] = True
    return out, valid


def positions_from_valid(valid: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that count only valid tokens (padding gets the position of its neighbour; it is masked)."""
    positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return positions if start is None else positions + start[:, None]
