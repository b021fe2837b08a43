"""Serving simulation of one deployment under a request stream (`kfsim simulate`).

Continuous batching with chunked prefill, as vLLM and Sarathi schedule it: every engine step decodes one token
for each running request past its prompt and spends the rest of a token budget on prompt chunks, oldest request
first. A request is admitted while the batch cap and the GPU memory allow its whole prompt's KV; a reducing
policy (Keyformer) holds the prompt while it is prefilled, then only its budget (kv-ratio x prompt, as the
authors' code fixes it). When a full cache outgrows memory, the newest request is preempted: its cache is freed
and its prompt plus what it generated is prefilled again later (vLLM's recompute). Step times come from the
model (`StepTimes`), priced once on a grid of batches and cached tokens and interpolated.

The loop is iteration-level (one engine step at a time) with the running batch as numpy arrays, and it jumps
over runs of identical decode steps (no arrival it could admit, no prompt left, no request finishing), so
100,000 requests take seconds. simpy's process-per-request model would pay a generator switch per event for
no gain: one server, one queue.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .errors import KfsimError
from .inputs import Setup
from .memory import fixed_bytes, per_sequence_bytes
from .memory import max_batch as max_batch_in_memory
from .ops import attended_tokens
from .policy import Policy
from .predict import prefill_time, step_time

#: a decode step's cached-token grid: log-spaced, interpolated linearly between points
CACHED_POINTS = 96
#: most requests a simulated deployment runs at once (the step-time grid is priced up to it)
MAX_BATCH = 4096
#: longest prompt and generation of one request, as predict and plan take them
MAX_PROMPT, MAX_GEN = 10_000_000, 1_000_000


@dataclass(frozen=True)
class Requests:
    """A request stream: arrival times (s, sorted), prompt and generated tokens per request."""

    arrival_s: np.ndarray
    prompt: np.ndarray
    gen: np.ndarray

    def __post_init__(self):
        n = len(self.arrival_s)
        if not (len(self.prompt) == len(self.gen) == n) or n == 0:
            raise KfsimError("a request stream needs at least one request, each with an arrival, prompt and gen")
        if np.any(np.diff(self.arrival_s) < 0):
            raise KfsimError("request arrivals must be in time order")
        if np.any(self.prompt < 1) or np.any(self.gen < 1):
            raise KfsimError("every request needs a prompt of >= 1 token and >= 1 generated token")
        for what, tokens, top in (("prompt", self.prompt, MAX_PROMPT), ("generated", self.gen, MAX_GEN)):
            if np.any(tokens > top):
                raise KfsimError(f"a request of {int(tokens.max()):,} {what} tokens; allowed: at most {top:,}")


def _number_above(text: str, top: float) -> bool:
    try:
        return abs(float(text)) > top
    except ValueError:
        return False  # not a number: lengths() says what is allowed


def lengths(spec: str, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    """Token counts from a spec: 'N' (fixed), 'uniform:LO:HI' or 'normal:MEAN:STD' (rounded, at least 1)."""
    parts = str(spec).split(":")
    top = MAX_GEN if what == "gen-len" else MAX_PROMPT
    if any(_number_above(p, top) for p in parts[1 if len(parts) > 1 else 0:]):
        raise KfsimError(f"--{what} {spec!r}: allowed: token counts of at most {top:,}")
    try:
        if len(parts) == 1:
            value = int(parts[0])
            if value < 1:
                raise ValueError
            return np.full(n, value, dtype=np.int64)
        kind, a, b = parts[0], float(parts[1]), float(parts[2])
        if not (math.isfinite(a) and math.isfinite(b)) or len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise KfsimError(f"--{what} {spec!r}: allowed: N >= 1, uniform:LO:HI or normal:MEAN:STD") from None
    if kind == "uniform" and 1 <= a <= b:
        return rng.integers(int(a), int(b) + 1, n)
    if kind == "normal" and a >= 1 and b >= 0:
        return np.maximum(1, np.rint(rng.normal(a, b, n))).astype(np.int64)
    raise KfsimError(f"--{what} {spec!r}: allowed: N >= 1, uniform:LO:HI (1 <= LO <= HI) or "
                     f"normal:MEAN:STD (MEAN >= 1, STD >= 0)")


def poisson_requests(rate: float, n: int, prompt: str, gen: str, seed: int = 0) -> Requests:
    """`n` requests arriving as a Poisson process of `rate` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    return Requests(arrivals - arrivals[0], lengths(prompt, n, rng, "prompt-len"), lengths(gen, n, rng, "gen-len"))


