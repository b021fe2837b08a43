"""One entry point for predictions: decode step, prefill and whole request, vectorised over batch and context.

`predict(...)` returns a dict of numpy arrays (one element per configuration) whose keys are the `--json` fields.
"""
from __future__ import annotations

import numpy as np

from . import memory
from .errors import KfsimError
from .inputs import Setup
from .ops import attended_tokens, counted_prefill_ops, decode_ops, prefill_ops
from .policy import Policy
from .power import board_power_w
from .parallel import comm_s
from .roofline import StepTime, bound_of, op_times, with_comm, with_host


def _check_positive_ints(**arrays) -> None:
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.size and (np.any(a < 1) or np.any(a != np.floor(a))):
            bad = a[(a < 1) | (a != np.floor(a))].flat[0]
            raise KfsimError(f"{name} {bad:g} is out of range; allowed: a whole number >= 1")


def step_time(s: Setup, batch, cached, ops=None) -> StepTime:
    """Time of one decode step with `batch` sequences each attending to `cached` tokens (`ops` if precomputed)."""
    ops = ops if ops is not None else decode_ops(s.workload, s.policy, s.dtypes, batch, cached)
    batch_heads = np.asarray(batch, dtype=float) * s.workload.n_kv_heads
    split = s.engine.evicting_attention_split_tokens if s.policy.evicts else s.engine.attention_split_tokens
    traffic = s.engine.evicting_kv_traffic_factor if s.policy.evicts else None
    strided = logit_passes = None
    scored = s.engine.counted_scored_passes(s.workload, s.policy.kind) if s.policy.scored else None
    counted = None if s.policy.evicts or scored else s.engine.counted_kv_passes(s.workload, batch, cached)
    if scored is not None:
        traffic, logit_passes = scored[0], _counted_logit_passes(s, scored[1])
    elif counted is not None:
        traffic, strided = counted
    elif s.engine.grouped_kv_expansion and not s.policy.evicts:  # an evicting cache attends through its own path
        group = s.workload.n_heads / s.workload.n_kv_heads
        traffic = (traffic or s.engine.kv_traffic_factor) * (1.0 + s.engine.grouped_kv_expansion * (group - 1.0))
    fixed_us = s.engine.step_overhead_us + s.workload.n_layers * s.engine.layer_overhead_us
    t = op_times(ops, s.hw, s.engine, s.dtypes.compute, batch_heads=batch_heads, cached=cached,
                 fixed_s=fixed_us * 1e-6, split_tokens=split, batch=batch, kv_traffic=traffic, kv_strided=strided,
                 logit_passes=logit_passes, scorer_streams=scored is not None)
    t = with_host(t, s.engine, s.engine.host_step_us * 1e-6, s.engine.dispatched_ops(s.workload, s.policy.scored),
                  s.host_launch_us)
    return with_comm(t, comm_s(s.workload, s.hw, s.tp, batch, s.dtypes.compute.bytes, s.engine) if s.tp > 1 else 0.0)


def logit_passes_of(s: Setup) -> float:
    """Passes a decode step's scorer makes over its fp32 logits: the engine's, or where the engine counted the
    model's scored cache (Engine.counted_scored_passes) its scorer's own."""
    scored = s.engine.counted_scored_passes(s.workload, s.policy.kind) if s.policy.scored else None
    return s.engine.keyformer_logit_passes if scored is None else _counted_logit_passes(s, scored[1])


def _counted_logit_passes(s: Setup, scorer: float) -> float:
    """`scorer` passes per kept KV byte as passes over fp32 logits, the unit the scoring op is priced in (ops: one
    fp32 logit per query head and kept token, beside the score buffer's 8 bytes per KV head the op counts)."""
    w = s.workload
    kv_token = 2 * w.n_kv_heads * w.head_dim * s.dtypes.kv.bytes  # K and V of one token in one layer
    return max(0.0, scorer * kv_token - 8.0 * w.n_kv_heads) / (4.0 * w.n_heads)


def prefill_time(s: Setup, batch, prompt, ops=None) -> StepTime:
    """Time to first token: the whole prompt through the model (compute-bound at long prompts). An eager stack's
    host dispatches one forward's operations whatever the prompt's length, as for a decode step, so the host binds
    short prompts (transformers, H100: 22-28 ms for 128-512 tokens of Llama-3-8B or GPT-J-6B, about a decode
    step's time; data/h100-sxm-hf-prefill). Where the engine counted the model's prefill attention
    (Engine.prefill_attention), attention and scorer are priced by that count."""
    ops = ops if ops is not None else prefill_ops(s.workload, s.policy, s.dtypes, batch, prompt)
    counts = s.engine.counted_prefill(s.workload, s.policy.kind)
    if counts is not None:
        ops = counted_prefill_ops(ops, s.workload, counts, batch, prompt)
    t = op_times(ops, s.hw, s.engine, s.dtypes.compute, kernel_us=s.engine.prefill_kernel_overhead_us,
                 logit_passes=s.engine.keyformer_prefill_logit_passes)
    return with_host(t, s.engine, s.engine.host_step_us * 1e-6, s.engine.dispatched_ops(s.workload, s.policy.scored),
                     s.host_launch_us)


