"""Vision feature cache: the encoder is frozen, so its features are computed once and stored in safetensors shards,
each tensor keyed by the image's content hash + the encoder + the layer + the crop settings."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leanvlm.vision import encode_features

INDEX = "index.json"


def feature_signature(vision_model, select: str, images) -> str:
    """What the features depend on besides the image: the encoder (config, weights' origin, dtype), the token
    selection and the crop settings of `images` (an `ImagePreprocessor`, e.g. the model's processor)."""
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
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def model_feature_signature(model, processor) -> str:
    """The signature of the features a `LeanVLMForConditionalGeneration` consumes."""
    return feature_signature(model.vision_model, model.config.vision_feature_select, processor)


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

    def key(self, image_path: str, layer: int) -> str:
        if image_path not in self._hashes:  # an image is read and hashed once per cache object
            self._hashes[image_path] = image_hash(image_path)
        return f"{self._hashes[image_path]}-{self.signature}-layer{layer}"

    def __contains__(self, key: str) -> bool:
        return key in self.index

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


def encode_images_to_cache(vision_model, images, layers: list[int], select: str, image_paths: list[str],
                           cache: FeatureCache, batch_size: int = 16, shard_images: int = 256, progress=None) -> int:
    """Encode every image not cached yet (all its crops, every layer in `layers`); return how many. `images` is an
    `ImagePreprocessor`; `progress(n)` is called after each batch of n images."""
    from PIL import Image

    todo = sorted({p for p in image_paths if any(cache.key(p, layer) not in cache for layer in layers)})
    pending: dict[str, torch.Tensor] = {}
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        pixels, crops = images.preprocess_images([Image.open(p).convert("RGB") for p in chunk])
        with torch.no_grad():
            features = encode_features(vision_model, pixels, layers, select)
        offset = 0
        for path, count in zip(chunk, crops.tolist(), strict=True):
            for layer in layers:
                pending[cache.key(path, layer)] = features[layer][offset : offset + count].clone()
            offset += count
        if len(pending) >= shard_images * len(layers):
            cache.add_shard(pending)
            pending = {}
        if progress is not None:
            progress(len(chunk))
    if pending:
        cache.add_shard(pending)
    return len(todo)
