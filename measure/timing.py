"""Time GPU work with CUDA events: warm-up first, one event pair per step, medians and percentiles over many steps."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    std_ms: float
    n: int
    warmup_s: float  # wall time of the warm-up (includes any compilation or graph capture that ran in it)
    samples: tuple[float, ...] = ()  # every step's ms, in the order they ran

    @classmethod
    def of(cls, samples: list[float], warmup_s: float) -> "Timing":
        s = sorted(samples)
        q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]  # noqa: E731
        return cls(statistics.median(s), q(0.1), q(0.9), s[0], statistics.pstdev(s), len(s), warmup_s, tuple(samples))


def time_steps(step: Callable[[], object], steps: int = 50, warmup: int = 10,
               after: Callable[[], object] | None = None) -> Timing:
    """Run `warmup` untimed steps, then time each of `steps` steps with its own pair of CUDA events; `after` runs
    after each step, outside its events (to put a cache back as it was)."""
    after = after or (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
        after()
    if not torch.cuda.is_available():  # CPU tests of the code around timing: wall clock (never a measurement)
        return _wall_clock(step, steps, after, time.perf_counter() - t0)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for i in range(steps):
        starts[i].record()
        step()
        ends[i].record()
        after()
    torch.cuda.synchronize()
    return Timing.of([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup_s)


def _wall_clock(step, steps: int, after, warmup_s: float) -> Timing:
    samples = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t) * 1e3)
        after()
    return Timing.of(samples, warmup_s)


def host_launch_us(n: int = 400, bursts: int = 5) -> float | None:
    """Host microseconds to launch one tiny CUDA op (no sync between launches; the median of `bursts` bursts of
    `n`, as one burst can land on a hiccup): how fast this host dispatches kernels right now, which bounds an
    eager step (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    x = torch.zeros(16, device="cuda")
    per_burst = []
    for _ in range(bursts):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            x.add_(1.0)
        per_burst.append((time.perf_counter() - t) * 1e6 / n)
    torch.cuda.synchronize()
    return statistics.median(per_burst)


def capture_graph(step: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture `step` in a CUDA graph after warm-up on a side stream (as torch's documentation prescribes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph
