"""The shipped recipes and accelerate configs.

Paper recipes (and the demo recipes) load, name parameter groups their decoder has, give each trained group a
numeric learning rate, carry the papers' settings and model options that make a valid model config. The accelerate
configs load with accelerate's own loader and pass through its launcher code to the distributed type and plugin
settings they promise. Malformed recipes fail with messages that name the problem; overrides apply.
No network, GPU or model weights needed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from leanvlm.config import LeanVLMConfig
from leanvlm.data.templates import TEMPLATES
from leanvlm.decoders import DECODERS
from leanvlm.train.recipe import NEW, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
PAPER = sorted((RECIPES / "paper").glob("*.yaml"))
# plus demo recipes: recipes/demo*.yaml and the ones packaged with leanvlm (`leanvlm demo` fills in their data)
PACKAGED = ROOT / "src" / "leanvlm" / "train" / "recipes"
SHIPPED = PAPER + sorted(RECIPES.glob("demo*.yaml")) + sorted(PACKAGED.glob("*.yaml"))
ACCELERATE = RECIPES / "accelerate"

# The groups each decoder policy adds ("new" stands for all of them); every model also has these two.
POLICY_GROUPS = {
    "vanilla": {"connector", "image_newline", "probe_light_mlps"},
    "himix": {"vision_kv"},
    "proxyv": {"connector", "image_newline", "vision_mlps", "proxy_init"},
    "random": {"connector", "image_newline"},
    "pool": {"connector", "image_newline"},
    "divprune": {"connector", "image_newline"},
    "visionzip": {"connector", "image_newline"},
    "vica": {"connector"},
    "fastv": {"connector", "image_newline"},
    "pyramiddrop": {"connector", "image_newline"},
}
PARTS = {"language_model", "vision_model"}

# What each paper recipe must reproduce: per stage (template, trained groups, learning rates, epochs, global batch).
PAPER_SETTINGS = {
    "himix-qwen2-0.5b-siglip.yaml": {
        "decoder": "himix", "mixed_precision": "bf16", "stages": [
            ("plain", ["new"], {"new": 1e-3}, 3, 256),
            ("vicuna_v1", ["new", "language_model"], {"new": 1e-5, "language_model": 1e-5}, 3, 128),
        ]},
    "himix-tinyllama-siglip.yaml": {
        "decoder": "himix", "mixed_precision": "fp16", "stages": [
            ("plain", ["new"], {"new": 1e-3}, 10, 256),
            ("vicuna_v1", ["new", "language_model"], {"new": 2e-5, "language_model": 2e-5}, 3, 128),
        ]},
    "proxyv-vicuna-7b-clip.yaml": {
        "decoder": "proxyv", "mixed_precision": "bf16", "stages": [
            ("plain", ["new"], {"new": 1e-3, "vision_mlps": 3e-4}, 1, 512),
            ("vicuna_v1", ["new", "language_model"], {"new": 4e-5, "language_model": 4e-5}, 1, 512),
        ]},
}

# Architectures of the checkpoints the paper recipes name (from their Hugging Face configs), to check the recipes'
# model options against LeanVLMConfig's validation without any weights.
LLM_ARCHITECTURES = {
    "Qwen2-0.5B": ("Qwen2Config", {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936}),
    "TinyLlama-1.1B-Chat-v1.0": ("LlamaConfig", {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000}),
    "vicuna-7b-v1.5": ("LlamaConfig", {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000}),
}
ENCODER_ARCHITECTURES = {
    "siglip-so400m-patch14-384": ("SiglipVisionConfig", {
        "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
        "image_size": 384, "patch_size": 14}),
    "clip-vit-large-patch14-336": ("CLIPVisionConfig", {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 336, "patch_size": 14}),
}

ACCELERATE_CONFIGS = {
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed-zero3.yaml": "DEEPSPEED",
    "cpu-2proc.yaml": "MULTI_CPU",
}


def ids(paths):
    return [p.name for p in paths]


def raw(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def header(path: Path) -> str:
    """The comment block a file starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ----- recipes -----

def test_the_paper_recipes_are_shipped():
    assert {p.name for p in PAPER} == set(PAPER_SETTINGS)


