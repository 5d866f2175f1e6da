"""Staged training on accelerate: each recipe stage trains chosen parameter groups (optionally the LLM through LoRA)
with AdamW, per-group learning rates, a cosine schedule with warm-up, gradient accumulation and mixed precision.

The data order is a pure function of (seed, stage, step), checkpoints hold the parameters the stages so far can have
changed (the rest is what the recipe builds again), the optimizer, scheduler and RNG states, and the loss of every
optimizer step is normalised by the scored tokens of the whole global batch, so a run resumed from a checkpoint, or
spread over several processes, reproduces a single uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import send_to_device

from leanvlm.data.llava import Collator, LLaVADataset, data_image_paths
from leanvlm.decoders.base import IGNORE_INDEX
from leanvlm.modeling import check_weight_files
from leanvlm.precision import resolve_mixed_precision
from leanvlm.train.recipe import NEW, Recipe, StageSpec, recipe_to_dict

STATE_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"
CURVES_FILE = "training.png"
ANSWER_TOKENS = 8  # new tokens per validation answer (ShapesVQA answers are one word or number)


@dataclass
class Position:
    """Where a run stands: optimizer steps done in stage `stage`."""

    stage: int = 0
    step: int = 0


@dataclass
class PreparedStage:
    """A stage ready to train: what accelerate prepared, the trainable parameters and the stage's sample order."""

    spec: StageSpec
    model: torch.nn.Module  # wrapped by accelerate (DDP over several processes)
    optimizer: AcceleratedOptimizer
    scheduler: AcceleratedScheduler
    trainable: list[torch.nn.Parameter]
    steps: int
    order: list[int]  # sample indices: batch_size * grad_accum per optimizer step


def build_model(recipe: Recipe):
    """The model and processor a recipe starts from (fp32 master weights)."""
    from transformers import AutoTokenizer

    from leanvlm.hub import PARTS, pretrained_part
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    spec = recipe.model
    if spec.init_from:
        model = LeanVLMForConditionalGeneration.from_pretrained(spec.init_from, dtype=torch.float32)
        return model, LeanVLMProcessor.from_pretrained(spec.init_from)
    source = pretrained_part(spec.language_model) if spec.language_model in PARTS else spec.language_model
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LeanVLMForConditionalGeneration.from_parts(source, spec.vision_model, decoder=spec.decoder,
                                                       tokenizer=tokenizer, dtype=torch.float32, **spec.options)
    return model, LeanVLMProcessor.for_model(model, tokenizer)


def expand_groups(model, names) -> list[str]:
    """Recipe group names -> the model's parameter-group names ("new": the decoder policy's own groups)."""
    groups = model.parameter_groups()
    policy = list(model.decoder.parameter_groups())
    expanded = []
    for name in names:
        for group in policy if name == NEW else [name]:
            if group not in groups:
                raise ValueError(f"Unknown parameter group {name!r}; this {model.config.decoder} model has "
                                 f"{', '.join([NEW, *groups])}.")
            if group not in expanded:
                expanded.append(group)
    return expanded


def group_lr(stage: StageSpec, group: str, policy_groups) -> float:
    if group in stage.lr:
        return stage.lr[group]
    if group in policy_groups and NEW in stage.lr:
        return stage.lr[NEW]
    raise ValueError(f"Stage {stage.name!r}: no learning rate for {group!r}.")


def add_lora(model, lora) -> None:
    """LoRA adapters on the language model's linear layers, in place (the decoder keeps calling the same modules)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules))
    inject_adapter_in_model(config, model.language_model)


def merge_lora(model) -> None:
    """Fold LoRA adapters into their base weights and put the plain layers back."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.language_model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.language_model.get_submodule(parent_name) if parent_name else model.language_model
            setattr(parent, child, module.get_base_layer())