def request_cached(s: Setup, prompt: int, gen: int) -> np.ndarray:
    """Tokens attended at each of the gen-1 decode steps of a request (the first token comes from prefill).

    The full cache grows by one token per step. A reducing policy fixes its budget at kv_ratio x prompt after
    prefill and then evicts one token per new one (as the Keyformer authors' code does), so its cache stays flat.
    """
    contexts = prompt + np.arange(1, gen)
    if s.policy.evicts:
        budget = s.policy.budget(np.array(prompt))
        cached = np.minimum(contexts, budget)
        if s.workload.sliding_window:
            cached = np.minimum(cached, s.workload.sliding_window)
        return cached
    return attended_tokens(s.workload, s.policy, contexts)


def request_peak_cached(s: Setup, prompt: int, cached: np.ndarray) -> int:
    """Most tokens a request's cache holds: prefill keeps the whole prompt's KV before a reducing policy compacts
    it to its budget; `cached` are the decode steps' tokens (request_cached)."""
    prompt_cached = attended_tokens(s.workload, Policy("full"), np.array(prompt))
    return max(int(prompt_cached), int(cached.max()) if cached.size else 0)


def traffic(ops, logit_passes: float) -> dict:
    """A step's bytes by kind and its FLOPs, summed over `ops`; `other` includes `logit_passes` over materialised
    scoring logits (logit_passes_of), and `moved` is every byte."""
    total = lambda attr: sum(getattr(o, attr) for o in ops)  # noqa: E731
    out = {k: total(f"{k}_bytes") for k in ("weight", "kv_read", "kv_write", "other")}
    out["other"] = out["other"] + logit_passes * total("logit_pass_bytes")
    out["moved"] = out["weight"] + out["kv_read"] + out["kv_write"] + out["other"]
    out["flops"] = total("flops")
    return out


def _step_fields(s: Setup, batch, seq) -> dict:
    cached = attended_tokens(s.workload, s.policy, seq)
    ops = decode_ops(s.workload, s.policy, s.dtypes, batch, cached)
    t = step_time(s, batch, cached, ops)
    tr = traffic(ops, logit_passes_of(s))
    weight, kv_read, kv_write, other, moved, flops = (tr[k] for k in ("weight", "kv_read", "kv_write", "other",
                                                                      "moved", "flops"))
    B = np.asarray(batch, dtype=float) * np.ones_like(t.seconds)
    mem = memory.footprint(s.workload, s.policy, s.dtypes, s.engine, batch, cached)
    power = board_power_w(s.hw, moved, flops, t.seconds, s.engine.power_fraction_of_tdp)
    return {
        "step_ms": t.seconds * 1e3,
        "tokens_per_s": B / t.seconds,
        "cached_tokens": cached * np.ones_like(t.seconds),
        "weight_bytes": weight,
        "kv_bytes": kv_read + kv_write,
        "kv_read_bytes": kv_read,
        "kv_write_bytes": kv_write,
        "other_bytes": other,
        "flops": flops,
        "arithmetic_intensity": flops / moved,
        "ridge_point": np.full_like(t.seconds, s.hw.ridge_point(s.dtypes.compute)),
        "achieved_bandwidth_gbps": moved / t.seconds / 1e9,
        "weights_ms": t.weight_s * 1e3,
        "kv_ms": t.kv_s * 1e3,
        "other_memory_ms": t.other_mem_s * 1e3,
        "compute_ms": t.compute_s * 1e3,
        "overhead_ms": t.overhead_s * 1e3,
        "host_wait_ms": t.host_s * 1e3 * np.ones_like(t.seconds),
        "comm_ms": t.comm_s * 1e3 * np.ones_like(t.seconds),
        "tp": np.full(np.shape(t.seconds), s.tp),
        "kernels": t.kernels * np.ones_like(t.seconds),
        "host_ops": t.host_ops * np.ones_like(t.seconds),
        "bound": bound_of(t),
        "memory_bytes": mem,
        "memory_capacity_bytes": np.full_like(t.seconds, s.hw.memory_bytes),
        "fits": mem <= s.hw.memory_bytes,
        "max_batch": memory.max_batch(s.hw, s.workload, s.policy, s.dtypes, s.engine, cached) * np.ones_like(
            t.seconds, dtype=np.int64),
        "energy_per_token_j": power * t.seconds / B,
        "board_power_w": power * np.ones_like(t.seconds),
    }