def read_trace(path: str) -> Requests:
    """A trace CSV with columns arrival_s, prompt_tokens, gen_tokens (one row per request)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise KfsimError(f"--trace {path}: cannot read it ({exc.__class__.__name__})") from None
    need = ("arrival_s", "prompt_tokens", "gen_tokens")
    if not rows or any(k not in rows[0] for k in need):
        raise KfsimError(f"--trace {path}: needs a header with {', '.join(need)} and at least one row")
    out = {k: [] for k in need}
    for i, r in enumerate(rows, 2):
        for k in need:
            try:
                v = float(r[k])
            except (TypeError, ValueError):
                raise KfsimError(f"--trace {path}, line {i}: {k} {r[k]!r} is not a number") from None
            if not math.isfinite(v) or (k != "arrival_s" and (v < 1 or v != int(v))) or v < 0:
                raise KfsimError(f"--trace {path}, line {i}: {k} {r[k]!r}; allowed: arrival_s >= 0, "
                                 "token counts whole numbers >= 1")
            out[k].append(v)
    order = np.argsort(out["arrival_s"], kind="stable")
    return Requests(np.asarray(out["arrival_s"])[order], np.asarray(out["prompt_tokens"], dtype=np.int64)[order],
                    np.asarray(out["gen_tokens"], dtype=np.int64)[order])


def batch_cap(s: Setup, shortest_prompt: int, max_batch: int | None = None) -> int:
    """Requests a deployment can run at once: `max_batch` if given, else as many of the shortest prompts' caches
    as memory holds beside the weights (at least 1, at most MAX_BATCH)."""
    fit = int(max_batch_in_memory(s.hw, s.workload, s.policy, s.dtypes, s.engine,
                                  attended_tokens(s.workload, s.policy, np.asarray(shortest_prompt))))
    return min(max_batch or MAX_BATCH, MAX_BATCH, max(fit, 1))


class StepTimes:
    """A deployment's step times and memory, priced once from the model: decode steps on a grid of batch x cached
    tokens, prompt chunks on a grid of token counts."""

    def __init__(self, s: Setup, max_batch: int, max_tokens: int, chunk_tokens: int):
        self.setup = s
        self.capacity = s.hw.memory_bytes - fixed_bytes(s.workload, s.dtypes, s.engine)
        self.batches = np.arange(1, max_batch + 1)
        self.cached = np.unique(np.geomspace(1, max(2, max_tokens), CACHED_POINTS).round())
        self.decode = step_time(s, self.batches[:, None], self.cached[None, :]).seconds  # [batch, cached]
        self.chunks = np.unique(np.geomspace(1, max(2, chunk_tokens), CACHED_POINTS).round())
        self.prefill = prefill_time(s, 1, self.chunks).seconds
        self.weights = float(step_time(s, 1, 1).weight_s)  # streamed once by a step that decodes and prefills
        self.full = Policy("full")
        # a request's memory is linear in its tokens: a fixed part (logits) plus bytes per cached token
        self.per_request = float(self.held_bytes(0))
        self.per_token = float(self.held_bytes(1)) - self.per_request

    def decode_s(self, batch: int, cached) -> np.ndarray:
        """Seconds of decode steps of `batch` sequences attending `cached` tokens (array: one step each)."""
        return np.interp(cached, self.cached, self.decode[batch - 1])

    def step_s(self, batch: int, cached: float, prompt_tokens: int) -> float:
        """One engine step: `batch` decodes at mean `cached` tokens and `prompt_tokens` of prompt chunks; a step
        doing both streams the weights once."""
        d = float(self.decode_s(batch, cached)) if batch else 0.0
        p = float(np.interp(prompt_tokens, self.chunks, self.prefill)) if prompt_tokens else 0.0
        if batch and prompt_tokens:
            return max(d, p, d + p - self.weights)
        return d + p

    def held_bytes(self, tokens) -> np.ndarray:
        """Memory one request holds with `tokens` in its cache (KV, scores, logits)."""
        s = self.setup
        return per_sequence_bytes(s.workload, s.policy if s.policy.evicts else self.full, s.dtypes, tokens)

    def budget(self, prompt) -> np.ndarray:
        """Tokens a request attends once its prompt is in: the policy's budget of the prompt (the prompt itself
        for the full cache, capped at a sliding window)."""
        s = self.setup
        return attended_tokens(s.workload, s.policy, np.asarray(prompt))


@dataclass(frozen=True)
class Result:
    """Per request: first token and finish times (s, since its arrival); and the deployment's peaks."""

    ttft_s: np.ndarray
    e2e_s: np.ndarray
    gen: np.ndarray
    makespan_s: float
    peak_batch: int
    peak_memory_bytes: float
    preemptions: int

    @property
    def tpot_s(self) -> np.ndarray:
        """Time per output token after the first (0 for one-token requests)."""
        return np.where(self.gen > 1, (self.e2e_s - self.ttft_s) / np.maximum(self.gen - 1, 1), 0.0)


