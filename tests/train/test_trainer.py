"""The staged trainer on a tiny model: stages train only their groups, a resumed run reproduces an uninterrupted
one, LoRA merges into the saved model, and two processes match one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import bpe_tokenizer, text_config, vision_config

from leanvlm.data.synthetic import synthesize
from leanvlm.train.recipe import recipe_from_dict
from leanvlm.train.trainer import Trainer


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import AutoModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    LlamaForCausalLM(text_config("llama")).save_pretrained(root / "llm")
    bpe_tokenizer().save_pretrained(root / "llm")
    AutoModel.from_config(vision_config("siglip")).save_pretrained(root / "vision")
    synthesize(str(root / "data"), train=24, val=8, test=0, seed=0, image_size=48)
    return root


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield


def recipe_dict(parts, out, decoder="himix", lora=False, **top):
    instruct = {"name": "instruct", "data": str(parts / "data" / "train.json"), "train": ["new", "language_model"],
                "lr": {"new": 1e-3, "language_model": 1e-3}, "steps": 3, "batch_size": 4, "grad_accum": 2}
    if lora:
        instruct["lora"] = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return {
        "output_dir": str(out),
        "model": {"language_model": str(parts / "llm"), "vision_model": str(parts / "vision"), "decoder": decoder},
        "mixed_precision": "no",
        "log_every": 1,
        "save_every": 1,
        "keep_last": 10,
        "eval": {"data": str(parts / "data" / "val.json"), "every": 2, "max_samples": 8, "batch_size": 4},
        "stages": [
            {"name": "align", "data": str(parts / "data" / "captions.json"), "template": "plain", "train": ["new"],
             "lr": {"new": 1e-2}, "steps": 3, "batch_size": 4, "warmup_ratio": 0.5},
            instruct,
        ],
        **top,
    }


def log_of(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


def test_stages_train_only_their_groups(parts, tmp_path):
    recipe = recipe_from_dict(recipe_dict(parts, tmp_path / "run", save_every=0))
    stale = tmp_path / "run" / "checkpoints" / "step-0000099"  # an earlier run's: a fresh run must not keep it
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text('{"stage": 1, "step": 99, "global_step": 99}')
    trainer = Trainer(recipe, progress=False)
    before = {k: v.clone() for k, v in build_state(recipe).items()}
    summary = trainer.run()
    after = weights(tmp_path / "run")
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("decoder.vision_kv") for k in changed)
    assert any(k.startswith("language_model.") for k in changed)  # the instruct stage trains the LLM
    assert not any(k.startswith("vision_model.") for k in changed)  # the encoder stays frozen
    log = log_of(tmp_path / "run")
    assert [e["global_step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert set(log[0]["lr"]) == {"vision_kv"} and set(log[-1]["lr"]) == {"vision_kv", "language_model"}
    assert "val_loss" in log[1] and "val_loss" not in log[0]
    assert summary["stages"][0]["trainable_parameters"] == sum(
        v.numel() for k, v in after.items() if k.startswith("decoder.vision_kv"))
    # only the last checkpoints are kept (save_every 0: one per stage end)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-0000003", "step-0000006"]


def test_validation_answers_are_logged_plotted_and_reported_without_a_terminal(parts, tmp_path, capsys):
    from leanvlm.data.llava import read_records
    from leanvlm.eval.exact_match import evaluate

    top = {"save_every": 0, "eval": {"data": str(parts / "data" / "val.json"), "every": 2, "max_samples": 8,
                                     "batch_size": 4, "answers": 7}}
    trainer = Trainer(recipe_from_dict(recipe_dict(parts, tmp_path / "run", **top)), progress=True)
    trainer.run()
    log = log_of(tmp_path / "run")
    validated = [e for e in log if "val_loss" in e]
    assert [e["global_step"] for e in validated] == [2, 3, 5, 6]  # every 2 steps and at each stage's end
    for entry in validated:
        result = entry["val_exact_match"]
        assert result["samples"] == 7 and 0 <= result["accuracy"] <= 1
        assert set(result["families"]) == {r["family"] for r in read_records(str(parts / "data" / "val.json"))[:7]}
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000
    # not a terminal: plain progress lines instead of a live display
    printed = capsys.readouterr().out
    assert "instruct: 3/3" in printed and "val exact match" in printed
    # the cached features answer exactly as the images do
    model, processor = trainer.model.eval(), trainer.processor
    records = read_records(str(parts / "data" / "val.json"))
    root = str(parts / "data")
    from_images = evaluate(model, processor, records, root, 4, 4, progress=False)
    from_cache = evaluate(model, processor, records, root, 4, 4, progress=False, feature_cache=trainer.feature_cache)
    assert from_cache["predictions"] == from_images["predictions"]
    # and the context built from the cache is the one the encoder builds from the pixels
    from PIL import Image

    from leanvlm.eval.exact_match import cached_context

    paths = [str(parts / "data" / r["image"]) for r in records[:3]]
    pixels, crops = processor.preprocess_images([Image.open(p).convert("RGB") for p in paths])
    with torch.no_grad():
        direct = model.encode_images(pixels, crops)
        cached = cached_context(model, trainer.feature_cache, paths)
    torch.testing.assert_close(cached.tokens, direct.tokens)
    assert cached.crops == direct.crops and cached.grid == direct.grid


def build_state(recipe):
    """The untrained weights a run of `recipe` starts from (the trainer seeds the same way)."""
    from transformers import set_seed

    from leanvlm.train.trainer import build_model

    set_seed(recipe.seed)
    return build_model(recipe)[0].state_dict()


@pytest.mark.parametrize("lora", [False, True])
def test_resumed_run_reproduces_the_uninterrupted_one(parts, tmp_path, lora):
    full = recipe_from_dict(recipe_dict(parts, tmp_path / "full", lora=lora))
    Trainer(full, progress=False).run()
    expected_log, expected = log_of(tmp_path / "full"), weights(tmp_path / "full")
    # A checkpoint stores what the stages so far train (the frozen encoder and, in stage 1, the LLM are rebuilt)
    stored = {step: load_file(tmp_path / "full" / "checkpoints" / f"step-{step:07d}" / "model.safetensors").keys()
              for step in (2, 4)}
    assert stored[2] and all(key.startswith("decoder.") for key in stored[2])
    assert not any(key.startswith("vision_model.") for key in stored[4])
    assert sum(key.startswith("language_model.") for key in stored[4]) > 0

    # Resume from a checkpoint inside stage 1 and from one inside stage 2 (LoRA adapters live in that checkpoint).
    for step in (2, 4):
        out = tmp_path / f"resumed-{step}"
        recipe = recipe_from_dict(recipe_dict(parts, out, lora=lora))
        Trainer(recipe, progress=False).run()  # the run that gets "interrupted" after `step` steps
        for name in os.listdir(out / "checkpoints"):
            if int(name.split("-")[1]) > step:
                shutil.rmtree(out / "checkpoints" / name)
        os.remove(out / "model" / "model.safetensors")
        Trainer(recipe_from_dict(recipe_dict(parts, out, lora=lora)), progress=False).run(resume=True)
        log = log_of(out)
        assert [e["global_step"] for e in log] == [e["global_step"] for e in expected_log]
        for got, want in zip(log, expected_log, strict=True):
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), (step, got["global_step"])
        resumed = weights(out)
        assert resumed.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=0)
    if lora:  # adapters merged away: a plain checkpoint whose LLM weights moved
        assert not any("lora_" in key for key in expected)


def test_a_checkpoint_that_lacks_what_the_recipe_trained_is_refused(parts, tmp_path):
    out = tmp_path / "run"
    Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).run()
    first_stage = out / "checkpoints" / "step-0000003"  # the LLM frozen there: its weights were left out
    changed = recipe_dict(parts, out)
    changed["stages"][0]["train"] = ["new", "language_model"]
    changed["stages"][0]["lr"]["language_model"] = 1e-4
    with pytest.raises(ValueError, match=r"lacks .* trained parameter.*resume with the recipe that wrote it"):
        Trainer(recipe_from_dict(changed), progress=False).run(resume=str(first_stage))


def test_resume_needs_a_checkpoint(parts, tmp_path):
    recipe = recipe_from_dict(recipe_dict(parts, tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        Trainer(recipe, progress=False).run(resume=True)


def test_two_processes_match_one_with_the_same_global_batch(parts, tmp_path):
    import yaml

    single = recipe_dict(parts, tmp_path / "one", save_every=0)
    Trainer(recipe_from_dict(single), progress=False).run()
    double = dict(single, output_dir=str(tmp_path / "two"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(double))
    # `accelerate launch --cpu` starts several processes only through MPI; torchrun starts them directly, and
    # ACCELERATE_USE_CPU makes accelerate join them over gloo.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "leanvlm", "train", str(path), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    initial = build_state(recipe_from_dict(single))
    assert any(not torch.equal(one[key], initial[key]) for key in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4)
    losses_one = [e["loss"] for e in log_of(tmp_path / "one")]
    losses_two = [e["loss"] for e in log_of(tmp_path / "two")]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)



def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(parts):
    from accelerate import Accelerator

    from leanvlm.data.llava import Collator, LLaVADataset
    from leanvlm.train.trainer import accumulate_gradients, build_model

    recipe = recipe_from_dict(recipe_dict(parts, parts / "unused"))
    model, processor = build_model(recipe)
    dataset = LLaVADataset(str(parts / "data" / "captions.json"), processor, template="plain")
    samples = [dataset[i] for i in range(6)]
    assert len({len(s["labels"]) for s in samples}) > 1  # unequal token counts make the weighting matter
    collate = Collator(processor)

    model.zero_grad()
    loss = model(**collate(samples), return_logits=False).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    step_loss = accumulate_gradients(model, [collate(samples[:1]), collate(samples[1:])], Accelerator(cpu=True))
    assert step_loss == pytest.approx(loss.item(), abs=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-4)


class Payload:
    """Unpickling this would create `marker`: what a checkpoint from an untrusted source could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_corrupt_or_unsafe_checkpoint_is_refused_naming_the_file_and_runs_nothing(parts, tmp_path):
    import pickle

    out = tmp_path / "run"
    Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).run()
    [*_, last] = sorted((out / "checkpoints").iterdir())
    rng = last / "random_states_0.pkl"
    good = rng.read_bytes()
    marker = tmp_path / "code-ran"
    rng.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(ValueError, match=r"random_states_0\.pkl cannot be loaded safely"):
        Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).run(resume=str(last))
    assert not marker.exists()
    rng.write_bytes(good)
    weights_file = last / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[: weights_file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated or corrupt"):
        Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).run(resume=str(last))


