"""`leanvlm bench`: latency, memory and KV-cache size of each decoder, measured interleaved in one process.

Protocol, per repeat and per decoder in turn (after warm-up), with a barrier (`torch.cuda.synchronize`) on GPU:
- preprocess: the processor turns the batch's images (random 640 x 480 RGB) into pixel values;
- encoder: the vision encoder up to the deepest layer the model reads (with the model's token merging, if any);
- projection: the decoder's projection of those features (connector, HiMix vision K/V);
- prefill: the decoder prefill from the encoded images, logits for the last position only (time to first token of a
  question about an already-encoded image);
- TTFT from pixels = preprocess + encoder + projection + prefill;
- decode: `decode_steps` greedy steps on the cache, per token;
- train step: forward + backward with labels from cached encoder features (encoder frozen);
- peak memory of the prefill and of the training step, in separate untimed passes: CUDA `max_memory_allocated`
  above the level before; on CPU the peak of torch's allocations (torch.profiler memory events).
Medians and spreads (min..max) over repeats; every ratio is to vanilla in the same run, next to the analytic FLOPs
ratio of the same work (decoder prefill from encoded images: connector and HiMix vision K/V are its projection).
The encoder's time is also set against its analytic FLOPs at this machine's own matrix-multiply rate (the median
over the repeats of one matmul of the encoder's MLP shape, timed next to the encoders): how far the encoder runs from
what its arithmetic allows.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from leanvlm.decoders import BASELINE, DECODERS, HEADLINE, option_names
from leanvlm.measure.flops import (
    LLM_PRESET_FAMILIES,
    VISION_CONFIGS,
    Convention,
    EncoderShape,
    LLMShape,
    VisionShape,
    decoder_flops,
    model_encoder_flops,
    resolve_llm,
)
from leanvlm.precision import dtype_name
from leanvlm.reports import figure, short_label
from leanvlm.reports import write_report as write_files


@dataclass
class BenchSettings:
    llm: str = "qwen2-0.5b"
    vision: str = "siglip-so400m-384"
    # decoders, each optionally with model options: `NAME+key=value` (`leanvlm.config.parse_variant`)
    decoders: list[str] = field(default_factory=lambda: list(HEADLINE))
    text_tokens: int = 64
    crops: int = 1
    batch: int = 1
    dtype: str = "auto"  # resolved at once, so reports name the dtype measured
    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    decode_steps: int = 16
    # decoder options (LeanVLMConfig fields, e.g. proxyv_start_layer); each decoder takes its own, the rest ignore them
    options: dict = field(default_factory=dict)
    train: bool = True
    model: str | None = None  # a saved leanvlm model: its LLM and encoder replace the presets' random ones

    def __post_init__(self):
        self.dtype = dtype_name(self.dtype, self.device)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def peak_memory(fn, device: torch.device) -> tuple[int, str]:
    """Peak memory `fn` allocates above the level before it, and how it was measured: the CUDA allocator's peak on
    GPU; on CPU the running total of torch's allocation and free events (torch.profiler with profile_memory)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "CUDA max_memory_allocated above the level before"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        fn()
    records = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    usage = peak = 0  # every allocation (+) and free (-) record, in time order
    for record in sorted(records, key=lambda e: e.start_ns()):
        usage += record.nbytes()
        peak = max(peak, usage)
    return peak, "peak of torch's CPU allocations above the level before (torch.profiler memory records)"


def llm_family(llm: str) -> str:
    """The transformers model type a random-weight `llm` is built as: a config.json's own `model_type`; for a
    preset, its entry in `LLM_PRESET_FAMILIES` (Llama by default)."""
    from leanvlm.decoders.llm import SUPPORTED_FAMILIES

    if not os.path.isfile(llm):
        return LLM_PRESET_FAMILIES.get(llm, "llama")
    with open(llm) as f:
        family = json.load(f).get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"{llm}: model_type {family!r} is not a family leanvlm can build; the config.json needs "
                         f"one of {', '.join(SUPPORTED_FAMILIES)}.")
    return family


