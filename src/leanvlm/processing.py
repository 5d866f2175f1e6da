"""`LeanVLMProcessor`: tokenizer + image processor. Text keeps one `<image>` placeholder per image; prompts are
left-padded for batched generation; images are stacked in placeholder order, sample by sample."""

from __future__ import annotations

import json
import os

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.tokenization_utils_base import AddedToken

from leanvlm.config import IMAGE_TOKEN
from leanvlm.crops import default_pinpoints, split_into_crops, usable_pinpoints

PROCESSOR_FILE = "leanvlm_processor.json"
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def default_image_processor(vision_config):
    """The usual preprocessing for the encoder families leanvlm tests with (PIL backend, no torchvision)."""
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, SiglipImageProcessorPil

    size = vision_config.image_size
    if vision_config.model_type == "siglip_vision_model":
        return SiglipImageProcessorPil(size={"height": size, "width": size})
    if vision_config.model_type == "clip_vision_model":
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if vision_config.model_type in ("dinov2", "dinov2_with_registers"):
        return BitImageProcessorPil(
            size={"height": size, "width": size},
            do_center_crop=False,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
        )
    raise ValueError(
        f"No default image processor for vision model type {vision_config.model_type!r}; pass image_processor=..."
    )


def encoder_image_processor(vision_model):
    """The encoder checkpoint's own preprocessing when it has one, else the default for its config."""
    source = getattr(vision_model, "name_or_path", "")
    if source and os.path.isfile(os.path.join(source, "preprocessor_config.json")):
        return AutoImageProcessor.from_pretrained(source)
    return default_image_processor(vision_model.config)


