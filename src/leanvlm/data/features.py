"""Vision feature cache: the encoder is frozen, so its features are computed once and stored in safetensors shards,
each tensor keyed by the image's content hash + the encoder + the layer + the crop settings."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leanvlm.data.llava import data_image_paths
from leanvlm.decoders.base import attention_key
from leanvlm.precision import resolve_dtype
from leanvlm.reports import write_json
from leanvlm.vision import encode_features

INDEX = "index.json"


def feature_signature(vision_model, select: str, images, tome_r: int = 0) -> str:
    """What the features depend on besides the image: the encoder (config, weights' origin, dtype), the token
    selection, token merging and the crop settings of `images` (an `ImagePreprocessor`, e.g. the model's
    processor)."""
    config = vision_model.config.to_dict()
    for incidental in ("dtype", "torch_dtype", "_name_or_path", "transformers_version"):  # covered or irrelevant
        config.pop(incidental, None)
    parts = {
        "encoder": getattr(vision_model, "name_or_path", ""),
        "vision_config": config,
        "dtype": str(next(vision_model.parameters()).dtype),
        "select": select,
        "max_crops": images.max_crops,
        "pinpoints": images.image_grid_pinpoints,
        "crop_size": images.crop_size,
    }
    if tome_r:  # only when on, so that the signatures of unmerged features stay what they were
        parts["tome_r"] = tome_r
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def model_feature_signature(model, processor) -> str:
    """The signature of the features a `LeanVLMForConditionalGeneration` consumes."""
    return feature_signature(model.vision_model, model.config.vision_feature_select, processor, model.config.tome_r)


def image_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FeatureCache:
    """`directory` holds shards `features-<random>.safetensors` and `index.json` {key: shard}; writes are atomic."""

    def __init__(self, directory: str, signature: str):
        self.directory, self.signature = directory, signature
        path = os.path.join(directory, INDEX)
        self.index = {}
        if os.path.isfile(path):
            with open(path) as f:
                self.index = json.load(f)
        self._hashes: dict[str, str] = {}

    def key(self, image_path: str, layer) -> str:
        """The tensor's name: image hash, signature and feature key (a hidden-state index or an attention key)."""
        if image_path not in self._hashes:  # an image is read and hashed once per cache object
            self._hashes[image_path] = image_hash(image_path)
        return f"{self._hashes[image_path]}-{self.signature}-layer{layer}"

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def holds(self, image_path: str, keys) -> bool:
        """Whether the image's features of every one of `keys` (feature layers, attention keys) are cached."""
        return all(self.key(image_path, key) in self for key in keys)

    def image_features(self, image_path: str, keys) -> dict:
        """{key: (n_crops, N, ...)}: one image's cached features."""
        return {key: self.get(self.key(image_path, key)) for key in keys}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.index:
            raise KeyError(f"No cached features for {key}; run `leanvlm data encode` with the same encoder and crop "
                           "settings first.")
        with safe_open(os.path.join(self.directory, self.index[key]), "pt") as shard:
            return shard.get_tensor(key)

    def add_shard(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write one shard under a fresh name, then merge its keys into the index on disk under a lock, so that
        several processes can fill one cache at once."""
        import fcntl
        import uuid

        os.makedirs(self.directory, exist_ok=True)
        name = f"features-{uuid.uuid4().hex[:16]}.safetensors"
        temporary = os.path.join(self.directory, f".{name}.tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary)
        os.replace(temporary, os.path.join(self.directory, name))
        with open(os.path.join(self.directory, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = os.path.join(self.directory, INDEX)
            if os.path.isfile(path):
                with open(path) as f:
                    self.index.update(json.load(f))
            self.index.update(dict.fromkeys(tensors, name))
            temporary = os.path.join(self.directory, f".{INDEX}.{os.getpid()}.tmp")
            with open(temporary, "w") as f:
                json.dump(self.index, f)
            os.replace(temporary, path)


def encode_images_to_cache(vision_model, images, keys: list, select: str, image_paths: list[str],
                           cache: FeatureCache, batch_size: int = 16, shard_images: int = 256, progress=None,
                           tome_r: int = 0) -> int:
    """Encode every image not cached yet (all its crops, every feature key in `keys`); return how many. `images` is an
    `ImagePreprocessor`; `progress(n)` is called after each batch of n images."""
    from PIL import Image

    todo = sorted({p for p in image_paths if not cache.holds(p, keys)})
    pending: dict[str, torch.Tensor] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pixels, crops = images.preprocess_images([Image.open(p).convert("RGB") for p in chunk])
        with torch.no_grad():
            features = encode_features(vision_model, pixels, keys, select, tome_r)
        offset = 0
        for path, count in zip(chunk, crops.tolist(), strict=True):
            for key in keys:
                pending[cache.key(path, key)] = features[key][offset : offset + count].clone()
            offset += count
        if len(pending) >= shard_images * len(keys):
            cache.add_shard(pending)
            pending = {}
        if progress is not None:
            progress(len(chunk))
    if pending:
        cache.add_shard(pending)
    return len(todo)


def _model_encoder(model_dir: str, dtype: torch.dtype) -> tuple:
    """A saved leanvlm model's encoder, its processor, and the feature settings of its config."""
    from leanvlm.config import LeanVLMConfig
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    config = LeanVLMConfig.from_pretrained(model_dir)
    encoder = LeanVLMForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).vision_model
    settings = {"layers": config.feature_keys, "select": config.vision_feature_select,
                "max_crops": config.max_crops, "image_grid_pinpoints": config.image_grid_pinpoints,
                "tome_r": config.tome_r}
    return encoder, LeanVLMProcessor.from_pretrained(model_dir), settings


def _vision_encoder(vision: str, dtype: torch.dtype, layers: list[int], summaries: list[int], select: str,
                    max_crops: int, tome_r: int) -> tuple:
    """A packaged or Hugging Face encoder, a preprocessor for its images, and the feature settings given (the
    hidden states `layers` and the attention summaries of the layers that output `summaries`)."""
    from leanvlm.modeling import load_vision_model
    from leanvlm.processing import ImagePreprocessor, encoder_image_processor

    encoder = load_vision_model(vision, dtype)
    images = ImagePreprocessor(encoder_image_processor(encoder), max_crops, None)
    keys = [*sorted(set(layers)), *(attention_key(index) for index in sorted(set(summaries)))]
    settings = {"layers": keys, "select": select, "max_crops": max_crops, "image_grid_pinpoints": None,
                "tome_r": tome_r}
    return encoder, images, settings


def encode_data(data_files: list[str], out: str, *, vision: str | None = None, model: str | None = None,
                layers: list[int] = (-2,), summaries: list[int] = (), select: str = "patch", max_crops: int = 1,
                dtype: str = "auto", image_root: str | None = None, batch_size: int = 16, tome_r: int = 0,
                progress=None) -> dict:
    """Encode every image the LLaVA-format `data_files` refer to into the feature cache in `out`, with exactly one
    of: a saved leanvlm `model` (its encoder, feature layers, token selection, merging and crops), or a `vision`
    encoder (a packaged part or a Hugging Face directory) with `layers`, the attention `summaries` of hidden states
    (what visionzip reads, see `attention_key`), `select`, `max_crops` and `tome_r`. Images
    already cached are skipped. Writes `out`/features.json and returns it. `progress(images, total)` says how many
    more are done."""
    import time

    paths = sorted({p for f in data_files for p in data_image_paths(f, image_root)})  # checked before any loading
    torch_dtype = resolve_dtype(dtype)
    dtype = str(torch_dtype).removeprefix("torch.")
    if model is not None:
        encoder, images, settings = _model_encoder(model, torch_dtype)
    else:
        encoder, images, settings = _vision_encoder(vision, torch_dtype, list(layers), list(summaries), select,
                                                    max_crops, tome_r)
    encoder = encoder.to(torch_dtype).eval()
    signature = feature_signature(encoder, settings["select"], images, settings["tome_r"])
    cache = FeatureCache(out, signature)
    started = time.perf_counter()

    def advance(done: int) -> None:
        if progress is not None:
            progress(done, len(paths))

    advance(sum(cache.holds(p, settings["layers"]) for p in paths))  # cached already
    encoded = encode_images_to_cache(encoder, images, settings["layers"], settings["select"], paths, cache,
                                     batch_size, progress=advance, tome_r=settings["tome_r"])
    report = {"signature": signature, "encoder": encoder.name_or_path, **settings, "dtype": dtype,
              "images": len(paths), "encoded_now": encoded, "seconds": round(time.perf_counter() - started, 2)}
    write_json(os.path.join(out, "features.json"), report)
    return report


def render_encoding(report: dict, console, out: str) -> None:
    """How many images were encoded now, how many were cached already, and where."""
    console.print(f"{report['encoded_now']} image(s) encoded, {report['images'] - report['encoded_now']} already "
                  f"cached, in {report['seconds']:.1f} s; wrote {out} (signature {report['signature']})")