def predict(s: Setup, batch, seq, prompt_len: int | None = None, gen_len: int | None = None) -> dict:
    """Predict a decode step at context `seq` (arrays broadcast); with prompt and gen lengths, a whole request too.

    `speedup_vs_full` compares with the same setup under the full cache.
    """
    _check_positive_ints(batch=batch, seq=seq)
    out = _step_fields(s, batch, seq)
    full = s.with_policy(Policy("full"))
    ft = step_time(full, batch, attended_tokens(s.workload, full.policy, seq))
    full_step = ft.seconds * 1e3
    out["full_step_ms"] = full_step
    out["speedup_vs_full"] = full_step / out["step_ms"]
    # the full cache's breakdown, so that a reader sees which term a policy grew or shrank
    for name, part in (("weights_ms", ft.weight_s), ("kv_ms", ft.kv_s), ("other_memory_ms", ft.other_mem_s),
                       ("compute_ms", ft.compute_s), ("overhead_ms", ft.overhead_s), ("host_wait_ms", ft.host_s)):
        out[f"full_{name}"] = part * 1e3 * np.ones_like(full_step)
    out["full_kernels"] = ft.kernels * np.ones_like(full_step)
    out["full_host_ops"] = ft.host_ops * np.ones_like(full_step)
    if prompt_len is not None or gen_len is not None:
        if prompt_len is None or gen_len is None:
            raise KfsimError("a request needs both --prompt-len and --gen-len")
        _check_positive_ints(**{"prompt-len": prompt_len, "gen-len": gen_len})
        req = request(s, batch, int(prompt_len), int(gen_len))
        req_full = request(full, batch, int(prompt_len), int(gen_len))
        out.update(req)
        out["request_speedup_vs_full"] = req_full["total_ms"] / req["total_ms"]
    return out


def largest_batch(s: Setup, seq: int) -> dict:
    """At context `seq`, the largest batch that fits in memory and its tokens/s, for `s` and for the same setup
    with the full cache: a reducing policy's memory dividend (more sequences per GPU). 0 and 0 where none fits."""
    out = {}
    for prefix, setup in (("", s), ("full_", s.with_policy(Policy("full")))):
        cached = attended_tokens(setup.workload, setup.policy, np.array(seq))
        n = int(memory.max_batch(setup.hw, setup.workload, setup.policy, setup.dtypes, setup.engine, cached))
        rate = float(n / step_time(setup, n, cached).seconds) if n > 0 else 0.0
        out[f"{prefix}max_batch"] = n
        out[f"{prefix}max_batch_tokens_per_s"] = rate
    return out


#: most decode steps of one request priced one by one; a longer generation is priced from this many steps, each
#: the midpoint of an equal share of the steps (a step's time is continuous and piecewise linear in its cached
#: tokens, so the sum moves by less than 0.1 %, tests/test_predict.py)
PRICED_STEPS = 1024


def _decode_seconds(s: Setup, B: np.ndarray, cached: np.ndarray) -> np.ndarray:
    """Sum of the decode steps' times of a request at each batch in `B` (one step per cached length)."""
    if not cached.size:
        return np.zeros(B.shape)
    if cached.size <= PRICED_STEPS:
        return step_time(s, B[..., None], cached).seconds.sum(axis=-1)
    mid = ((np.arange(PRICED_STEPS) + 0.5) * cached.size / PRICED_STEPS).astype(np.int64)
    return step_time(s, B[..., None], cached[mid]).seconds.mean(axis=-1) * cached.size


def request(s: Setup, batch, prompt: int, gen: int) -> dict:
    """Time to first token, the whole request, and the peak memory of `batch` requests of prompt + gen tokens."""
    B = np.asarray(batch, dtype=float)
    ttft = prefill_time(s, B, prompt).seconds
    cached = request_cached(s, prompt, gen)  # shape (gen-1,)
    decode = _decode_seconds(s, B, cached)
    total = ttft + decode
    peak = memory.footprint(s.workload, s.policy, s.dtypes, s.engine, B, request_peak_cached(s, prompt, cached))
    return {
        "prompt_len": np.full(B.shape, prompt),
        "gen_len": np.full(B.shape, gen),
        "ttft_ms": ttft * 1e3,
        "decode_ms": decode * 1e3,
        "total_ms": total * 1e3,
        "request_tokens_per_s": B * gen / total,
        "request_memory_bytes": peak,
        "request_fits": peak <= s.hw.memory_bytes,
    }
