"""Training recipes: YAML files read into dataclasses, with `key.sub=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

from leanvlm.decoders import DECODERS
from leanvlm.decoders.himix import HiMixDecoder

# "new" names every parameter group the decoder policy adds (its `groups`; some exist only with certain options,
# e.g. ProxyV's proxy_init with learned proxies); the other groups are "language_model" and "vision_model".
NEW = "new"
SHARED_GROUPS = ("language_model", "vision_model")


@dataclass
class ModelSpec:
    language_model: str = "smollm2-135m"  # a packaged part or a Hugging Face directory
    vision_model: str = "dinov2-s14"
    decoder: str = HiMixDecoder.name
    options: dict = field(default_factory=dict)  # LeanVLMConfig fields (feature layer, proxyv_start_layer, ...)
    init_from: str | None = None  # a saved leanvlm model to start from instead of the two parts


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])


@dataclass
class StageSpec:
    name: str
    data: str  # LLaVA-format JSON/JSONL
    train: list[str] = field(default_factory=lambda: [NEW])  # parameter groups this stage updates
    lr: dict[str, float] = field(default_factory=lambda: {NEW: 1e-3})  # per group; "new" covers the policy's groups
    template: str = "chat"  # chat, plain or vicuna_v1
    steps: int | None = None  # optimizer steps; None = `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 16  # global samples per micro-batch (split over processes)
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    group_by_length: bool = False
    lora: LoraSpec | None = None  # with "language_model" in `train`: train LoRA adapters instead, merged at the end


@dataclass
class EvalSpec:
    data: str
    every: int = 0  # optimizer steps between evaluations (0: at the end of each stage only)
    max_samples: int = 256  # records for the validation loss
    batch_size: int = 16
    answers: int = 0  # records answered greedily at each evaluation, for exact match per family (0: loss only)


@dataclass
class Recipe:
    stages: list[StageSpec]
    output_dir: str = "runs/leanvlm"
    model: ModelSpec = field(default_factory=ModelSpec)
    seed: int = 0
    # auto, no, bf16 or fp16 (autocast; master weights stay fp32); auto: bf16 where the machine multiplies it
    # natively, else fp32 (leanvlm.precision)
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    features: str | None = "auto"  # encoder-feature cache dir; "auto": <output_dir>/features; null: run the encoder
    image_root: str | None = None
    max_length: int = 512
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints (0: at the end of each stage only)
    keep_last: int = 2
    eval: EvalSpec | None = None

    def stage_index(self, name: str) -> int:
        for index, stage in enumerate(self.stages):
            if stage.name == name:
                return index
        raise KeyError(f"No stage named {name!r}; the recipe has {[s.name for s in self.stages]}.")


def _build(cls, data, where: str):
    """A dataclass from a mapping, recursing into nested dataclass fields; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(fields)}.")
    nested = {"model": ModelSpec, "lora": LoraSpec, "eval": EvalSpec}
    values = {}
    for key, value in data.items():
        if key == "stages":
            if not isinstance(value, list) or not value:
                raise ValueError(f"{where}: 'stages' must be a non-empty list.")
            value = [_build(StageSpec, stage, f"{where}.stages[{i}]") for i, stage in enumerate(value)]
        elif key in nested and value is not None:
            value = _build(nested[key], value, f"{where}.{key}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as error:  # a required key is missing
        raise ValueError(f"{where}: {error}") from None


def apply_override(data: dict, override: str) -> None:
    """`a.b.0.c=value` (value parsed as YAML) set in place; list items by index."""
    if "=" not in override:
        raise ValueError(f"Override {override!r} must look like key.sub=value (e.g. stages.0.steps=100).")
    path, raw = override.split("=", 1)
    keys = path.split(".")
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """Read a recipe; relative data paths resolve against the recipe's directory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Recipe {path!r} does not exist.")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML ({error}).") from None
    for override in overrides:
        apply_override(data, override)
    return recipe_from_dict(data, where=path, base=os.path.dirname(os.path.abspath(path)))


def recipe_from_dict(data: dict, where: str = "recipe", base: str | None = None) -> Recipe:
    recipe = _build(Recipe, data, where)
    if base is not None:
        def resolve(p):
            return p if p is None or os.path.isabs(p) else os.path.join(base, p)

        for stage in recipe.stages:
            stage.data = resolve(stage.data)
        if recipe.eval is not None:
            recipe.eval.data = resolve(recipe.eval.data)
    check_recipe(recipe, where)
    return recipe


def check_recipe(recipe: Recipe, where: str) -> None:
    if recipe.mixed_precision is False:  # YAML reads an unquoted `no` as false
        recipe.mixed_precision = "no"
    if recipe.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"{where}: mixed_precision must be auto, no, bf16 or fp16, got "
                         f"{recipe.mixed_precision!r}.")
    decoder = recipe.model.decoder
    if decoder not in DECODERS:
        raise ValueError(f"{where}: model.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}.")
    policy_groups = DECODERS[decoder].groups
    known = (NEW, *policy_groups, *SHARED_GROUPS)
    if recipe.log_every < 1 or recipe.keep_last < 1 or recipe.save_every < 0:
        raise ValueError(f"{where}: log_every and keep_last must be >= 1 and save_every >= 0.")
    names = [stage.name for stage in recipe.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: stage names must be unique, got {names}.")
    for stage in recipe.stages:
        at = f"{where}, stage {stage.name!r}"
        if not stage.train:
            raise ValueError(f"{at}: 'train' lists no parameter group.")
        unknown = sorted({group for group in [*stage.train, *stage.lr] if group not in known})
        if unknown:
            raise ValueError(f"{at}: unknown parameter group(s) {unknown}; a {decoder} model has {', '.join(known)}.")
        for group, value in stage.lr.items():
            try:
                stage.lr[group] = float(value)  # YAML reads 1e-3 (no dot) as a string
            except (TypeError, ValueError):
                raise ValueError(f"{at}: the learning rate of {group!r} must be a number, got {value!r}.") from None
        missing = [group for group in stage.train
                   if group not in stage.lr and not (group in (NEW, *policy_groups) and NEW in stage.lr)]
        if missing:
            raise ValueError(f"{at}: no learning rate for {missing}; add them under 'lr'.")
        if "vision_model" in stage.train and recipe.features is not None:
            raise ValueError(f"{at}: trains the vision model, so its features cannot be cached; set features: null.")
        if stage.lora is not None and "language_model" not in stage.train:
            raise ValueError(f"{at}: 'lora' applies to the language model; add language_model to 'train'.")
        if (stage.steps is not None and stage.steps < 1) or stage.epochs <= 0:
            raise ValueError(f"{at}: steps must be >= 1 and epochs > 0.")
        if stage.batch_size < 1 or stage.grad_accum < 1:
            raise ValueError(f"{at}: batch_size and grad_accum must be >= 1.")


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
