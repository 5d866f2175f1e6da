"""`leanvlm loadtest`: throughput and latency of the server, per decoder, under a bounded load on loopback.

For each decoder, one server (the real app, uvicorn on a free 127.0.0.1 port) serves every scenario in turn: a fixed
number of streamed chat requests at a fixed concurrency, each asking for exactly `max_tokens` tokens (`ignore_eos`),
about distinct images (each encoded once) or one repeated image (encoded once, then served from the image cache).
Measured at the client: requests/s and output tokens/s over the scenario's wall time, time to first token (TTFT:
to the first streamed event, which carries the first token) and time per output token after it. From the server's
/metrics, before and after: image-cache hits and the share of the engine's time spent outside the model. Every
scenario has a time limit; requests still unanswered then are counted as failed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from leanvlm.decoders import BASELINE, HEADLINE, check_decoder_name
from leanvlm.precision import dtype_name
from leanvlm.reports import figure
from leanvlm.reports import write_report as write_files
from leanvlm.serve.server import ServerSettings, build_app, running_server

QUESTION = "What color is the square?"


@dataclass
class LoadSettings:
    llm: str = "smollm2-135m"  # a packaged part (pretrained) or an LLM preset of `leanvlm flops` (random weights)
    vision: str = "dinov2-s14"  # a packaged part or a vision preset
    decoders: list[str] = field(default_factory=lambda: list(HEADLINE))
    requests: int = 64
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    max_tokens: list[int] = field(default_factory=lambda: [1, 32])
    images: list[str] = field(default_factory=lambda: ["distinct", "repeated"])
    dtype: str = "auto"  # resolved at once (for the CPU the server runs on), so reports name the dtype measured
    max_batch_size: int = 16
    time_limit: float = 600.0  # seconds per scenario
    image_size: int = 224  # side of the synthetic test images, in pixels

    def __post_init__(self):
        self.dtype = dtype_name(self.dtype, "cpu")


def test_image(seed: int, size: int) -> bytes:
    """A PNG of random colour blocks, different for every seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_model(settings: LoadSettings, decoder: str):
    """A model of `decoder` over the chosen LLM and encoder, and its processor (SmolLM2's tokenizer and chat
    template when the LLM is a random-weight preset: throughput does not depend on the weights)."""
    from transformers import AutoTokenizer

    from leanvlm.hub import PARTS, pretrained_part
    from leanvlm.measure.bench import BenchSettings, build_parts
    from leanvlm.modeling import LeanVLMForConditionalGeneration
    from leanvlm.processing import LeanVLMProcessor

    tokenizer = AutoTokenizer.from_pretrained(pretrained_part("smollm2-135m"))
    llm, vision = settings.llm, settings.vision
    if llm not in PARTS or vision not in PARTS:
        random_llm, random_vision, _ = build_parts(BenchSettings(llm=llm if llm not in PARTS else "qwen2-0.5b",
                                                                 vision=vision if vision not in PARTS else
                                                                 "siglip-so400m-384", dtype=settings.dtype))
        llm = llm if llm in PARTS else random_llm
        vision = vision if vision in PARTS else random_vision
    torch.manual_seed(0)
    model = LeanVLMForConditionalGeneration.from_parts(llm, vision, decoder=decoder, tokenizer=tokenizer,
                                                       dtype=getattr(torch, settings.dtype))
    return model.eval(), LeanVLMProcessor.for_model(model, tokenizer)


async def _one(client, url: str, body: dict, record: list) -> None:
    sent = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            record.append({"ok": False, "status": response.status_code})
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if first is None:
                first = time.perf_counter()
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                record.append({"ok": False, "status": "error event"})
                return
            usage = event.get("usage") or usage
    done = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    record.append({"ok": True, "ttft": first - sent, "tokens": tokens,
                   "tpot": (done - first) / (tokens - 1) if tokens > 1 else None})


async def _scenario(base_url: str, model_name: str, images: list[bytes], requests: int, concurrency: int,
                    max_tokens: int, time_limit: float) -> tuple[list, float]:
    import httpx2

    urls = ["data:image/png;base64," + base64.b64encode(image).decode() for image in images]
    record: list = []
    gate = asyncio.Semaphore(concurrency)

    async def run(index, client):
        body = {"model": model_name, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                          {"type": "image_url",
                                                           "image_url": {"url": urls[index % len(urls)]}}]}]}
        async with gate:
            try:
                await _one(client, f"{base_url}/v1/chat/completions", body, record)
            except httpx2.HTTPError as error:  # a refused or dropped connection is a failed request
                record.append({"ok": False, "status": type(error).__name__})

    limits = httpx2.Limits(max_connections=concurrency + 2)
    async with httpx2.AsyncClient(timeout=time_limit, limits=limits) as client:
        started = time.perf_counter()
        tasks = [asyncio.ensure_future(run(i, client)) for i in range(requests)]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - started
    record += [{"ok": False, "status": "timeout"}] * len(pending)
    return record, wall


