"""What workers measure and the front end exports as Prometheus metrics: the histogram buckets,
one request's statistics (measured where the tokens are produced, sent on the request's last
frame) and the keys of the engine-wide Stats message. Torch-free and prometheus-free: both
sides import it.

Request statistics (a dict on Response.stats / End.stats):
    prompt_tokens, generation_tokens   ints, summed over the request's prompts and samples
    ttft_s                             time from the handler taking the request to its first
                                       generated token (None when nothing was generated)
    e2e_s                              handler time for the whole request
    itl                                inter-token latency histogram: [bucket counts..., sum]
    finish                             {finish_reason: sequences}
    adapter                            the LoRA adapter (None: the base model)
    start_unix, first_token_unix       wall-clock times, for the generation span of a trace

Engine statistics (Stats.values), cumulative since the worker group started unless a gauge:
    running, waiting                   requests in the engine now (gauges)
    kv_blocks_total, kv_blocks_used    KV-cache blocks (gauges)
    prefix_queries, prefix_hits        prompt tokens looked up in / found in the prefix cache
    preemptions                        requests preempted to free KV blocks
    batch_size                         histogram of requests per engine step: [counts..., sum]
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

# Buckets as vLLM's (vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
# vllm:e2e_request_latency_seconds), so dashboards read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The front end's own: whole-request latency and time spent queued.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0)


class Histogram:
    """Cumulative-free bucket counts (one per bound, plus +Inf) and a sum; Prometheus' cumulative
    form is made when exported. Not thread-safe: one owner adds to it."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, wire: Sequence[float]) -> None:
        """Add another histogram of the same bounds, in its to_wire() form."""
        if len(wire) != len(self.counts) + 1:
            raise ValueError(f"histogram of {len(wire) - 1} buckets added to one of "
                             f"{len(self.counts)}")
        for i, c in enumerate(wire[:-1]):
            self.counts[i] += int(c)
        self.sum += float(wire[-1])

    def to_wire(self) -> list[float]:
        return [*self.counts, self.sum]

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, +Inf last, as Prometheus exports them."""
        out, total = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            total += c
            out.append(("+Inf" if bound == float("inf") else _le(bound), total))
        return out


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if float(bound).is_integer() else repr(float(bound))


class RequestClock:
    """Times one request's tokens as the handler receives them: call `token(index)` for every
    generated token of sequence `index` (a prompt or sample of the request), `finished(reason)`
    once per sequence, then `stats()`."""

    __slots__ = ("start", "start_unix", "first", "last", "itl", "tokens", "finish",
                 "prompt_tokens", "adapter")

    def __init__(self, prompt_tokens: int = 0, adapter: str | None = None) -> None:
        self.start = time.perf_counter()
        self.start_unix = time.time()
        self.first: float | None = None
        self.last: dict[int, float] = {}
        self.itl = Histogram(ITL_BUCKETS)
        self.tokens = 0
        self.finish: dict[str, int] = {}
        self.prompt_tokens = prompt_tokens
        self.adapter = adapter

    def token(self, index: int = 0, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = now
        previous = self.last.get(index)
        if previous is not None:
            self.itl.observe(now - previous)
        self.last[index] = now
        self.tokens += 1

    def finished(self, reason: str) -> None:
        self.finish[reason] = self.finish.get(reason, 0) + 1

    def stats(self) -> dict:
        end = time.perf_counter()
        ttft = None if self.first is None else self.first - self.start
        return {"prompt_tokens": self.prompt_tokens, "generation_tokens": self.tokens,
                "ttft_s": ttft, "e2e_s": end - self.start, "itl": self.itl.to_wire(),
                "finish": dict(self.finish), "adapter": self.adapter,
                "start_unix": self.start_unix,
                "first_token_unix": None if ttft is None else self.start_unix + ttft}


# Engine-wide Stats keys (module docstring).
ENGINE_GAUGES = ("running", "waiting", "kv_blocks_total", "kv_blocks_used")
ENGINE_COUNTERS = ("prefix_queries", "prefix_hits", "preemptions")


def add_engine_counters(total: dict, stats: dict) -> dict:
    """`total` plus one worker group's cumulative counters and batch-size histogram (gauges are
    not added: they describe a moment, not a history)."""
    out = dict(total)
    for k in ENGINE_COUNTERS:
        if k in stats:
            out[k] = out.get(k, 0) + stats[k]
    if "batch_size" in stats:
        h = Histogram(BATCH_BUCKETS)
        if "batch_size" in out:
            h.add(out["batch_size"])
        h.add(stats["batch_size"])
        out["batch_size"] = h.to_wire()
    return out
