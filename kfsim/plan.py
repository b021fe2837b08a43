"""Capacity planning: for each GPU type and KV budget, the batch and GPU count that serve a target rate of generated
tokens within a per-step latency bound and the GPU's memory, with cost and energy per token."""
from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class ServingOption:
    """One deployment serving a request rate within latency targets (found by simulation)."""

    gpu: str
    tp: int
    kv_ratio: float
    policy: str
    feasible: bool
    why: str
    rate_per_replica: float = 0.0  # requests/s one replica sustains within the targets
    replicas: int = 0
    gpus_needed: int = 0
    ttft_p90_ms: float = 0.0
    tpot_p90_ms: float = 0.0
    usd_per_hour: float | None = None
    usd_per_million_tokens: float | None = None


#: what names an option; its other fields are figures of a deployment that serves, and mean nothing where it cannot
LABELS = ("gpu", "tp", "kv_ratio", "policy", "feasible", "why")


def as_json(option) -> dict:
    """An option as JSON: where it is not feasible, its figures are null (never a 0 that reads as a claim)."""
    fields = dataclasses.asdict(option)
    return fields if option.feasible else {k: (v if k in LABELS else None) for k, v in fields.items()}


#: why a candidate was not simulated
NOT_SIMULATED = "a steady-state estimate ranks it below the simulated ones"
#: simulated requests per trial rate, and bisection steps per deployment
TRIAL_REQUESTS = 300
BISECTION_STEPS = 7
#: deployments simulated: the best this many by a steady-state estimate (and the best of each policy)
SIMULATED = 8


def _meets(times, rate: float, prompt: int, gen: int, cap: int, chunk: int, max_ttft_ms, max_tpot_ms):
    """(p90 TTFT ms, p90 TPOT ms, meets both) of one replica at `rate` requests/s (TRIAL_REQUESTS of them)."""
    from . import simulate as sim

    req = sim.poisson_requests(rate, TRIAL_REQUESTS, str(prompt), str(gen), seed=0)
    r = sim.simulate(times, req, cap, chunk)
    ttft, tpot = float(np.percentile(r.ttft_s, 90) * 1e3), float(np.percentile(r.tpot_s, 90) * 1e3)
    ok = (max_ttft_ms is None or ttft <= max_ttft_ms) and (max_tpot_ms is None or tpot <= max_tpot_ms)
    return ttft, tpot, ok


def plan_serving(setups: list[Setup], prompt: int, gen: int, rate: float, max_ttft_ms: float | None,
                 max_tpot_ms: float | None, prices: dict[str, float], chunk_tokens: int = 2048) -> list[ServingOption]:
    """The deployments (GPU, TP, KV budget) that serve `rate` requests/s of prompt + gen tokens with p90 time to
    first token and time per output token within the targets, cheapest first: each candidate's largest
    sustainable rate per replica is bisected by simulation (the SIMULATED most promising by a steady-state
    estimate), then replicas = ceil(rate / that rate)."""
    from . import simulate as sim

    estimates = []
    for s in setups:
        o = best_batch(s, prompt, gen, max_tpot_ms)
        price = prices.get(s.hw.name, s.hw.usd_per_hour)
        per_gpu = o.tokens_per_s_per_gpu / gen if o.feasible else 0.0  # requests/s per GPU, steady state
        estimates.append((s, o, price, per_gpu))
    ranked = sorted(range(len(estimates)), key=lambda i: (estimates[i][3] <= 0,
                                                          (estimates[i][2] or 1.0) / max(estimates[i][3], 1e-12)))
    chosen = set(ranked[:SIMULATED])
    for evicts in {s.policy.evicts for s in setups}:  # the best of each kind, to say what KV reduction buys
        chosen.add(next(i for i in ranked if estimates[i][0].policy.evicts == evicts))
    options = []
    for i, (s, o, price, per_gpu) in enumerate(estimates):
        label = dict(gpu=s.hw.name, tp=s.tp, kv_ratio=s.policy.kv_ratio,
                     policy=s.policy.kind if s.policy.evicts else "full")
        if not o.feasible:
            options.append(ServingOption(**label, feasible=False, why=o.why))
            continue
        if i not in chosen:
            options.append(ServingOption(**label, feasible=False, why=NOT_SIMULATED))
            continue
        cap = max(1, o.batch)
        times = sim.StepTimes(s, cap, prompt + gen, chunk_tokens)
        lo, hi = 0.0, 2.0 * per_gpu * s.tp  # twice the steady-state estimate of one replica
        found = None
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            ttft, tpot, ok = _meets(times, mid, prompt, gen, cap, chunk_tokens, max_ttft_ms, max_tpot_ms)
            if ok:
                lo, found = mid, (mid, ttft, tpot)
            else:
                hi = mid
        if found is None:
            options.append(ServingOption(**label, feasible=False,
                                         why=f"misses the targets even at {hi:.3g} requests/s per replica"))
            continue
        r, ttft, tpot = found
        replicas = math.ceil(rate / r)
        gpus = replicas * s.tp
        hourly = None if price is None else price * gpus
        tokens_per_hour = rate * gen * 3600
        options.append(ServingOption(**label, feasible=True, why="", rate_per_replica=r, replicas=replicas,
                                     gpus_needed=gpus, ttft_p90_ms=ttft, tpot_p90_ms=tpot, usd_per_hour=hourly,
                                     usd_per_million_tokens=None if hourly is None else hourly / tokens_per_hour * 1e6))
    key = lambda o: (not o.feasible, o.usd_per_hour if o.usd_per_hour is not None else math.inf,  # noqa: E731
                     o.gpus_needed, -o.rate_per_replica)
    return sorted(options, key=key)
