"""Time of each op on a GPU: max(bytes / achieved bandwidth, FLOPs / achieved compute) + kernels x fixed cost.

Sums give a decode step, prefill (time to first token) and a whole request. Time is also split by what bounds it:
memory time goes to weights, KV or other bytes in proportion to their transfer times; compute time and fixed
overhead are their own shares.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .dtypes import DType
from .engine import Engine
from .hardware import Hardware
from .ops import Op


@dataclass(frozen=True)
class StepTime:
    """Totals over the ops of one step (arrays of the broadcast shape), seconds and bytes."""

    seconds: np.ndarray
    weight_s: np.ndarray  # time attributed to streaming weights
    kv_s: np.ndarray  # ... to reading and writing the KV cache
    other_mem_s: np.ndarray  # ... to activations, scores and logits
    compute_s: np.ndarray  # ... to ops whose FLOPs outlast their bytes
    overhead_s: np.ndarray  # fixed per-kernel and per-step cost
    kernels: np.ndarray  # kernels launched per step
    per_op: dict[str, np.ndarray]  # op name -> seconds
    host_s: np.ndarray = 0.0  # time the GPU waits for the host to dispatch kernels (eager frameworks)
    host_ops: np.ndarray = 0.0  # operations the host dispatches per step (eager frameworks; 0 for graph replays)
    comm_s: np.ndarray = 0.0  # all-reduces between tensor-parallel GPUs

    @property
    def memory_s(self):
        return self.weight_s + self.kv_s + self.other_mem_s


def attention_occupancy(engine: Engine, work_items) -> np.ndarray:
    """Fraction of the KV bandwidth attention reaches with `work_items` parallel (batch x KV head x split) blocks."""
    if engine.attention_saturation_items <= 0:
        return np.ones_like(np.asarray(work_items, dtype=float))
    return np.minimum(1.0, np.asarray(work_items, dtype=float) / engine.attention_saturation_items)


def op_times(ops: list[Op], hw: Hardware, engine: Engine, compute: DType, batch_heads=None, cached=None,
             fixed_s: float = 0.0, split_tokens: float = 0.0, kernel_us: float | None = None,
             logit_passes: float | None = None, batch=None, kv_traffic=None, kv_strided=None,
             scorer_streams: bool = False) -> StepTime:
    """Price `ops` on `hw` under `engine`.

    `batch_heads` and `cached` (arrays) size attention's parallelism, split along the cache every `split_tokens`;
    `kernel_us` and `logit_passes` override the engine's decode values (prefill has its own); `batch` (decode
    only) picks the engine's matrix-vector kernels where it is at most matvec_max_batch; `kv_traffic` overrides
    the engine's kv_traffic_factor (an evicting cache's, or a model's counted passes); `kv_strided`: passes over
    the attended KV through strided copies, at the engine's strided_copy_gbps_per_sm on each of hw's SMs;
    `scorer_streams`: the scorer's logit passes were counted (Engine.kv_passes) and run at kv_bandwidth_fraction.
    Op attention_scores (a counted prefill's materialised scores, ops.counted_prefill_ops) runs at
    score_bandwidth_fraction.
    """
    passes = engine.keyformer_logit_passes if logit_passes is None else logit_passes
    kv_traffic = engine.kv_traffic_factor if kv_traffic is None else kv_traffic
    fused_scorer = engine.keyformer_flops_per_kv_byte if logit_passes is None else 0.0  # decode only
    base_us = engine.kernel_overhead_us if kernel_us is None else kernel_us
    bw = hw.bandwidth_bytes_per_s
    tensor_peak = hw.peak_flops(compute)
    vector_peak = hw.peak_dense_tflops["fp32"] * 1e12
    occupancy = 1.0
    if batch_heads is not None:
        splits = np.ones_like(np.asarray(cached, dtype=float))
        if split_tokens > 0:
            # continuous, not ceil: a whole extra split per token would make time fall as context grows
            splits = np.maximum(1.0, np.asarray(cached, dtype=float) / split_tokens)
        occupancy = attention_occupancy(engine, np.asarray(batch_heads, dtype=float) * splits)
    zero = np.zeros(np.broadcast(*(o.flops for o in ops)).shape)
    weight_s, kv_s, other_s, compute_s, overhead_s, kernels = (zero.copy() for _ in range(6))
    matvec = zero.astype(bool)
    if batch is not None and engine.matvec_max_batch > 0:
        matvec = np.broadcast_to(np.asarray(batch, dtype=float) <= engine.matvec_max_batch, zero.shape)
    weight_frac = np.where(matvec, engine.matvec_bandwidth_fraction, engine.weight_bandwidth_fraction)
    per_op = {}
    kv_bw = bw * engine.kv_bandwidth_fraction
    per_sm = engine.strided_copy_gbps_per_sm
    strided_bw = per_sm * 1e9 * hw.sm_count if per_sm else kv_bw
    attention_s, attention_kv_bytes = zero, zero
    for op in ops:
        tw = op.weight_bytes / (bw * weight_frac)
        # occupancy throttles the split reads only: the one new token's write does not split, and charging it
        # there would make time per token fall as a longer cache adds splits
        tk = kv_traffic * op.kv_read_bytes / (kv_bw * occupancy) + op.kv_write_bytes / kv_bw
        if kv_strided is not None:  # copies, not attention's reads: not throttled by its parallelism
            tk = tk + kv_strided * op.kv_read_bytes / strided_bw
        if op.name == "attention_scores":
            to = op.other_bytes / (bw * engine.score_bandwidth_fraction)
        elif scorer_streams:  # a counted scorer: its passes stream as the stack's other counted passes do
            to = op.other_bytes / (bw * engine.other_bandwidth_fraction) + passes * op.logit_pass_bytes / kv_bw
        else:
            to = (op.other_bytes + passes * op.logit_pass_bytes) / (bw * engine.other_bandwidth_fraction)
        t_mem = tw + tk + to
        if op.tensor:
            frac = engine.attention_compute_fraction if op.kind == "attention" else engine.gemm_compute_fraction
            t_flop = op.flops / (tensor_peak * frac)
        else:
            t_flop = op.flops / vector_peak
        n_kernels = op.launches * np.where(matvec, engine.matvec_kernels(op.kind),
                                           engine.kernels(op.kind))
        t_fixed = n_kernels * base_us * 1e-6
        hidden = zero  # a fused scorer's arithmetic beyond what the attention kernel's KV reads (or FLOPs) hide
        if op.name == "attention":
            # the longer of the KV reads and the FLOPs: hiding behind the KV reads alone would let a faster
            # memory make a compute-bound step slower (the scorer would hide behind less)
            attention_s, attention_kv_bytes = np.maximum(tk, t_flop), op.kv_read_bytes + op.kv_write_bytes
        elif op.kind == "keyformer" and fused_scorer > 0:
            hidden = np.maximum(0.0, fused_scorer * attention_kv_bytes / vector_peak - attention_s)
            compute_s += hidden
        memory_bound = t_mem >= t_flop
        weight_s += np.where(memory_bound, tw, 0.0)
        kv_s += np.where(memory_bound, tk, 0.0)
        other_s += np.where(memory_bound, to, 0.0)
        compute_s += np.where(memory_bound, 0.0, t_flop)
        overhead_s += t_fixed
        kernels += n_kernels
        per_op[op.name] = np.maximum(t_mem, t_flop) + hidden + t_fixed
    overhead_s += fixed_s
    total = weight_s + kv_s + other_s + compute_s + overhead_s
    return StepTime(total, weight_s, kv_s, other_s, compute_s, overhead_s, kernels, per_op)


def with_host(t: StepTime, engine: Engine, host_fixed_s: float = 0.0, dispatched=None,
              host_launch_us=None) -> StepTime:
    """The step of an eager framework: the longer of the host's dispatch (every kernel, or the `dispatched`
    operations where they were counted, plus `host_fixed_s`) and the GPU's work; the difference is time the GPU
    waits (host_s). `host_launch_us`: this host's launch cost, against the engine's (host_speed_ratio). Graph
    replays dispatch nothing: unchanged."""
    if engine.host_us_per_kernel <= 0 and host_fixed_s <= 0:
        return t
    ops = t.kernels if dispatched is None else dispatched
    host = (ops * engine.host_us_per_kernel * 1e-6 + host_fixed_s) * host_speed_ratio(engine, host_launch_us)
    wait = np.maximum(0.0, host - t.seconds)
    return dataclasses.replace(t, seconds=t.seconds + wait, host_s=wait, host_ops=ops)


def host_speed_ratio(engine: Engine, host_launch_us: float | None) -> float:
    """How much slower than the engine's own host a host dispatches (its launch cost over the engine's; 1 where
    either is unknown)."""
    if host_launch_us is None or not np.isfinite(host_launch_us) or host_launch_us <= 0 or not engine.host_launch_us:
        return 1.0
    return host_launch_us / engine.host_launch_us


def with_comm(t: StepTime, comm_s) -> StepTime:
    """The step with its tensor-parallel all-reduces, which wait for the layer before them (not overlapped)."""
    if not np.any(comm_s):
        return t
    return dataclasses.replace(t, seconds=t.seconds + comm_s, comm_s=comm_s)


def bound_of(t: StepTime) -> np.ndarray:
    """Which resource takes most of the step: 'memory', 'compute', 'overhead', 'host' (a GPU waiting for an
    eager framework to dispatch kernels) or 'communication' (tensor-parallel all-reduces)."""
    parts = np.stack(np.broadcast_arrays(t.memory_s, t.compute_s, t.overhead_s, t.host_s, t.comm_s))
    return np.array(["memory", "compute", "overhead", "host", "communication"])[np.argmax(parts, axis=0)]