KILLED_DRIVER = """
import json, sys, time
import accelerate
from leanvlm.train.recipe import recipe_from_dict
from leanvlm.train.trainer import Trainer

recipe, kill_at, marker = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
save_state = accelerate.Accelerator.save_state

def save_then_hang(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    if str(output_dir).endswith(f"step-{kill_at:07d}.tmp"):  # written, not yet renamed into place
        open(marker, "w").close()
        time.sleep(600)
    return result

accelerate.Accelerator.save_state = save_then_hang
Trainer(recipe_from_dict(recipe), progress=False).run()
"""


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(parts, tmp_path):
    """SIGKILL while checkpoint 4 is being written (its files on disk, the directory not yet renamed): the resumed
    run starts from checkpoint 3 and reproduces the uninterrupted run's losses and weights."""
    import signal

    Trainer(recipe_from_dict(recipe_dict(parts, tmp_path / "full")), progress=False).run()
    out = tmp_path / "killed"
    marker = tmp_path / "writing-checkpoint-4"
    driver = subprocess.Popen([sys.executable, "-c", KILLED_DRIVER, json.dumps(recipe_dict(parts, out)), "4",
                               str(marker)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():  # the driver signals the chosen point with a file
            assert driver.poll() is None, "the training run ended before checkpoint 4"
            assert time.monotonic() < deadline, "the training run never reached checkpoint 4"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    assert (out / "checkpoints" / ".step-0000004.tmp").is_dir()  # the half-done checkpoint is left behind
    complete = Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).checkpoints()
    assert [Path(p).name for p in complete] == ["step-0000001", "step-0000002", "step-0000003"]
    Trainer(recipe_from_dict(recipe_dict(parts, out)), progress=False).run(resume=True)
    expected, resumed = log_of(tmp_path / "full"), log_of(out)
    assert [e["global_step"] for e in resumed] == [e["global_step"] for e in expected]
    for got, want in zip(resumed, expected, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
    for key, value in weights(tmp_path / "full").items():
        torch.testing.assert_close(weights(out)[key], value, atol=1e-6, rtol=0)