def check_fits(times: StepTimes, req: Requests) -> None:
    """Refuse requests whose prompt alone cannot be held beside the weights, before any simulation starts."""
    longest = int(req.prompt.max())
    if times.per_request + times.per_token * float(longest) > times.capacity:
        raise KfsimError(f"one request of {longest} prompt tokens does not fit in the GPU's memory beside the weights")


def simulate(times: StepTimes, req: Requests, max_batch: int, chunk_tokens: int, on_progress=None) -> Result:
    """Serve `req` with continuous batching (at most `max_batch` running) and chunked prefill (`chunk_tokens` a
    step, decodes included); see the module docstring."""
    check_fits(times, req)
    n = len(req.arrival_s)
    ttft = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    waiting: deque[int] = deque()
    # running requests, in admission order: id, prompt tokens still to prefill, tokens to generate, held tokens
    ids: list[int] = []
    todo: list[int] = []
    left: list[int] = []
    held: list[int] = []
    prompt_of = req.prompt.astype(np.int64).copy()  # grows by what was generated when a request is preempted
    remaining = req.gen.astype(np.int64).copy()  # tokens still to generate (kept across a preemption)
    t, nxt, done, peak_batch, peak_mem, preempted = 0.0, 0, 0, 0, 0.0, 0
    attend_growth = not times.setup.policy.evicts  # a full cache attends one more token each step
    window = times.setup.workload.sliding_window or math.inf  # ... up to a sliding window

    def used() -> float:
        """Memory the running requests hold, their prompts' whole KV counted for those still prefilling."""
        return len(held) * times.per_request + times.per_token * (sum(held) + sum(todo))

    while done < n:
        while nxt < n and req.arrival_s[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        # admit while the batch cap and memory allow the whole prompt's KV
        mem = used()
        while waiting and len(ids) < max_batch:
            i = waiting[0]
            need = times.per_request + times.per_token * float(prompt_of[i])
            if mem + need > times.capacity:
                if not ids:  # a preempted request's prompt grew by what it had generated
                    raise KfsimError(f"one preempted request of {prompt_of[i]} prompt and generated tokens does "
                                     "not fit in the GPU's memory beside the weights")
                break
            waiting.popleft()
            ids.append(i)
            todo.append(int(prompt_of[i]))
            left.append(int(remaining[i]))
            held.append(0)
            mem += need
        if not ids:
            t = float(req.arrival_s[nxt])
            continue
        peak_batch = max(peak_batch, len(ids))
        decoding = [k for k in range(len(ids)) if todo[k] == 0]
        budget = chunk_tokens - len(decoding)
        chunks = []
        for k in range(len(ids)):
            if todo[k] and budget > 0:
                c = min(todo[k], budget)
                chunks.append((k, c))
                budget -= c
        attended = np.array([held[k] for k in decoding], dtype=float) if decoding else np.zeros(0)
        if decoding and not chunks:
            # a run of identical decode steps (waiting requests, if any, are held back by memory): until a
            # request finishes, an arrival could be admitted, or a full cache runs out of memory
            steps = min(left[k] for k in decoding)
            if attend_growth:
                room = times.capacity - used()
                steps = max(1, min(steps, int(room // (times.per_token * len(decoding)))))
            cached = attended.mean() + (np.arange(steps) if attend_growth else np.zeros(steps))
            ends = t + np.cumsum(times.decode_s(len(decoding), np.minimum(cached, window)))
            if nxt < n and not waiting and len(ids) < max_batch:
                steps = max(1, min(steps, int(np.searchsorted(ends, req.arrival_s[nxt])) + 1))
            t = float(ends[steps - 1])
            for k in decoding:
                left[k] -= steps
                if attend_growth:
                    held[k] = min(held[k] + steps, window)
        else:
            step = times.step_s(len(decoding), attended.mean() if decoding else 0.0, sum(c for _, c in chunks))
            t += step
            for k in decoding:
                left[k] -= 1
                if attend_growth:
                    held[k] = min(held[k] + 1, window)
            for k, c in chunks:
                todo[k] -= c
                held[k] += c
                if todo[k] == 0:  # the prompt is in: the step's output is the next token
                    i = ids[k]
                    if np.isnan(ttft[i]):
                        ttft[i] = t - req.arrival_s[i]
                    left[k] -= 1
                    held[k] = int(times.budget(prompt_of[i]))  # a reducing policy's budget; a window's cap
        # finished requests leave; then, if a full cache outgrew memory, the newest is preempted
        if min(left) <= 0:
            keep = []
            for k in range(len(ids)):
                if todo[k] == 0 and left[k] <= 0:
                    finish[ids[k]] = t - req.arrival_s[ids[k]]
                    done += 1
                else:
                    keep.append(k)
            ids, todo, left, held = ([x[k] for k in keep] for x in (ids, todo, left, held))
        while used() > times.capacity and len(ids) > 1:
            i = ids.pop()
            remaining[i] = left.pop()
            todo.pop()
            held.pop()
            prompt_of[i] = req.prompt[i] + req.gen[i] - remaining[i]  # recomputed from scratch when readmitted
            waiting.appendleft(i)
            preempted += 1
        peak_mem = max(peak_mem, used())
        if on_progress:
            on_progress(done)
    return Result(ttft, finish, req.gen, t - float(req.arrival_s[0]), peak_batch, peak_mem, preempted)


def summary(r: Result, req: Requests, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
            capacity_bytes: float | None = None) -> dict:
    """Latency percentiles (ms), throughput and goodput (requests/s within both SLOs), peaks."""
    out = {"requests": int(len(r.e2e_s)), "makespan_s": r.makespan_s}
    for name, values in (("ttft", r.ttft_s), ("tpot", r.tpot_s), ("e2e", r.e2e_s)):
        for p in (50, 90, 99):
            out[f"{name}_p{p}_ms"] = float(np.percentile(values, p) * 1e3)
    out["throughput_tokens_per_s"] = float(req.gen.sum() / r.makespan_s) if r.makespan_s > 0 else math.inf
    out["throughput_requests_per_s"] = float(len(r.e2e_s) / r.makespan_s) if r.makespan_s > 0 else math.inf
    good = np.ones(len(r.e2e_s), dtype=bool)
    if slo_ttft_ms is not None:
        good &= r.ttft_s * 1e3 <= slo_ttft_ms
    if slo_tpot_ms is not None:
        good &= r.tpot_s * 1e3 <= slo_tpot_ms
    out["goodput_requests_per_s"] = float(good.sum() / r.makespan_s) if r.makespan_s > 0 else math.inf
    out["slo_attained"] = float(good.mean())
    out["peak_batch"] = r.peak_batch
    out["peak_memory_bytes"] = r.peak_memory_bytes
    if capacity_bytes:
        out["peak_memory_fraction"] = r.peak_memory_bytes / capacity_bytes
    out["preemptions"] = r.preemptions
    return out