def optimizer_groups(model, stage: StageSpec) -> list[dict]:
    """Freeze everything, then unfreeze the stage's groups; one AdamW group per (parameter group, decay or not)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    policy = list(model.decoder.parameter_groups())
    chosen = expand_groups(model, stage.train)
    groups = model.parameter_groups()
    result = []
    for group in chosen:
        params = groups[group]
        if group == "language_model" and stage.lora is not None:
            params = [p for n, p in model.language_model.named_parameters() if "lora_" in n]
        lr = group_lr(stage, group, policy)
        for decay in (True, False):
            selected = [p for p in params if (p.ndim >= 2) == decay]
            for p in selected:
                p.requires_grad_(True)
            if selected:
                result.append({"params": selected, "lr": lr, "weight_decay": stage.weight_decay if decay else 0.0,
                               "name": group})
    return result


def changed_parameters(model, stages: list[StageSpec]) -> set[int]:
    """Ids of the parameters that `stages` (those run so far) can have changed: their trained groups, the whole
    language model once a stage trains LoRA adapters on it (merged into its weights at the stage's end), and what
    trains now (the running stage's adapters). Every other parameter is what `build_model(recipe)` gives again."""
    groups = model.parameter_groups()
    changed = {id(p) for p in model.parameters() if p.requires_grad}
    for stage in stages:
        for group in [*expand_groups(model, stage.train), *(["language_model"] if stage.lora is not None else [])]:
            changed.update(id(p) for p in groups[group])
    return changed


def checkpoint_weight_names(model, stages: list[StageSpec]) -> tuple[set[str], list[list[str]]]:
    """What a checkpoint taken during the last of `stages` stores: (the names of unchanged parameters, left out;
    the names of each changed parameter, one of which must be in it: tied parameters are stored once)."""
    changed = changed_parameters(model, stages)
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    left_out = {name for key, aliases in names.items() if key not in changed for name in aliases}
    return left_out, [aliases for key, aliases in names.items() if key in changed]


def sample_order(num_samples: int, needed: int, seed: int, stage: int, lengths=None, batch_size: int = 1):
    """The first `needed` sample indices of a stage: one seeded permutation per epoch (length-grouped when lengths
    are given)."""
    order, epoch = [], 0
    while len(order) < needed:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stage * 1009 + epoch)
        if lengths is not None:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            order += get_length_grouped_indices(lengths, batch_size, generator=generator)
        else:
            order += torch.randperm(num_samples, generator=generator).tolist()
        epoch += 1
    return order[:needed]


def stage_steps(stage: StageSpec, num_samples: int) -> int:
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.epochs * num_samples / (stage.batch_size * stage.grad_accum)))


def scored_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def step_status(entry: dict) -> str:
    """A log entry as the progress bar's status text."""
    status = f"loss {entry['loss']:.4f}  lr {max(entry['lr'].values()):.2e}  {entry['tokens_per_s']:.0f} tok/s"
    if "val_loss" in entry:
        status += f"  val {entry['val_loss']:.4f}"
    if "val_exact_match" in entry:
        status += f"  val exact match {entry['val_exact_match']['accuracy']:.1%}"
    return status


def accumulate_gradients(model, micro_batches: list[dict], accelerator) -> float:
    """Backward over this process's micro-batches so that the gradients (after DDP's average over processes) are
    those of the token-mean loss over the whole global batch; returns that loss."""
    local = torch.stack([scored_tokens(b) for b in micro_batches]).sum()
    total = accelerator.reduce(local.clone(), reduction="sum").clamp(min=1)
    loss_sum = torch.zeros((), device=local.device)
    for m, batch in enumerate(micro_batches):
        count = scored_tokens(batch)
        sync = accelerator.no_sync(model) if m < len(micro_batches) - 1 else nullcontext()
        with sync, accelerator.autocast():
            loss = model(**batch, return_logits=False).loss
        # The model's loss is a mean over this micro-batch's tokens: re-weight it by its share of the global
        # tokens, times the process count that DDP's gradient average divides by.
        accelerator.backward(loss * (count * accelerator.num_processes / total))
        loss_sum += loss.detach().float() * count
    return float(accelerator.reduce(loss_sum, reduction="sum") / total)