@pytest.mark.parametrize("path", SHIPPED, ids=ids(SHIPPED))
def test_recipe_loads_with_known_groups_and_a_learning_rate_for_each(path):
    recipe = load_recipe(str(path))
    decoder = recipe.model.decoder
    assert decoder in POLICY_GROUPS, f"unknown decoder {decoder!r}"
    policy = POLICY_GROUPS[decoder]
    for stage in recipe.stages:
        at = f"{path.name}, stage {stage.name!r}"
        unknown = set(stage.train) - ({NEW} | PARTS | policy)
        assert not unknown, f"{at}: no group {sorted(unknown)} in a {decoder} model"
        # "new" gives its rate to the policy's groups only; language_model and vision_model need their own.
        reached = set()
        for group in stage.train:
            covered = policy if group == NEW else {group}
            reached |= covered | ({NEW} if group == NEW else set())
            if group in stage.lr:
                continue
            assert group in policy and NEW in stage.lr, f"{at}: no learning rate for {group!r}"
        unused = set(stage.lr) - reached
        assert not unused, f"{at}: learning rates for groups the stage does not train: {sorted(unused)}"
        for group, rate in stage.lr.items():
            # YAML reads 1e-3 as a string (a float needs a dot: 1.0e-3)
            assert isinstance(rate, (int, float)) and not isinstance(rate, bool), f"{at}: lr {group}={rate!r}"
            assert 0 < rate < 1, f"{at}: lr {group}={rate!r}"
        assert stage.template in TEMPLATES
        assert stage.lora is None or "language_model" in stage.train


@pytest.mark.parametrize("path", SHIPPED, ids=ids(SHIPPED))
def test_recipe_paths_are_relative_and_data_resolves_against_the_recipe(path):
    data = raw(path)
    for stage, loaded in zip(data["stages"], load_recipe(str(path)).stages, strict=True):
        assert not os.path.isabs(stage["data"]), "shipped recipes must not hold machine-specific paths"
        assert loaded.data == os.path.join(str(path.parent), stage["data"])
    for part in ("language_model", "vision_model"):
        assert not os.path.isabs(data["model"][part])


@pytest.mark.parametrize("path", PAPER, ids=ids(PAPER))
def test_paper_recipe_has_the_papers_settings(path):
    expected = PAPER_SETTINGS[path.name]
    recipe = load_recipe(str(path))
    assert recipe.model.decoder == expected["decoder"]
    assert recipe.mixed_precision == expected["mixed_precision"]
    assert len(recipe.stages) == len(expected["stages"])
    for stage, (template, train, lr, epochs, global_batch) in zip(recipe.stages, expected["stages"], strict=True):
        assert (stage.template, stage.train, stage.epochs, stage.steps) == (template, train, epochs, None)
        assert stage.lr == pytest.approx(lr)
        assert stage.batch_size * stage.grad_accum == global_batch
        assert stage.batch_size % 8 == 0  # splits evenly over 1, 2, 4 or 8 GPUs
        assert (stage.warmup_ratio, stage.weight_decay) == (0.03, 0.0)
        assert "vision_model" not in stage.train  # both papers keep the encoder frozen
    # the first stage aligns on captions; the second tunes on instructions
    assert "blip_laion_cc_sbu_558k" in recipe.stages[0].data or "share-captioner" in recipe.stages[0].data
    assert recipe.stages[1].group_by_length


def test_proxyv_recipe_is_the_layer_12_multi_crop_model():
    recipe = load_recipe(str(RECIPES / "paper" / "proxyv-vicuna-7b-clip.yaml"))
    options = recipe.model.options
    assert options["proxyv_start_layer"] == 12 and options["proxyv_reduce_factor"] == 4
    assert options["max_crops"] == 5 and options["vision_feature_layer"] == -2
    assert recipe.gradient_checkpointing  # 7B
    assert "vicuna-7b-v1.5" in recipe.model.language_model
    assert "clip-vit-large-patch14-336" in recipe.model.vision_model


@pytest.mark.parametrize("path", PAPER, ids=ids(PAPER))
def test_paper_recipe_options_make_a_valid_model_config(path):
    import transformers

    recipe = load_recipe(str(path))
    options = recipe.model.options
    unknown = set(options) - set(LeanVLMConfig.__dataclass_fields__)
    assert not unknown, f"not LeanVLMConfig fields: {sorted(unknown)}"
    text_class, text = LLM_ARCHITECTURES[os.path.basename(recipe.model.language_model)]
    vision_class, vision = ENCODER_ARCHITECTURES[os.path.basename(recipe.model.vision_model)]
    config = LeanVLMConfig(text_config=getattr(transformers, text_class)(**text),
                           vision_config=getattr(transformers, vision_class)(**vision),
                           decoder=recipe.model.decoder, **options)  # runs validate_options
    assert config.decoder == recipe.model.decoder