def build_parts(settings: BenchSettings):
    """(LLM, vision encoder, <image> id): from a saved model, or random weights from the presets (or the LLM's
    config.json)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from leanvlm.modeling import LeanVLMForConditionalGeneration

    dtype = getattr(torch, settings.dtype)
    if settings.model:
        model = LeanVLMForConditionalGeneration.from_pretrained(settings.model, dtype=dtype)
        return model.language_model, model.vision_model, model.config.image_token_id
    shape = resolve_llm(settings.llm)
    text_config = AutoConfig.for_model(
        llm_family(settings.llm), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        intermediate_size=shape.ffn, vocab_size=shape.vocab + 1, max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    if settings.vision not in VISION_CONFIGS:
        raise ValueError(f"Unknown vision preset {settings.vision!r}; choose one of {', '.join(VISION_CONFIGS)}.")
    model_type, kwargs = VISION_CONFIGS[settings.vision]
    llm = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    vision = AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs), dtype=dtype)
    return llm, vision, shape.vocab


def decoder_options(config) -> dict:
    """The options of a model config's own decoder, by name."""
    return asdict(DECODERS[config.decoder].options_from(config))


def build_models(settings: BenchSettings):
    """A model for each decoder variant, all sharing one LLM and one vision encoder."""
    from leanvlm.config import parse_variant
    from leanvlm.modeling import LeanVLMForConditionalGeneration

    llm, vision, image_token_id = build_parts(settings)
    dtype = getattr(torch, settings.dtype)
    size = vision.config.image_size
    models = {}
    for variant in settings.decoders:
        label, decoder, variant_options = parse_variant(variant)
        own = option_names(DECODERS[decoder])
        options = {"max_crops": settings.crops, **{k: v for k, v in settings.options.items() if k in own},
                   **variant_options}
        if settings.crops > 1:
            options["image_grid_pinpoints"] = [[size * (settings.crops - 1), size]]
        model = LeanVLMForConditionalGeneration.from_parts(llm, vision, decoder=decoder,
                                                           image_token_id=image_token_id, **options)
        models[label] = model.to(device=settings.device, dtype=dtype).eval()
    return models


def _greedy_steps(model, token: torch.Tensor, cache, steps: int) -> None:
    for _ in range(steps):
        token = model.decode_step(token, cache).argmax(-1)


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


class Workload:
    """A model per decoder (sharing one LLM and one encoder) and the one batch every measurement runs on."""

    def __init__(self, settings: BenchSettings):
        import numpy as np
        from PIL import Image

        from leanvlm.processing import ImagePreprocessor, encoder_image_processor

        self.device = torch.device(settings.device)
        self.decode_steps = settings.decode_steps
        torch.manual_seed(0)
        self.models = build_models(settings)
        first = next(iter(self.models.values()))
        noise = np.random.default_rng(0).integers(0, 256, (settings.batch, 480, 640, 3), dtype=np.uint8)
        self.images = [Image.fromarray(image) for image in noise]
        self.preprocessor = ImagePreprocessor(encoder_image_processor(first.vision_model), first.config.max_crops,
                                              first.config.image_grid_pinpoints)
        size = first.config.vision_config.image_size
        self.pixels = torch.randn(settings.batch * settings.crops, 3, size, size, device=self.device)
        self.crops = [settings.crops] * settings.batch
        image_id = first.config.image_token_id
        text = torch.randint(3, min(1000, image_id), (settings.batch, settings.text_tokens), device=self.device)
        self.ids = torch.cat([torch.full((settings.batch, 1), image_id, device=self.device), text], dim=1)
        with torch.no_grad():
            self.features = {name: self.encode(name) for name in self.models}
            self.contexts = {name: self.project(name) for name in self.models}
        # one matmul of the encoder's MLP shape over the batch's patches: the machine's own rate for this work
        shape = EncoderShape.from_config(first.config.vision_config)
        rows = settings.batch * settings.crops * shape.patches
        dtype = getattr(torch, settings.dtype)
        self.matmul_inputs = (torch.randn(rows, shape.hidden, dtype=dtype, device=self.device),
                              torch.randn(shape.hidden, shape.mlp_width, dtype=dtype, device=self.device))
        self.matmul_flops = 2 * rows * shape.hidden * shape.mlp_width

    def matmul_rate(self) -> float:
        """FLOPs/s of one timed matmul of the encoder's MLP shape."""
        seconds, _ = _timed(partial(torch.matmul, *self.matmul_inputs), self.device)
        return self.matmul_flops / seconds

    def preprocess(self) -> torch.Tensor:
        return self.preprocessor.preprocess_images(self.images)[0]

    def encode(self, name: str) -> dict:
        """The encoder's features of the batch, as this model reads them."""
        from leanvlm.vision import encode_features

        config = self.models[name].config
        return encode_features(self.models[name].vision_model, self.pixels, config.feature_keys,
                               config.vision_feature_select, config.tome_r)

    def project(self, name: str):
        return self.models[name].context_from_features(self.features[name], self.crops)

    def rotated(self, repeat: int) -> list[str]:
        """The decoders, starting one further each repeat, so that no decoder always runs right after another."""
        names = list(self.models)
        return names[repeat % len(names):] + names[: repeat % len(names)]

    def prefill(self, name: str, cache):
        return self.models[name](self.ids, image_context=self.contexts[name], cache=cache, logits_to_keep=1)

    def new_cache(self, name: str):
        return self.models[name].new_cache(reserve=self.decode_steps)

    def train_step(self, name: str) -> None:
        """From cached encoder features: projection + decoder forward + backward."""
        model = self.models[name]
        model.train()
        context = self.project(name)
        model(self.ids, image_context=context, labels=self.ids, return_logits=False).loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()