def _metrics(base_url: str) -> dict:
    import httpx2

    values = {}
    for line in httpx2.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(record: list, wall: float, before: dict, after: dict) -> dict:
    done = [r for r in record if r["ok"]]
    ttft = [r["ttft"] for r in done]
    tpot = [r["tpot"] for r in done if r["tpot"] is not None]

    def delta(name):
        return after.get(f"leanvlm_{name}", 0) - before.get(f"leanvlm_{name}", 0)

    lookups = delta("image_cache_hits_total") + delta("image_cache_misses_total")
    step_seconds = delta("engine_step_seconds_total")
    return {
        "requests": len(record), "failed": len(record) - len(done), "wall_s": wall,
        "requests_per_s": len(done) / wall, "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "ttft_p50_ms": 1e3 * (_percentile(ttft, 50) or 0), "ttft_p95_ms": 1e3 * (_percentile(ttft, 95) or 0),
        "tpot_p50_ms": 1e3 * _percentile(tpot, 50) if tpot else None,
        "tpot_mean_ms": 1e3 * statistics.fmean(tpot) if tpot else None,
        "image_cache_hit_rate": delta("image_cache_hits_total") / lookups if lookups else None,
        "engine_overhead": 1 - delta("engine_model_seconds_total") / step_seconds if step_seconds else None,
        "engine_busy": step_seconds / wall,
    }


def run(settings: LoadSettings, console=None) -> dict:
    """Every scenario for every decoder; returns the report (settings, machine, one row per scenario)."""
    from leanvlm.measure.bench import machine

    for name in settings.decoders:
        check_decoder_name(name)
    if min(settings.concurrency) < 1 or min(settings.max_tokens) < 1 or settings.requests < 1:
        raise ValueError("requests, concurrency and max_tokens must all be >= 1.")
    unknown = set(settings.images) - {"distinct", "repeated"}
    if unknown:
        raise ValueError(f"Unknown image mode(s) {sorted(unknown)}; use distinct and/or repeated.")
    rows, seed = [], 0
    for decoder in settings.decoders:
        model, processor = build_model(settings, decoder)
        server = ServerSettings(model_name=decoder, max_batch_size=settings.max_batch_size,
                                max_waiting=settings.requests, default_max_tokens=max(settings.max_tokens))
        with running_server(build_app(decoder, server, model, processor)) as base_url:
            # warm-up: one request of each length, on an image no scenario uses
            warm = [test_image(10**6, settings.image_size)]
            for tokens in settings.max_tokens:
                asyncio.run(_scenario(base_url, decoder, warm, 1, 1, tokens, settings.time_limit))
            for mode in settings.images:
                for tokens in settings.max_tokens:
                    for concurrency in settings.concurrency:
                        seed += settings.requests  # no scenario sees another's images
                        count = settings.requests if mode == "distinct" else 1
                        images = [test_image(seed + i, settings.image_size) for i in range(count)]
                        before = _metrics(base_url)
                        record, wall = asyncio.run(_scenario(base_url, decoder, images, settings.requests,
                                                             concurrency, tokens, settings.time_limit))
                        row = {"decoder": decoder, "images": mode, "max_tokens": tokens, "concurrency": concurrency,
                               **summarize(record, wall, before, _metrics(base_url))}
                        rows.append(row)
                        if console is not None:
                            console.print(_line(row))
        del model
    return {"title": f"{settings.llm} + {settings.vision}", "settings": asdict(settings), "machine": machine(),
            "rows": rows, "ratios": ratios(rows)}


def _line(row: dict) -> str:
    return (f"{row['decoder']:>8} {row['images']:>8} images, {row['max_tokens']:>3} tokens, concurrency "
            f"{row['concurrency']:>2}: {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {row['ttft_p50_ms']:.0f} ms" + (f", {row['failed']} failed" if row["failed"] else ""))


def _find(rows, **where) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in where.items())), None)