def test_group_table_matches_the_decoders():
    """POLICY_GROUPS above lists every group a decoder can have (its optional groups switched on here)."""
    from tiny import build

    options = {
        "vanilla": {"image_newline": True, "probe_skip_vision_ffn_from_layer": 1, "probe_vision_light_mlp": True},
        "himix": {},
        "proxyv": {"image_newline": True, "proxyv_proxy_init": "learned", "proxyv_start_layer": 1,
                   "proxyv_reduce_factor": 2},
        **{name: {"image_newline": True} for name in ("random", "pool", "divprune", "visionzip", "fastv",
                                                                  "pyramiddrop")},
        "vica": {},
    }
    assert set(POLICY_GROUPS) == set(DECODERS)
    for decoder, groups in POLICY_GROUPS.items():
        assert set(DECODERS[decoder].groups) == groups, decoder
        model = build(decoder, **options[decoder])
        assert set(model.decoder.parameter_groups()) == groups, decoder
        assert set(model.parameter_groups()) == groups | PARTS, decoder


# ----- malformed recipes and overrides -----

def minimal(**stage) -> dict:
    return {"output_dir": "runs/x", "stages": [{"name": "align", "data": "captions.json", **stage}]}


def write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("where, data, key", [
    ("top level", {**minimal(), "epochs": 3}, "epochs"),
    ("stage", minimal(learning_rate=1.0e-3), "learning_rate"),
    ("model", {**minimal(), "model": {"decoders": "himix"}}, "decoders"),
    ("lora", minimal(train=["language_model"], lr={"language_model": 1.0e-4}, lora={"rank": 8}), "rank"),
    ("eval", {**minimal(), "eval": {"data": "val.json", "max_sample": 8}}, "max_sample"),
])
def test_unknown_key_is_named(tmp_path, where, data, key):
    with pytest.raises(ValueError, match=rf"unknown key\(s\) \['{key}'\]; valid keys: "):
        load_recipe(write(tmp_path, data))


def test_missing_learning_rate_names_the_group(tmp_path):
    data = minimal(train=["new", "language_model"], lr={"language_model": 2.0e-5})
    with pytest.raises(ValueError, match=r"stage 'align': no learning rate for \['new'\]"):
        load_recipe(write(tmp_path, data))


def test_missing_required_stage_key_is_reported(tmp_path):
    with pytest.raises(ValueError, match="data"):
        load_recipe(write(tmp_path, {"stages": [{"name": "align"}]}))


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    path = write(tmp_path, "stages:\n  - name: align\n    data: [captions.json\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml: invalid YAML"):
        load_recipe(path)


def test_missing_recipe_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(str(tmp_path / "nowhere.yaml"))


def test_overrides_apply_to_a_copy(tmp_path):
    path = str(RECIPES / "paper" / "proxyv-vicuna-7b-clip.yaml")
    recipe = load_recipe(path, ["stages.0.steps=5", "stages.1.lr.language_model=0.00002", "stages.1.batch_size=64",
                                "model.options.proxyv_start_layer=16", f"output_dir={tmp_path}", "features=auto"])
    assert recipe.stages[0].steps == 5
    assert recipe.stages[1].lr == {"new": pytest.approx(4e-5), "language_model": pytest.approx(2e-5)}
    assert recipe.stages[1].batch_size == 64
    assert recipe.model.options["proxyv_start_layer"] == 16
    assert recipe.output_dir == str(tmp_path) and recipe.features == "auto"
    again = load_recipe(path)  # the file itself is unchanged
    assert again.stages[0].steps is None and again.model.options["proxyv_start_layer"] == 12