def full_state_dict(model) -> dict:
    """The model's whole state dict, also when FSDP2 has sharded its parameters into DTensors: then every process
    must call this (the shards are gathered, onto the CPU; tied parameters such as tied word embeddings share one
    tensor, as in the plain state dict); otherwise it is the plain `state_dict()`."""
    from torch.distributed.tensor import DTensor

    if any(hasattr(p, "ds_id") for p in model.parameters()) or any(
            type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError("The model is sharded by DeepSpeed ZeRO-3 or FSDP1, whose shards leanvlm does not gather "
                         "into the final model; use FSDP2 (fsdp_version: 2, recipes/accelerate/fsdp.yaml).")
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Each name of a tied parameter is gathered into its own copy; one tensor again lets save_pretrained drop the tied
    # names (lm_head.weight) as it does for an unsharded model, instead of storing the weights twice.
    first = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state:
            state[name] = state[first.setdefault(id(param), name)]
    return state


def check_checkpoint_files(checkpoint: str) -> None:
    """Before resuming: every weight file reads, and every pickled state (optimizer, scheduler, RNG) loads the way
    accelerate loads it, with `weights_only=True`, so no code in it runs; a truncated, corrupt or unsafe file is an
    error that names it."""
    from accelerate.utils import load

    check_weight_files(checkpoint)
    for name in sorted(os.listdir(checkpoint)):
        if name.endswith((".bin", ".pkl", ".pt")):
            path = os.path.join(checkpoint, name)
            try:
                try:  # memory-mapped: the check reads the pickle, not a large optimizer state's tensors
                    load(path, map_location="cpu", mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    load(path, map_location="cpu")  # a file in torch's legacy format cannot be mapped
            except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
                raise ValueError(f"{path} cannot be loaded safely ({type(exc).__name__}: {str(exc)[:200]}); resume "
                                 "from another checkpoint or restore the file.") from exc


def check_checkpoint_weights(checkpoint: str, model, stages: list[StageSpec]) -> None:
    """The checkpoint stores every parameter the stages up to its own can have changed (see `changed_parameters`)."""
    from safetensors import safe_open

    stored = set()
    for name in os.listdir(checkpoint):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(checkpoint, name), framework="pt") as f:
                stored.update(key.removeprefix("module.") for key in f.keys())  # noqa: SIM118 (not a dict)
    if not stored:
        return  # sharded (FSDP) checkpoints keep their weights in a folder of their own
    _, needed = checkpoint_weight_names(model, stages)
    missing = [aliases[0] for aliases in needed if not stored.intersection(aliases)]
    if missing:
        raise ValueError(f"{checkpoint} lacks {len(missing)} trained parameter(s) ({', '.join(missing[:3])}...): it "
                         "was written by another recipe; resume with the recipe that wrote it.")


class Trainer:
    """Runs a recipe. `progress`: show a live display (main process only)."""

    def __init__(self, recipe: Recipe, accelerator=None, progress: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

        self.recipe = recipe
        self.accelerator = accelerator or Accelerator(
            mixed_precision=resolve_mixed_precision(recipe.mixed_precision),
            # Batches are global and split over processes, so the schedule advances once per optimizer step.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            # Stages may leave groups unused in a step (e.g. a text-only batch with proxyv); DDP must tolerate it.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.mixed_precision = self.accelerator.mixed_precision  # "no", "bf16" or "fp16"
        self.show_progress = progress and self.accelerator.is_main_process
        self.checkpoint_root = os.path.join(recipe.output_dir, "checkpoints")
        self.feature_cache = None

    # ----- set-up -----
    def _datasets(self, model, processor) -> tuple[list[LLaVADataset], LLaVADataset | None]:
        recipe = self.recipe
        cache = self.feature_cache = self._feature_cache(model, processor)
        kwargs = dict(image_root=recipe.image_root, max_length=recipe.max_length, feature_cache=cache,
                      feature_keys=model.config.feature_keys)
        stages = [LLaVADataset(stage.data, processor, template=stage.template, **kwargs) for stage in recipe.stages]
        evaluation = None
        if recipe.eval is not None:
            evaluation = LLaVADataset(recipe.eval.data, processor, template=recipe.stages[-1].template, **kwargs)
        return stages, evaluation

    def _feature_cache(self, model, processor):
        """Encode every image of the recipe once (main process), then serve cached features."""
        import copy

        from leanvlm.data.features import FeatureCache, encode_images_to_cache, feature_signature

        recipe = self.recipe
        if recipe.features is None:
            return None
        directory = recipe.features
        if directory == "auto":
            directory = os.path.join(recipe.output_dir, "features")
        # Features in the dtype the decoder computes in: bf16 autocast consumes bf16 features unchanged.
        encoder = copy.deepcopy(model.vision_model).eval()
        encoder.to(torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32)
        select, tome_r = model.config.vision_feature_select, model.config.tome_r
        cache = FeatureCache(directory, feature_signature(encoder, select, processor, tome_r))
        if self.accelerator.is_main_process:
            files = [s.data for s in recipe.stages] + ([recipe.eval.data] if recipe.eval else [])
            paths = sorted({p for f in files for p in data_image_paths(f, recipe.image_root)})
            cached = sum(cache.holds(p, model.config.feature_keys) for p in paths)
            with self._progress("encoding images", len(paths), completed=cached) as advance:
                encode_images_to_cache(encoder, processor, model.config.feature_keys, select, paths, cache,
                                       progress=advance, tome_r=tome_r)
        self.accelerator.wait_for_everyone()
        return FeatureCache(directory, cache.signature)  # re-read the index the main process wrote

    @contextmanager
    def _progress(self, label: str, total: int, completed: int = 0, status: bool = False):
        """A live progress bar on the main process, yielding `advance(n, status="")`; a no-op when progress is off.
        `status`: a column for the text passed to `advance` (the stage's loss and rate); without it the bar vanishes
        when done. When the output is not a terminal (a log file, CI), it prints a line at every tenth of the way
        and whenever the status has validation results instead."""
        if not self.show_progress:
            yield lambda n, status="": None
            return
        import sys

        if not sys.stdout.isatty():
            done, started, every = completed, time.perf_counter(), max(1, total // 10)

            def report(n: int, status: str = "") -> None:
                nonlocal done
                done += n
                if done % every < n or done == total or "val" in status:
                    elapsed = time.perf_counter() - started
                    print(f"{label.removeprefix('[bold]')}: {done}/{total} ({elapsed:.0f} s) {status}".rstrip(),
                          flush=True)

            yield report
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        status_column = [TextColumn("{task.fields[status]}")] if status else []
        columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), *status_column, TimeRemainingColumn())
        with Progress(*columns, transient=not status) as progress:
            task = progress.add_task(label, total=total, completed=completed, status="")
            yield lambda n, status="": progress.update(task, advance=n, status=status)

    # ----- checkpoints -----
    def checkpoints(self) -> list[str]:
        if not os.path.isdir(self.checkpoint_root):
            return []
        names = sorted(n for n in os.listdir(self.checkpoint_root) if n.startswith("step-"))
        return [os.path.join(self.checkpoint_root, n) for n in names
                if os.path.isfile(os.path.join(self.checkpoint_root, n, STATE_FILE))]

    def _save_checkpoint(self, model, position: Position, global_step: int) -> None:
        accelerator = self.accelerator
        final = os.path.join(self.checkpoint_root, f"step-{global_step:07d}")
        temporary = os.path.join(self.checkpoint_root, f".step-{global_step:07d}.tmp")
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        accelerator.wait_for_everyone()
        left_out, _ = checkpoint_weight_names(model, self.recipe.stages[: position.stage + 1])

        def drop_unchanged(_models, weights, _directory):  # a frozen 135M-parameter LLM is 540 MB per checkpoint
            for state in weights:  # plain state dicts only: FSDP writes its own shards
                for key in [k for k in state if k.removeprefix("module.") in left_out]:
                    del state[key]

        hook = accelerator.register_save_state_pre_hook(drop_unchanged)
        try:
            accelerator.save_state(temporary, safe_serialization=True)
        finally:
            hook.remove()
        accelerator.wait_for_everyone()  # every rank's RNG state is in before the directory moves
        if accelerator.is_main_process:
            with open(os.path.join(temporary, STATE_FILE), "w") as f:
                json.dump({"stage": position.stage, "step": position.step, "global_step": global_step}, f)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temporary, final)  # a checkpoint directory is complete or absent
            for old in self.checkpoints()[: -self.recipe.keep_last]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _drop_checkpoints_after(self, start: Position | None) -> None:
        """A fresh run starts without checkpoints; a resumed one drops those after its start, which belong to the
        abandoned future and would otherwise be resumed from, or outlive the new ones when pruning."""
        for path in self.checkpoints():
            position = self.read_position(path)
            if start is None or (position.stage, position.step) > (start.stage, start.step):
                shutil.rmtree(path)

    @staticmethod
    def read_position(checkpoint: str) -> Position:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}).")
        with open(path) as f:
            state = json.load(f)
        return Position(state["stage"], state["step"])

    # ----- the run -----
    def run(self, resume: str | bool | None = None) -> dict:
        """Train every stage; save the final model to `<output_dir>/model` and keep it in `self.model` (with
        `self.processor`). `resume`: True for the latest checkpoint in output_dir, or a checkpoint directory. Returns
        a summary (also in `<output_dir>/summary.json`)."""
        from transformers import set_seed

        recipe, accelerator = self.recipe, self.accelerator
        checkpoint = None
        if resume:
            checkpoint = resume if isinstance(resume, str) else (self.checkpoints() or [None])[-1]
            if checkpoint is None:
                raise FileNotFoundError(f"No checkpoint to resume from in {self.checkpoint_root}.")
            check_checkpoint_files(checkpoint)  # before the run directory is touched
        start = self.read_position(checkpoint) if checkpoint else Position()
        for stage in recipe.stages:
            if stage.batch_size % accelerator.num_processes:
                raise ValueError(f"Stage {stage.name!r}: batch_size {stage.batch_size} does not split evenly over "
                                 f"{accelerator.num_processes} processes; batch_size is the global micro-batch.")
        set_seed(recipe.seed)
        model, processor = build_model(recipe)
        processor.template = recipe.stages[-1].template  # the template validation answers are asked in
        if recipe.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        datasets, evaluation = self._datasets(model, processor)
        if accelerator.is_main_process:
            os.makedirs(recipe.output_dir, exist_ok=True)
            self._drop_checkpoints_after(start if checkpoint else None)
            # summary.json marks a finished run of recipe.json (compare reuses such runs): not until this one ends
            with suppress(FileNotFoundError):
                os.remove(os.path.join(recipe.output_dir, "summary.json"))
            with open(os.path.join(recipe.output_dir, "recipe.json"), "w") as f:
                json.dump(recipe_to_dict(recipe), f, indent=2)
            self._trim_log(start, fresh=checkpoint is None)
        summary = {"stages": [], "processes": accelerator.num_processes, "mixed_precision": self.mixed_precision}
        done_stages = zip(recipe.stages[: start.stage], datasets[: start.stage], strict=True)
        global_step = sum(stage_steps(stage, len(dataset)) for stage, dataset in done_stages)
        for index in range(start.stage, len(recipe.stages)):
            resume_here = checkpoint if index == start.stage else None
            model, stage_summary, global_step = self._run_stage(
                index, model, processor, datasets[index], evaluation, global_step, resume_here,
                start.step if resume_here else 0)
            summary["stages"].append(stage_summary)
        summary["model"] = final = os.path.join(recipe.output_dir, "model")
        state = full_state_dict(model)  # on every process: FSDP2 shards are gathered here
        if accelerator.is_main_process:
            model.save_pretrained(final, state_dict=state)
            processor.save_pretrained(final)
            with open(os.path.join(recipe.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            self._plot_curves()
        accelerator.wait_for_everyone()
        self.model, self.processor = model, processor
        return summary

    def _trim_log(self, start: Position, fresh: bool) -> None:
        """A fresh run starts an empty log; a resumed one keeps only the entries up to its checkpoint."""
        path = os.path.join(self.recipe.output_dir, LOG_FILE)
        kept = []
        if not fresh and os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    entry = json.loads(line)
                    if (entry["stage_index"], entry["step"]) <= (start.stage, start.step):
                        kept.append(line)
        with open(path, "w") as f:
            f.writelines(kept)

    def _log(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            with open(os.path.join(self.recipe.output_dir, LOG_FILE), "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _plot_curves(self) -> None:
        """<output_dir>/training.png from the log so far (main process)."""
        from leanvlm.train.curves import plot_curves, read_log

        if self.accelerator.is_main_process:
            directory = self.recipe.output_dir
            name = os.path.basename(os.path.normpath(directory))  # the run's name, not where this machine keeps it
            canvas = plot_curves(read_log(os.path.join(directory, LOG_FILE)),
                                 f"training: {name} ({self.recipe.model.decoder})")
            canvas.savefig(os.path.join(directory, CURVES_FILE), dpi=110)

    def _run_stage(self, index, model, processor, dataset, evaluation, global_step, checkpoint, done):
        """Train stage `index` from its optimizer step `done` on; returns the unwrapped model, the stage's summary and
        the global step reached."""
        recipe = self.recipe
        run = self._prepare_stage(index, model, dataset, checkpoint)
        stage, collate = run.spec, Collator(processor)
        global_step += done
        history, started, tokens_seen, overhead = [], time.perf_counter(), 0, 0.0
        with self._progress(f"[bold]{stage.name}", run.steps, completed=done, status=True) as advance:
            for step in range(done, run.steps):
                step_loss, tokens = self._train_step(run, step, dataset, collate)
                history.append(step_loss)
                tokens_seen += tokens
                global_step += 1
                elapsed = time.perf_counter() - started
                rate = tokens_seen * self.accelerator.num_processes / max(elapsed, 1e-9)
                lrs = {group["name"]: group["lr"] for group in run.optimizer.param_groups}
                entry = {"stage": stage.name, "stage_index": index, "step": step + 1, "global_step": global_step,
                         "loss": step_loss, "lr": lrs, "tokens_per_s": round(rate, 1), "seconds": round(elapsed, 2)}
                last = step + 1 == run.steps
                if evaluation is not None and (last or (recipe.eval.every and (step + 1) % recipe.eval.every == 0)):
                    eval_started = time.perf_counter()
                    unwrapped = self.accelerator.unwrap_model(run.model)
                    entry["val_loss"] = self.validation_loss(unwrapped, evaluation, collate)
                    if recipe.eval.answers:
                        answered = self.validation_exact_match(unwrapped, processor)
                        if answered:  # the main process's
                            entry["val_exact_match"] = answered
                    run.model.train()
                    overhead += time.perf_counter() - eval_started
                if (step + 1) % recipe.log_every == 0 or last or "val_loss" in entry:
                    self._log(entry)
                if "val_loss" in entry:
                    self._plot_curves()
                advance(1, status=step_status(entry))
                if last or (recipe.save_every and (step + 1) % recipe.save_every == 0):
                    save_started = time.perf_counter()
                    self._save_checkpoint(self.accelerator.unwrap_model(run.model), Position(index, step + 1),
                                          global_step)
                    overhead += time.perf_counter() - save_started
        model = self._end_stage(run)
        seconds = time.perf_counter() - started
        summary = {"name": stage.name, "steps": run.steps, "seconds": round(seconds, 2),
                   # optimizer steps only: validation and checkpoint writing excluded
                   "seconds_per_step": round((seconds - overhead) / max(run.steps - done, 1), 4),
                   "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
                   "trainable_parameters": sum(p.numel() for p in run.trainable)}
        return model, summary, global_step

    def _prepare_stage(self, index: int, model, dataset, checkpoint: str | None) -> PreparedStage:
        """The stage's LoRA adapters and trainable groups, AdamW and its schedule through accelerate, the
        checkpoint's states when resuming, and the stage's sample order; the model is left in training mode."""
        from transformers import get_cosine_schedule_with_warmup

        recipe, accelerator = self.recipe, self.accelerator
        stage = recipe.stages[index]
        if stage.lora is not None:
            add_lora(model, stage.lora)
        groups = optimizer_groups(model, stage)
        optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"])
        steps = stage_steps(stage, len(dataset))
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(stage.warmup_ratio * steps), steps)
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if checkpoint is not None:
            check_checkpoint_weights(checkpoint, model, recipe.stages[: index + 1])
            accelerator.load_state(checkpoint, strict=False)  # it holds only the changed parameters
        lengths = dataset.lengths() if stage.group_by_length else None
        order = sample_order(len(dataset), steps * stage.batch_size * stage.grad_accum, recipe.seed, index, lengths,
                             stage.batch_size)
        prepared.train()
        return PreparedStage(stage, prepared, optimizer, scheduler, [p for g in groups for p in g["params"]], steps,
                             order)

    def _train_step(self, run: PreparedStage, step: int, dataset, collate) -> tuple[float, int]:
        """Optimizer step `step`: its global batch as `grad_accum` micro-batches, each split over the processes.
        Returns the step's loss and this process's non-padding tokens."""
        stage, accelerator = run.spec, self.accelerator
        per_step = stage.batch_size * stage.grad_accum
        indices = run.order[step * per_step : (step + 1) * per_step]
        micro = []
        for m in range(stage.grad_accum):
            chunk = indices[m * stage.batch_size : (m + 1) * stage.batch_size]
            with accelerator.split_between_processes(chunk) as mine:
                micro.append(send_to_device(collate([dataset[i] for i in mine]), accelerator.device))
        loss = accumulate_gradients(run.model, micro, accelerator)
        accelerator.clip_grad_norm_(run.trainable, stage.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return loss, sum(int(batch["attention_mask"].sum()) for batch in micro)

    def _end_stage(self, run: PreparedStage):
        """The plain model back from accelerate: LoRA merged, memory freed, every parameter frozen."""
        model = self.accelerator.unwrap_model(run.model)
        if run.spec.lora is not None:
            merge_lora(model)
        self.accelerator.free_memory()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model

    def validation_exact_match(self, model, processor) -> dict:
        """Greedy answers to the first `eval.answers` validation records (main process; cached features when the
        recipe has them): exact match overall and per family."""
        from leanvlm.data.llava import read_records
        from leanvlm.eval.exact_match import evaluate

        spec, result = self.recipe.eval, {}
        if self.accelerator.is_main_process:
            model.eval()
            root = self.recipe.image_root or os.path.dirname(os.path.abspath(spec.data))
            with self.accelerator.autocast():
                scores = evaluate(model, processor, read_records(spec.data)[: spec.answers], root, spec.batch_size,
                                  ANSWER_TOKENS, progress=False, source=spec.data, feature_cache=self.feature_cache)
            result = {"accuracy": scores["accuracy"], "samples": scores["samples"],
                      "families": {name: f["accuracy"] for name, f in scores["families"].items()}}
        self.accelerator.wait_for_everyone()
        return result

    @torch.no_grad()
    def validation_loss(self, model, dataset, collate) -> float:
        """Token-mean loss over the first `eval.max_samples` samples, split over processes. `model` is the unwrapped
        model: a rank with no samples left must not leave the others waiting in a DDP forward."""
        accelerator = self.accelerator
        batch_size = self.recipe.eval.batch_size
        model.eval()
        indices = list(range(min(len(dataset), self.recipe.eval.max_samples)))
        total = torch.zeros((), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device)
        with accelerator.split_between_processes(indices) as mine:
            for start in range(0, len(mine), batch_size):
                batch = send_to_device(collate([dataset[i] for i in mine[start : start + batch_size]]),
                                       accelerator.device)
                with accelerator.autocast():
                    loss = model(**batch, return_logits=False).loss.float()
                n = scored_tokens(batch)
                total += loss * n
                count += n
        return float(accelerator.reduce(total, "sum") / accelerator.reduce(count, "sum").clamp(min=1))
