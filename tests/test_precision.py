"""`auto` precision: bf16 exactly where the CPU (or GPU) multiplies it natively, and the trainer computes in it."""

import os

import pytest
import torch
from safetensors import safe_open

from leanvlm import precision
from leanvlm.precision import native_bf16, resolve_dtype, resolve_mixed_precision


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo") or os.uname().machine != "x86_64",
                    reason="reads the x86 CPU flags Linux reports")
def test_native_bf16_follows_the_cpu_flags():
    flags = cpu_flags()
    assert native_bf16("cpu") == bool({"amx_bf16", "avx512_bf16"} & flags)


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_by_the_hardware_and_explicit_values_pass(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device=None: native)
    assert resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert resolve_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    for value in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(value) == value
    assert resolve_dtype("float16") == torch.float16


@pytest.mark.parametrize("native", [True, False])
def test_bench_and_loadtest_settings_name_the_dtype_auto_resolves_to(monkeypatch, native):
    from leanvlm.measure.bench import BenchSettings
    from leanvlm.serve.loadtest import LoadSettings

    monkeypatch.setattr(precision, "native_bf16", lambda device=None: native)
    expected = "bfloat16" if native else "float32"
    assert BenchSettings().dtype == LoadSettings().dtype == expected  # auto is the default
    assert BenchSettings(dtype="float16").dtype == "float16"
    assert LoadSettings(dtype="float32").dtype == "float32"


@pytest.mark.parametrize("native", [True, False])
def test_the_trainer_computes_and_caches_features_in_the_resolved_precision(monkeypatch, tmp_path, native):
    from accelerate.state import AcceleratorState, PartialState
    from tiny import bpe_tokenizer, text_config, vision_config
    from transformers import AutoModel, LlamaForCausalLM

    from leanvlm.data.synthetic import synthesize
    from leanvlm.train.recipe import recipe_from_dict
    from leanvlm.train.trainer import Trainer

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    monkeypatch.setattr(precision, "native_bf16", lambda device=None: native)
    LlamaForCausalLM(text_config("llama")).save_pretrained(tmp_path / "llm")
    bpe_tokenizer().save_pretrained(tmp_path / "llm")
    AutoModel.from_config(vision_config("siglip")).save_pretrained(tmp_path / "vision")
    synthesize(str(tmp_path / "data"), train=4, val=0, test=0, seed=0, image_size=32)
    recipe = recipe_from_dict({
        "output_dir": str(tmp_path / "run"), "features": "auto",
        "model": {"language_model": str(tmp_path / "llm"), "vision_model": str(tmp_path / "vision")},
        "stages": [{"name": "train", "data": str(tmp_path / "data" / "train.json"), "train": ["new"],
                    "lr": {"new": 1e-3}, "steps": 1, "batch_size": 2}]})
    assert recipe.mixed_precision == "auto"  # the default
    trainer = Trainer(recipe, progress=False)
    summary = trainer.run()
    assert summary["mixed_precision"] == trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    cache_dir = tmp_path / "run" / "features"
    [shard] = [name for name in os.listdir(cache_dir) if name.endswith(".safetensors")]
    with safe_open(str(cache_dir / shard), framework="pt") as f:
        dtypes = {f.get_tensor(key).dtype for key in f.keys()}  # noqa: SIM118 (not a dict)
    assert dtypes == {torch.bfloat16 if native else torch.float32}