def test_overrides_are_validated(tmp_path):
    path = str(RECIPES / "paper" / "himix-qwen2-0.5b-siglip.yaml")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        load_recipe(path, ["stages.0.steps=0"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\]"):
        load_recipe(path, ["stages.0.stepz=5"])
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        load_recipe(path, ["stages.0.steps"])


# ----- accelerate configs -----

def test_the_accelerate_configs_are_shipped():
    assert {p.name for p in ACCELERATE.glob("*.yaml")} == set(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name, kind", ACCELERATE_CONFIGS.items())
def test_accelerate_config_loads_with_its_distributed_type(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    path = ACCELERATE / name
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType[kind]
    assert config.num_machines == 1
    if kind == "MULTI_CPU":
        assert config.use_cpu and config.num_processes == 2 and config.mixed_precision == "no"
    else:
        assert not config.use_cpu and config.num_processes >= 2 and config.mixed_precision == "bf16"
    # nested keys become `accelerate launch` options (fsdp_config.x -> --fsdp_x); the loader does not check them
    options = {action.dest for action in launch_command_parser()._actions}
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in options, key
    for key in config.deepspeed_config:
        assert key in options, key
    assert bool(config.fsdp_config) == (kind == "FSDP")
    assert bool(config.deepspeed_config) == (kind == "DEEPSPEED")
    assert f"accelerate launch --config_file recipes/accelerate/{name} -m leanvlm train" in header(path)


def launched_environment(path: Path) -> dict:
    """The environment `accelerate launch --config_file PATH` gives the training processes, from accelerate's own
    launcher code (the same steps as `accelerate.commands.launch.launch_command`, without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed and not args.cpu:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    if (args.use_fsdp or args.multi_gpu) and not args.cpu:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


@pytest.fixture
def restored_environ():
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name, flags", [
    ("ddp.yaml", {"ACCELERATE_MIXED_PRECISION": "bf16"}),
    ("fsdp.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
    ("deepspeed-zero3.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}),
    ("cpu-2proc.yaml", {"ACCELERATE_USE_CPU": "True"}),
])
def test_accelerate_launcher_accepts_config(name, flags, restored_environ):
    for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU"):
        restored_environ.pop(variable, None)
    env = launched_environment(ACCELERATE / name)
    assert {key: env.get(key) for key in flags} == flags
    others = {"ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"} - set(flags)
    assert not any(env.get(key, "false").lower() == "true" for key in others)


def test_fsdp_config_shards_the_llm_mlps_with_fsdp2(restored_environ):
    from accelerate.utils import FullyShardedDataParallelPlugin

    restored_environ.update(launched_environment(ACCELERATE / "fsdp.yaml"))
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables, as each process does
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full sharding
    assert plugin.auto_wrap_policy is not None
    # leanvlm calls decoder layers' submodules, never the layers' forward, so a decoder-layer unit would never be
    # gathered: wrap the MLP class (see the comment in fsdp.yaml).
    assert plugin.transformer_cls_names_to_wrap == ["LlamaMLP"]
    assert not any(name.endswith("DecoderLayer") for name in plugin.transformer_cls_names_to_wrap)
    assert plugin.cpu_ram_efficient_loading is False  # every rank builds the model from its parts
    assert plugin.activation_checkpointing is False  # the recipe's gradient_checkpointing does it


def test_deepspeed_config_is_zero3_without_accumulation(restored_environ):
    from accelerate.utils import DeepSpeedPlugin

    restored_environ.update(launched_environment(ACCELERATE / "deepspeed-zero3.yaml"))
    plugin = DeepSpeedPlugin()  # reads the launcher's ACCELERATE_DEEPSPEED_* variables; needs no deepspeed package
    assert plugin.zero_stage == 3 and plugin.deepspeed_config["zero_optimization"]["stage"] == 3
    assert plugin.zero3_init_flag is False
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_recipe_values_yaml_reads_loosely_are_normalised_or_named():
    from leanvlm.train.recipe import recipe_from_dict

    stage = {"name": "s", "data": "d.json", "train": ["new"], "lr": {"new": "1e-3"}}
    recipe = recipe_from_dict({"stages": [stage], "mixed_precision": False})
    assert recipe.stages[0].lr == {"new": 0.001} and recipe.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"unknown parameter group\(s\) \['connector'\]; a himix model"):
        recipe_from_dict({"stages": [dict(stage, train=["connector"], lr={"connector": 1e-3})]})
    with pytest.raises(ValueError, match="learning rate of 'new' must be a number"):
        recipe_from_dict({"stages": [dict(stage, lr={"new": "fast"})]})
    with pytest.raises(ValueError, match=r"no learning rate for \['language_model'\]"):
        recipe_from_dict({"stages": [dict(stage, train=["new", "language_model"])]})