def measure_inference(work: Workload, repeats: int, warmup: int, progress=None) -> tuple[dict, dict, list[float]]:
    """Preprocess, encoder, projection, prefill, TTFT and decode times in ms per decoder and repeat (warm-up
    dropped), each decoder's KV-cache bytes after prefill, and the matmul rate of every repeat (FLOPs/s)."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in work.models}
    cache_bytes, rates = {}, []
    for repeat in range(warmup + repeats):
        keep = repeat >= warmup
        with torch.no_grad():
            rate = work.matmul_rate()
        if keep:
            rates.append(rate)
        for name in work.rotated(repeat):
            model = work.models[name]
            if progress is not None:
                progress(f"{name}: {f'repeat {repeat - warmup + 1}' if keep else 'warm-up'}")
            with torch.no_grad():
                preprocess_s, _ = _timed(work.preprocess, work.device)
                encoder_s, _ = _timed(partial(work.encode, name), work.device)
                projection_s, _ = _timed(partial(work.project, name), work.device)
                cache = work.new_cache(name)
                prefill_s, out = _timed(partial(work.prefill, name, cache), work.device)
                cache_bytes[name] = cache.nbytes()
                token = out.logits[:, -1].argmax(-1)
                decode_s, _ = _timed(partial(_greedy_steps, model, token, cache, work.decode_steps), work.device)
            if keep:
                stages = {"preprocess_ms": preprocess_s, "encoder_ms": encoder_s, "projection_ms": projection_s,
                          "prefill_ms": prefill_s}
                for key, seconds in (*stages.items(), ("ttft_from_pixels_ms", sum(stages.values())),
                                     ("decode_ms_per_token", decode_s / work.decode_steps)):
                    times[name].setdefault(key, []).append(1e3 * seconds)
    return times, cache_bytes, rates


def measure_training(work: Workload, repeats: int, warmup: int, progress=None) -> dict[str, list[float]]:
    """Training-step times in ms per decoder and repeat (warm-up dropped)."""
    times: dict[str, list[float]] = {name: [] for name in work.models}
    for repeat in range(warmup + repeats):
        for name in work.rotated(repeat):
            if progress is not None:
                progress(f"{name}: training step {repeat + 1}")
            train_s, _ = _timed(partial(work.train_step, name), work.device)
            if repeat >= warmup:
                times[name].append(1e3 * train_s)
    return times


def measure_memory(work: Workload, train: bool, progress=None) -> tuple[dict, str]:
    """Peak bytes of the prefill (and of a training step) per decoder, and how they were measured. Separate,
    untimed passes: the CPU method slows down what it watches."""
    peaks: dict[str, dict[str, int]] = {name: {} for name in work.models}
    method = ""
    for name in work.models:
        if progress is not None:
            progress(f"{name}: peak memory")
        with torch.no_grad():
            cache = work.new_cache(name)
            peaks[name]["prefill_peak_bytes"], method = peak_memory(partial(work.prefill, name, cache), work.device)
        if train:
            peaks[name]["train_peak_bytes"], _ = peak_memory(partial(work.train_step, name), work.device)
    return peaks, method


def run_bench(settings: BenchSettings, progress=None) -> dict:
    """Measure every decoder: inference first, then training, then memory; `progress(description)` is called
    before each measurement."""
    work = Workload(settings)
    samples, cache_bytes, rates = measure_inference(work, settings.repeats, settings.warmup, progress)
    if settings.train:
        for name, times in measure_training(work, settings.repeats, settings.warmup, progress).items():
            samples[name]["train_step_ms"] = times
    peaks, memory_method = measure_memory(work, settings.train, progress)
    extra = {name: {"kv_cache_bytes": cache_bytes[name], **peaks[name]} for name in work.models}
    tokens_per_crop = {name: context.tokens.shape[-2] for name, context in work.contexts.items()}
    configs = {name: model.config for name, model in work.models.items()}
    return summarize(settings, samples, extra, memory_method, configs, tokens_per_crop, statistics.median(rates))


def summarize(settings, samples: dict, extra: dict, memory_method: str, configs: dict,
              tokens_per_crop: dict[str, int], matmul_rate: float) -> dict:
    """Medians, spreads and ratios to vanilla, next to the analytic FLOPs of the same work (shapes from each
    variant's config, tokens per crop as its encoder gave them)."""
    work = Convention(attention="causal", lm_head="last", connector=False)
    results = {}
    for name, metrics in samples.items():
        config = configs[name]
        vision = VisionShape(tokens_per_crop[name], config.vision_config.hidden_size,
                             config.vision_config.num_attention_heads)
        newlines = settings.crops if config.uses_image_newline else 0
        flops = decoder_flops(LLMShape.from_config(config), vision, settings.text_tokens + newlines, config.decoder,
                              crops=settings.crops, convention=work, **decoder_options(config))
        prefill_flops = flops["total_flops"] - flops["breakdown"].get("vision_kv", 0)
        row = {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in metrics.items()}
        row["tokens_per_s"] = settings.batch * 1e3 / row["decode_ms_per_token"]["median"]
        row["prefill_flops"] = prefill_flops * settings.batch
        encoder = model_encoder_flops(config, config.vision_config.image_size, settings.crops)
        row["encoder_flops"] = encoder["total_flops"] * settings.batch
        row["encoder_vs_matmul_rate"] = row["encoder_ms"]["median"] / (1e3 * row["encoder_flops"] / matmul_rate)
        row.update(extra[name])
        row["options"] = decoder_options(config)  # as the model resolved them (e.g. ProxyV's middle layer)
        results[name] = row
    if BASELINE in results:
        base = results[BASELINE]
        for row in results.values():
            row["prefill_speedup"] = base["prefill_ms"]["median"] / row["prefill_ms"]["median"]
            row["analytic_flops_ratio"] = row["prefill_flops"] / base["prefill_flops"]
            row["analytic_speedup"] = 1 / row["analytic_flops_ratio"]
            row["ttft_reused_vs_vanilla_from_pixels"] = (
                base["ttft_from_pixels_ms"]["median"] / row["prefill_ms"]["median"]
            )
            row["ttft_from_pixels_speedup"] = (
                base["ttft_from_pixels_ms"]["median"] / row["ttft_from_pixels_ms"]["median"]
            )
    first = next(iter(configs.values()))
    title = settings.model or f"{settings.llm} + {settings.vision}"
    return {"title": title, "settings": asdict(settings), "machine": machine(), "memory_method": memory_method,
            "matmul_flops_per_s": matmul_rate, "results": results, "llm_layers": first.text_config.num_hidden_layers}


def write_report(report: dict, out_dir: str, name: str = "bench") -> list[str]:
    """JSON, markdown table and a PNG plot of the report in `out_dir`."""
    return write_files(report, out_dir, name, markdown=markdown(report), plot=plot, dpi=110)


def plot(report: dict):
    """Measured against analytic prefill speed-up, and decode time next to KV-cache size, per decoder."""
    results = report["results"]
    names = list(results)
    # horizontal bars, first decoder on top: variant labels stay readable however many there are
    canvas, axes = figure(2, (13, 2 + 0.45 * len(names)))
    height = 0.38
    y = [len(names) - 1 - i for i in range(len(names))]
    labels = [short_label(n) for n in names]
    measured = [results[n].get("prefill_speedup", 0) for n in names]
    analytic = [results[n].get("analytic_speedup", 0) for n in names]
    axes[0].barh([i + height / 2 for i in y], measured, height, label="measured prefill speed-up")
    axes[0].barh([i - height / 2 for i in y], analytic, height, label="analytic speed-up (FLOPs ratio)")
    axes[0].set_yticks(y, labels)
    axes[0].set_xlabel("x faster than vanilla")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(names) - 0.04))
    axes[0].set_title("Prefill from an encoded image")
    kv = [results[n]["kv_cache_bytes"] / 2**20 for n in names]
    decode = [results[n]["decode_ms_per_token"]["median"] for n in names]
    axes[1].barh([i + height / 2 for i in y], decode, height, label="decode ms/token")
    axes[1].barh([i - height / 2 for i in y], kv, height, label="KV cache MiB")
    axes[1].set_yticks(y, labels)
    axes[1].legend(loc="upper center", bbox_to_anchor=(0.5, -0.6 / len(names) - 0.04))
    axes[1].set_title("Decoding")
    s = report["settings"]
    canvas.suptitle(f"{report['title']}, {s['crops']} crop(s), {s['text_tokens']} text tokens, "
                    f"batch {s['batch']}, {s['dtype']} on {s['device']}")
    canvas.tight_layout()
    return canvas


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"### {report['title']} ({s['crops']} crop(s)), {s['text_tokens']} text tokens, batch {s['batch']}, "
        f"{s['dtype']}, {s['device']}",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + f", torch {m['torch']}. Medians of {s['repeats']} repeats "
        f"(min..max), after {s['warmup']} warm-up; peak memory: {report['memory_method']}.",
        "",
        "| decoder | prefill ms | speed-up | analytic | TTFT from pixels ms | decode ms/token | tokens/s | KV cache MiB"
        " | prefill peak MiB | train step ms | train peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row, key, scale=1.0):
        if key not in row:
            return "-"
        value = row[key]
        return f"{value['median'] * scale:.0f} ({value['min'] * scale:.0f}..{value['max'] * scale:.0f})"

    for name, row in report["results"].items():
        lines.append(
            f"| {name} | {cell(row, 'prefill_ms')} | {_ratio(row.get('prefill_speedup'))} | "
            f"{_ratio(row.get('analytic_speedup'))} | {cell(row, 'ttft_from_pixels_ms')} | "
            f"{cell(row, 'decode_ms_per_token')} | {row['tokens_per_s']:.1f} | "
            f"{row['kv_cache_bytes'] / 2**20:.1f} | {_mib(row.get('prefill_peak_bytes'))} | "
            f"{cell(row, 'train_step_ms')} | {_mib(row.get('train_peak_bytes'))} |"
        )
    lines += ["", f"Time to first token from pixels, by stage (ms, medians). Encoder vs matmul rate: its time over "
              f"its analytic FLOPs at {report['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s, this run's median rate of a "
              "matmul of its MLP's shape.", "",
              "| decoder | preprocess | encoder | projection | prefill | TTFT from pixels | speed-up | encoder share "
              "| encoder GFLOPs | encoder vs matmul rate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in report["results"].items():
        stages = [row[key]["median"] for key in ("preprocess_ms", "encoder_ms", "projection_ms", "prefill_ms")]
        total = row["ttft_from_pixels_ms"]["median"]
        lines.append(f"| {name} | " + " | ".join(f"{value:.0f}" for value in stages)
                     + f" | {total:.0f} | {_ratio(row.get('ttft_from_pixels_speedup'))} | {stages[1] / total:.0%} | "
                     f"{row['encoder_flops'] / 1e9:.1f} | {row['encoder_vs_matmul_rate']:.2f}x |")
    return "\n".join(lines) + "\n"


def render(report: dict, console) -> None:
    """The report's table in the terminal."""
    from rich.markdown import Markdown

    console.print(Markdown(markdown(report)))
