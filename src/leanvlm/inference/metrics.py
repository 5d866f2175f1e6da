"""What the engine counts while it runs, and its Prometheus text form (exposition format 0.0.4). Only the engine's
loop writes; readers (the /metrics route) read plain numbers."""

from __future__ import annotations

import bisect
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative-bucket histogram of seconds, as Prometheus reads it."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{le="{label}"}} {running}')
        return [*lines, f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class EngineMetrics:
    def __init__(self):
        self.finished_requests: Counter[str] = Counter()  # by finish reason
        self.prompt_tokens = self.completion_tokens = 0
        self.time_to_first_token = Histogram()
        self.time_per_output_token = Histogram()
        self.queue_time = Histogram()
        self.step_seconds = self.model_seconds = 0.0  # wall time of steps, and the part spent in the model
        self.running = self.waiting = 0

    def step(self, seconds: float, model_seconds: float, running: int, waiting: int) -> None:
        self.step_seconds += seconds
        self.model_seconds += model_seconds
        self.running, self.waiting = running, waiting

    def admitted(self, waited: float) -> None:
        self.queue_time.observe(waited)

    def first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.time_per_output_token.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.finished_requests[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def prometheus(self, image_cache, prefix: str = "leanvlm") -> str:
        """The metrics (and the image cache's counters) as Prometheus text."""
        out = []

        def metric(name, kind, help_text, lines):
            out.extend([f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} {kind}"])
            out.extend(f"{prefix}_{line}" for line in lines)

        reasons = sorted(self.finished_requests) or ["stop"]
        metric("requests_finished_total", "counter", "Requests that finished, by finish reason.",
               [f'requests_finished_total{{reason="{r}"}} {self.finished_requests[r]}' for r in reasons])
        metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [f"prompt_tokens_total {self.prompt_tokens}"])
        metric("generation_tokens_total", "counter", "Generated tokens of finished requests.",
               [f"generation_tokens_total {self.completion_tokens}"])
        metric("requests_waiting", "gauge", "Requests waiting to be prefilled.", [f"requests_waiting {self.waiting}"])
        metric("requests_running", "gauge", "Rows of the running batch.", [f"requests_running {self.running}"])
        for name, histogram, help_text in (
            ("time_to_first_token_seconds", self.time_to_first_token, "From arrival to the first token."),
            ("time_per_output_token_seconds", self.time_per_output_token, "Between a request's tokens."),
            ("queue_time_seconds", self.queue_time, "From arrival to the prefill."),
        ):
            metric(name, "histogram", help_text, histogram.lines(f"{name}"))
        metric("engine_step_seconds_total", "counter", "Wall time of engine steps.",
               [f"engine_step_seconds_total {self.step_seconds}"])
        metric("engine_model_seconds_total", "counter", "Part of the steps spent in the model (encoder, prefill, "
               "decode).", [f"engine_model_seconds_total {self.model_seconds}"])
        metric("image_cache_hits_total", "counter", "Images found in the image-context cache.",
               [f"image_cache_hits_total {image_cache.hits}"])
        metric("image_cache_misses_total", "counter", "Images encoded because the cache lacked them.",
               [f"image_cache_misses_total {image_cache.misses}"])
        metric("image_cache_bytes", "gauge", "Bytes held by the image-context cache.",
               [f"image_cache_bytes {image_cache.bytes}"])
        return "\n".join(out) + "\n"