def ensure_image_token(tokenizer) -> int:
    """Add `<image>` to the tokenizer when missing (special, so it is never split or merged); return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


class ImagePreprocessor:
    """Images -> encoder inputs. `max_crops` > 1 turns on AnyRes multi-crop images (a base view plus up to
    max_crops - 1 sub-crops at a grid from `image_grid_pinpoints`, in pixels); every crop is preprocessed at the
    encoder's input size. Needs no tokenizer, so encoder features can be computed without a language model."""

    def __init__(self, image_processor, max_crops: int = 1, image_grid_pinpoints=None):
        if max_crops < 1:
            raise ValueError(f"max_crops must be >= 1, got {max_crops}.")
        self.image_processor = image_processor
        self.max_crops = max_crops
        self.image_grid_pinpoints = image_grid_pinpoints
        self._crop_size = None

    @property
    def crop_size(self) -> int:
        """Side of one preprocessed crop, as the image processor produces it."""
        if self._crop_size is None:
            probe = self.image_processor(Image.new("RGB", (8, 8)), return_tensors="pt")["pixel_values"]
            self._crop_size = int(probe.shape[-1])
        return self._crop_size

    def crops_of(self, image) -> list:
        """The crops one image becomes: itself when max_crops is 1, else [base view, sub-crops...]."""
        if self.max_crops == 1:
            return [image]
        size = self.crop_size
        pinpoints = usable_pinpoints(self.image_grid_pinpoints or default_pinpoints(size), size, self.max_crops)
        if not pinpoints:
            raise ValueError(f"No grid in image_grid_pinpoints fits max_crops={self.max_crops} (base view included).")
        return split_into_crops(image, pinpoints, size)

    def preprocess_images(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> pixel_values (one row per crop, image by image) and image_crops (crops per image)."""
        crops = [self.crops_of(image) for image in images]
        flat = [crop for image_crops in crops for crop in image_crops]
        pixel_values = self.image_processor(flat, return_tensors="pt")["pixel_values"]
        return pixel_values, torch.tensor([len(image_crops) for image_crops in crops])


class LeanVLMProcessor(ImagePreprocessor):
    """Tokenizer + `ImagePreprocessor`."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        image_token_id: int | None = None,
        max_crops: int = 1,
        image_grid_pinpoints=None,
    ):
        super().__init__(image_processor, max_crops, image_grid_pinpoints)
        self.tokenizer_image_id = ensure_image_token(tokenizer)
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.image_token_id = self.tokenizer_image_id if image_token_id is None else image_token_id
        # The conversation template the model was trained with (leanvlm.data.templates), for eval and chat.
        self.template = "chat"

    @classmethod
    def from_parts(
        cls,
        tokenizer,
        image_processor=None,
        image_token_id: int | None = None,
        vision_config=None,
        max_crops: int = 1,
        image_grid_pinpoints=None,
    ):
        """`image_token_id`: the model's placeholder id (`model.config.image_token_id`); without it the tokenizer's
        own `<image>` id is used. Without `image_processor`, the default one for `vision_config` is built."""
        if image_processor is None:
            if vision_config is None:
                raise ValueError("Pass image_processor=..., or vision_config=... to build the default one.")
            image_processor = default_image_processor(vision_config)
        return cls(tokenizer, image_processor, image_token_id, max_crops, image_grid_pinpoints)

    @classmethod
    def for_model(cls, model, tokenizer, image_processor=None) -> LeanVLMProcessor:
        """The processor that matches a model: its placeholder id, crop settings and (by default) its encoder's
        preprocessing."""
        config = model.config
        return cls(
            tokenizer,
            image_processor or encoder_image_processor(model.vision_model),
            config.image_token_id,
            config.max_crops,
            config.image_grid_pinpoints,
        )

    def __call__(self, text, images=None, return_tensors: str = "pt", **tokenizer_kwargs) -> BatchFeature:
        """Tokenize prompts (left-padded) and preprocess their images, given flat in placeholder order or as one
        list per prompt. Returns `input_ids`, `attention_mask` and, with images, `pixel_values` (one row per crop)
        and `image_crops` (crops per image)."""
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten_images(images)
        placeholders = [t.count(IMAGE_TOKEN) for t in texts]
        # images=None is allowed with placeholders: the images then come as an `image_context` at generation.
        if images is not None and sum(placeholders) != len(flat_images):
            raise ValueError(
                f"The text contains {sum(placeholders)} {IMAGE_TOKEN} placeholder(s) (per sample: {placeholders}) "
                f"but {len(flat_images)} image(s) were given. Write one {IMAGE_TOKEN} per image."
            )
        tokenizer_kwargs.setdefault("padding", True)
        tokenizer_kwargs.setdefault("padding_side", "left")
        encoded = self.tokenizer(texts, return_tensors="pt", **tokenizer_kwargs)
        input_ids = encoded["input_ids"]
        input_ids[input_ids == self.tokenizer_image_id] = self.image_token_id
        data = {"input_ids": input_ids, "attention_mask": encoded["attention_mask"]}
        if flat_images:
            data["pixel_values"], data["image_crops"] = self.preprocess_images(flat_images)
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(self._printable(token_ids), **kwargs)

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(self._printable(token_ids), **kwargs)

    def _printable(self, token_ids):
        token_ids = torch.as_tensor(token_ids).clone()
        token_ids[token_ids == self.image_token_id] = self.tokenizer_image_id
        return token_ids

    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_FILE), "w") as f:
            settings = {
                "image_token": IMAGE_TOKEN,
                "image_token_id": self.image_token_id,
                "max_crops": self.max_crops,
                "image_grid_pinpoints": self.image_grid_pinpoints,
                "template": self.template,
            }
            json.dump(settings, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **_hub_options) -> LeanVLMProcessor:
        """The processor `save_pretrained` wrote to a local directory. `AutoProcessor` passes its hub options
        (revision, cache_dir, trust_remote_code, ...), which a local directory does not need."""
        path = os.path.join(directory, PROCESSOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {directory!r} holds no saved LeanVLMProcessor.")
        with open(path) as f:
            try:
                settings = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); save the processor again.") from exc
        processor = cls(
            AutoTokenizer.from_pretrained(directory),
            AutoImageProcessor.from_pretrained(directory),
            settings["image_token_id"],
            settings.get("max_crops", 1),
            settings.get("image_grid_pinpoints"),
        )
        processor.template = settings.get("template", "chat")
        return processor


def _flatten_images(images) -> list:
    """None, one image, a flat list in placeholder order, or one list per sample -> flat list."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat
