"""FSDP2 on two CPU processes (gloo, torchrun): leanvlm's own forward runs on a model sharded as
recipes/accelerate/fsdp.yaml shards it (each LLM MLP its own unit, the rest the root unit), two optimizer steps give
the weights of one process on the same batch, and `full_state_dict` (what the trainer saves the final model with)
gathers the shards into a checkpoint that, saved as the trainer saves it, holds the keys a normal save holds (tied
word embeddings once) and reloads with the same logits."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from tiny import build, left_padded, pixels, prompt

from leanvlm import LeanVLMForConditionalGeneration

DRIVER = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from leanvlm import LeanVLMForConditionalGeneration
from leanvlm.train.trainer import full_state_dict

source, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
model = LeanVLMForConditionalGeneration.from_pretrained(source).train()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in model.language_model.model.layers:
    fully_shard(layer.mlp, mesh=mesh)
fully_shard(model, mesh=mesh)
assert sum(p.to_local().numel() for p in model.parameters()) < sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
batch = torch.load(source + "/batch.pt", weights_only=True)
for _ in range(2):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
state = full_state_dict(model)
if dist.get_rank() == 0:  # as the trainer saves its final model
    model.save_pretrained(out, state_dict=state)
dist.destroy_process_group()
"""


def train_two_steps(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def saved_keys(directory) -> set[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize(("decoder", "text"), [("vanilla", "llama"), ("himix", "llama"), ("vanilla", "llama3")])
def test_two_fsdp2_cpu_processes_train_and_gather_as_one_process(tmp_path, decoder, text):
    model = build(decoder, text)  # llama3: tied word embeddings
    model.save_pretrained(tmp_path / "start")
    ids, mask = left_padded([prompt(model, 5, "<image>", 7, 8, 9), prompt(model, 9, "<image>", 10, 11)])
    labels = ids.masked_fill((ids == model.config.image_token_id) | (mask == 0), -100)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(2), "labels": labels}
    torch.save(batch, tmp_path / "start" / "batch.pt")
    # --standalone: a rendezvous on a free local port; --no-python runs `python -c DRIVER` in each process
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--no-python", sys.executable, "-c", DRIVER, str(tmp_path / "start"), str(tmp_path / "sharded")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert saved_keys(tmp_path / "sharded") == saved_keys(tmp_path / "start")
    tied = model.config.text_config.tie_word_embeddings
    assert ("language_model.lm_head.weight" in saved_keys(tmp_path / "sharded")) is not tied
    single = train_two_steps(LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "start").train(), batch)
    sharded = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "sharded")
    start = LeanVLMForConditionalGeneration.from_pretrained(tmp_path / "start").state_dict()
    assert any(not torch.equal(value, start[key]) for key, value in single.state_dict().items())  # it trained
    for key, value in single.state_dict().items():
        torch.testing.assert_close(sharded.state_dict()[key], value, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(sharded.eval()(ids, mask, pixel_values=pixels(2)).logits,
                                   single.eval()(ids, mask, pixel_values=pixels(2)).logits, atol=1e-6, rtol=0)
