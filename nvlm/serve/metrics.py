"""Serving metrics in Prometheus' text format (``GET /metrics``), with no client library.

Counters: requests by HTTP status and by finish reason, prompt and completion tokens, the engine's own events
(``COUNTERS``: preemptions, prefill tokens computed, cache hits …). Gauges: requests in flight (queued + running)
and queue depth. Histograms: time to first token, time per output token, end-to-end
latency, engine step time. Names follow vLLM's ``vllm:`` metrics where one exists (``nvlm:`` prefix).
"""

from __future__ import annotations

import threading
from collections import Counter

# the engine's event counters (``EngineMetrics.count``) and their help text, rendered as ``nvlm:<name>_total``
COUNTERS = {
    "num_preemptions": "running requests sent back to the queue because the KV budget was full",
    "prefill_tokens_computed": "prompt tokens run through the model in prefills (not taken from the prefix cache)",
    "prefix_cache_queries": "prompt tokens looked up in the prefix cache",
    "prefix_cache_hits": "prompt tokens whose KV came from the prefix cache",
    "image_tile_cache_queries": "images looked up by their bytes in the encoder cache before decoding and tiling",
    "image_tile_cache_hits": "images whose tiles came from the encoder cache (not decoded or tiled again)",
    "encoder_cache_queries": "images looked up in the encoder cache",
    "encoder_cache_hits": "images whose features came from the encoder cache",
    "xattn_kv_cache_queries": "image memories (NVLM-X/H) whose cross-attention K/V were looked up in the encoder cache",
    "xattn_kv_cache_hits": "image memories whose cross-attention K/V came from the encoder cache",
}
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += value
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1

    def lines(self, name: str, help_text: str) -> list[str]:
        out = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        with self._lock:
            for b, c in zip(self.buckets, self.counts):
                out.append(f'{name}_bucket{{le="{b}"}} {c}')
            out += [
                f'{name}_bucket{{le="+Inf"}} {self.count}',
                f"{name}_sum {self.sum:.6f}",
                f"{name}_count {self.count}",
            ]
        return out


class EngineMetrics:
    """What the engine and the HTTP layer record; `render(engine)` gives the Prometheus text."""

    def __init__(self) -> None:
        self.ttft, self.tpot, self.e2e = Histogram(), Histogram(), Histogram()
        self.prefill_step, self.decode_step = Histogram(), Histogram()
        self.finish: Counter[str] = Counter()
        self.http: Counter[int] = Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.counts: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}  # e.g. encoder_cache_bytes, set by the engine
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown engine counter {name!r}")
        with self._lock:
            self.counts[name] += n

    def observe_step(self, kind: str, seconds: float, size: int) -> None:
        (self.prefill_step if kind == "prefill" else self.decode_step).observe(seconds)

    def finished(
        self,
        reason: str,
        prompt: int,
        completion: int,
        t_submit: float,
        t_first: float | None,
        t_last: float | None,
    ) -> None:
        with self._lock:
            self.finish[reason] += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
        if t_last is not None:
            self.e2e.observe(t_last - t_submit)
            if t_first is not None and completion > 1:
                self.tpot.observe((t_last - t_first) / (completion - 1))

    def status(self, code: int) -> None:
        with self._lock:
            self.http[code] += 1

    def render(self, in_flight: int, queue_depth: int, running: int) -> str:
        lines = [
            "# HELP nvlm:http_requests_total HTTP responses by status code",
            "# TYPE nvlm:http_requests_total counter",
        ]
        with self._lock:
            lines += [f'nvlm:http_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.http.items())]
            lines += [
                "# HELP nvlm:request_success_total finished generations by finish reason",
                "# TYPE nvlm:request_success_total counter",
            ]
            lines += [
                f'nvlm:request_success_total{{finished_reason="{r}"}} {n}' for r, n in sorted(self.finish.items())
            ]
            lines += [
                "# TYPE nvlm:prompt_tokens_total counter",
                f"nvlm:prompt_tokens_total {self.prompt_tokens}",
                "# TYPE nvlm:generation_tokens_total counter",
                f"nvlm:generation_tokens_total {self.completion_tokens}",
            ]
            for name, help_text in COUNTERS.items():
                lines += [
                    f"# HELP nvlm:{name}_total {help_text}",
                    f"# TYPE nvlm:{name}_total counter",
                    f"nvlm:{name}_total {self.counts[name]}",
                ]
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE nvlm:{name} gauge", f"nvlm:{name} {value}"]
        lines += [
            "# HELP nvlm:num_requests_in_flight queued + running requests",
            "# TYPE nvlm:num_requests_in_flight gauge",
            f"nvlm:num_requests_in_flight {in_flight}",
            "# TYPE nvlm:num_requests_waiting gauge",
            f"nvlm:num_requests_waiting {queue_depth}",
            "# TYPE nvlm:num_requests_running gauge",
            f"nvlm:num_requests_running {running}",
        ]
        lines += self.ttft.lines("nvlm:time_to_first_token_seconds", "time to first token")
        lines += self.tpot.lines("nvlm:time_per_output_token_seconds", "time per output token after the first")
        lines += self.e2e.lines("nvlm:e2e_request_latency_seconds", "end-to-end request latency")
        lines += self.prefill_step.lines("nvlm:prefill_step_seconds", "one batched prefill step")
        lines += self.decode_step.lines("nvlm:decode_step_seconds", "one decode step of the running batch")
        return "\n".join(lines) + "\n"