def ratios(rows: list[dict]) -> dict:
    """The comparisons the targets are stated in, where the rows exist, per decoder: its throughput over vanilla's
    at the highest concurrency with distinct images (per answer length), its TTFT for a repeated (cached) image
    against vanilla's with distinct images at concurrency 1 (shortest answers), its own throughput scaling from
    concurrency 1 to the highest (longest answers), and its engine overhead there."""
    out: dict[str, dict] = {}
    if not rows:
        return out
    top = max(r["concurrency"] for r in rows)
    shortest, longest = min(r["max_tokens"] for r in rows), max(r["max_tokens"] for r in rows)
    for decoder in dict.fromkeys(r["decoder"] for r in rows):
        entry = {}
        for tokens in sorted({r["max_tokens"] for r in rows}):
            mine = _find(rows, decoder=decoder, images="distinct", max_tokens=tokens, concurrency=top)
            base = _find(rows, decoder=BASELINE, images="distinct", max_tokens=tokens, concurrency=top)
            if mine and base and decoder != BASELINE:
                entry[f"throughput_vs_{BASELINE}_c{top}_{tokens}tok"] = mine["requests_per_s"] / base["requests_per_s"]
        high = _find(rows, decoder=decoder, images="distinct", max_tokens=longest, concurrency=top)
        low = _find(rows, decoder=decoder, images="distinct", max_tokens=longest, concurrency=1)
        if high and low and top > 1:
            entry[f"scaling_c{top}_vs_c1_{longest}tok"] = high["requests_per_s"] / low["requests_per_s"]
        cached = _find(rows, decoder=decoder, images="repeated", max_tokens=shortest, concurrency=1)
        uncached = _find(rows, decoder=BASELINE, images="distinct", max_tokens=shortest, concurrency=1)
        if cached and uncached:
            entry[f"cached_ttft_vs_{BASELINE}_uncached_c1"] = uncached["ttft_p50_ms"] / cached["ttft_p50_ms"]
        if high and high["engine_overhead"] is not None:
            entry[f"engine_overhead_c{top}_{longest}tok"] = high["engine_overhead"]
        out[decoder] = entry
    return out


def markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = [f"### {report['title']}: {s['requests']} streamed requests per scenario, {s['dtype']}",
             "",
             f"Machine: {m.get('cpu', '?')}, {m['cpu_count']} cores ({m['torch_threads']} torch threads), torch "
             f"{m['torch']}. Server and client in one process on loopback; max batch {s['max_batch_size']}.",
             "",
             "| decoder | images | tokens | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p95 ms | "
             "ms/token p50 | cache hits | engine overhead | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def num(value, digits=0):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in report["rows"]:
        hits = "-" if r["image_cache_hit_rate"] is None else f"{r['image_cache_hit_rate']:.0%}"
        overhead = "-" if r["engine_overhead"] is None else f"{r['engine_overhead']:.1%}"
        lines.append(f"| {r['decoder']} | {r['images']} | {r['max_tokens']} | {r['concurrency']} | "
                     f"{r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {num(r['ttft_p50_ms'])} | "
                     f"{num(r['ttft_p95_ms'])} | {num(r['tpot_p50_ms'], 1)} | {hits} | {overhead} | {r['failed']} |")
    lines += ["", "| decoder | ratio | value |", "|---|---|---|"]
    for decoder, entry in report["ratios"].items():
        for name, value in entry.items():
            shown = f"{value:.1%}" if name.startswith("engine_overhead") else f"{value:.2f}x"
            lines.append(f"| {decoder} | {name} | {shown} |")
    return "\n".join(lines) + "\n"


def plot(report: dict):
    """Throughput against concurrency, and TTFT p50 per scenario kind, per decoder."""
    rows = report["rows"]
    canvas, axes = figure(2, (11, 4))
    tokens = max(r["max_tokens"] for r in rows)
    for decoder in dict.fromkeys(r["decoder"] for r in rows):
        for mode, style in (("distinct", "-o"), ("repeated", "--s")):
            points = sorted((r["concurrency"], r["requests_per_s"]) for r in rows
                            if r["decoder"] == decoder and r["images"] == mode and r["max_tokens"] == tokens)
            if points:
                axes[0].plot(*zip(*points, strict=True), style, label=f"{decoder}, {mode} images")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("concurrent clients")
    axes[0].set_ylabel(f"requests/s ({tokens}-token answers)")
    axes[0].legend(fontsize=8)
    shortest = min(r["max_tokens"] for r in rows)
    groups = list(dict.fromkeys((r["images"], r["concurrency"]) for r in rows))
    decoders = list(dict.fromkeys(r["decoder"] for r in rows))
    width = 0.8 / len(decoders)
    for i, decoder in enumerate(decoders):
        values = [(_find(rows, decoder=decoder, images=mode, concurrency=c, max_tokens=shortest) or {})
                  .get("ttft_p50_ms", 0) for mode, c in groups]
        axes[1].bar([g + (i - (len(decoders) - 1) / 2) * width for g in range(len(groups))], values, width,
                    label=decoder)
    axes[1].set_xticks(range(len(groups)), [f"{mode}\nconcurrency {c}" for mode, c in groups], fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_ylabel(f"TTFT p50, ms (log; {shortest}-token answers)")
    axes[1].legend(fontsize=8)
    canvas.suptitle(f"Serving {report['title']} ({report['settings']['dtype']}, loopback)")
    canvas.tight_layout()
    return canvas


def write_report(report: dict, out_dir: str, name: str = "loadtest") -> list[str]:
    return write_files(report, out_dir, name, markdown=markdown(report), plot=plot, dpi=110)
