"""Capacity planning: for each GPU type and KV budget, the batch and GPU count that serve a target rate of generated
tokens within a per-step latency bound and the GPU's memory, with cost and energy per token."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import memory
from .inputs import Setup
from .predict import request, request_cached, request_peak_cached, step_time


@dataclass(frozen=True)
class Option:
    gpu: str
    kv_ratio: float
    policy: str
    feasible: bool
    why: str  # what stops it, or ''
    tp: int = 1  # GPUs per tensor-parallel group (one replica of the model)
    batch: int = 0
    gpus_needed: int = 0
    tokens_per_s_per_gpu: float = 0.0
    step_ms: float = 0.0  # the slowest decode step of a request (at the longest context)
    ttft_ms: float = 0.0
    request_ms: float = 0.0
    usd_per_million_tokens: float | None = None
    joules_per_token: float = 0.0


def best_batch(s: Setup, prompt: int, gen: int, max_step_ms: float | None, batch_cap: int = 4096) -> Option:
    """The batch with the most generated tokens/s per GPU whose request fits and whose slowest step meets the bound."""
    label = dict(gpu=s.hw.name, kv_ratio=s.policy.kv_ratio, policy=s.policy.kind if s.policy.evicts else "full",
                 tp=s.tp)
    cached = request_cached(s, prompt, gen)
    peak = request_peak_cached(s, prompt, cached)
    top = int(min(batch_cap, memory.max_batch(s.hw, s.workload, s.policy, s.dtypes, s.engine, peak)))
    if top < 1:
        return Option(**label, feasible=False, why="the weights and one request do not fit in memory")
    B = np.arange(1, top + 1)
    last = cached[-1:] if cached.size else np.array([peak])
    step = step_time(s, B, last).seconds * 1e3
    ok = np.ones_like(step, dtype=bool) if max_step_ms is None else step <= max_step_ms
    if not ok.any():
        return Option(**label, feasible=False, why=f"even batch 1 takes {step[0]:.1f} ms per step")
    req = request(s, B[ok], prompt, gen)
    rate = req["request_tokens_per_s"] / s.tp  # a replica's tokens/s shared by its tp GPUs
    i = int(np.argmax(rate))
    b = int(B[ok][i])
    power = s.hw.tdp_w * s.engine.power_fraction_of_tdp
    return Option(**label, feasible=True, why="", batch=b, tokens_per_s_per_gpu=float(rate[i]),
                  step_ms=float(step[ok][i]), ttft_ms=float(req["ttft_ms"][i]), request_ms=float(req["total_ms"][i]),
                  joules_per_token=s.tp * power * float(req["total_ms"][i]) / 1e3 / (b * gen))


def plan(setups: list[Setup], prompt: int, gen: int, target_tokens_per_s: float, max_step_ms: float | None,
         prices: dict[str, float]) -> list[Option]:
    """Every (GPU, KV budget, tensor-parallel degree) option, best first: cheapest per token where prices are
    known, else fewest GPUs. GPUs come in whole tensor-parallel groups."""
    import dataclasses

    options = []
    for s in setups:
        o = best_batch(s, prompt, gen, max_step_ms)
        if o.feasible:
            price = prices.get(s.hw.name, s.hw.usd_per_hour)
            o = dataclasses.replace(
                o, gpus_needed=s.tp * math.ceil(target_tokens_per_s / (o.tokens_per_s_per_gpu * s.tp)),
                usd_per_million_tokens=None if price is None else price / (o.tokens_per_s_per_gpu * 3600) * 1e6)
        options.append(o)

    def key(o: Option):
        cost = o.usd_per_million_tokens if o.usd_per_million_tokens is not None else math.inf
        return (not o.feasible, cost, o.gpus_needed, -o.tokens_per_s_per_gpu)

    return sorted(options, key=key)
