"""Tensor parallelism, Megatron-style: each of `tp` GPUs holds 1/tp of the attention heads, FFN columns and
vocabulary (the KV heads split too, replicated where tp exceeds them), and every layer all-reduces the
activations twice (after attention's output projection and after the FFN's down projection)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .engine import Engine
from .errors import KfsimError
from .hardware import Hardware
from .workload import Workload

#: all-reduces of the activations per layer: after the row-parallel output projection and FFN down projection
ALLREDUCES_PER_LAYER = 2
#: largest tensor-parallel degree accepted: one node of 8 GPUs, and a power of two for head splits
TP_DEGREES = (1, 2, 4, 8)


def check_tp(w: Workload, tp: int) -> None:
    """A one-line error where `w` cannot be split over `tp` GPUs."""
    if tp not in TP_DEGREES:
        raise KfsimError(f"--tp {tp}: allowed: {', '.join(map(str, TP_DEGREES))} (GPUs of one node)")
    if w.n_heads % tp:
        raise KfsimError(f"--tp {tp}: model {w.name} has {w.n_heads} attention heads, not divisible by {tp}")
    if w.n_kv_heads % tp and tp % w.n_kv_heads:
        raise KfsimError(f"--tp {tp}: model {w.name}'s {w.n_kv_heads} KV heads can be neither split over nor "
                         f"replicated across {tp} GPUs")


def shard(w: Workload, tp: int) -> Workload:
    """The part of `w` one GPU holds and runs at tensor-parallel degree `tp` (tp 1: `w` itself)."""
    check_tp(w, tp)
    if tp == 1:
        return w
    return dataclasses.replace(
        w, n_heads=w.n_heads // tp, n_kv_heads=max(1, w.n_kv_heads // tp), head_dim=w.head_dim,
        rotary_dim=w.rotary_dim, ffn_dim=math.ceil(w.ffn_dim / tp), vocab_size=math.ceil(w.vocab_size / tp))


def bus_factor(tp: int) -> float:
    """Bytes each GPU sends per byte of message in a ring all-reduce: 2(tp - 1)/tp (NCCL's "bus bandwidth")."""
    return 2 * (tp - 1) / tp


def allreduce_s(hw: Hardware, message_bytes, tp: int, engine: Engine | None = None) -> np.ndarray:
    """One ring all-reduce of `message_bytes` over `tp` GPUs: a fixed time per all-reduce (the engine's measured
    allreduce_latency_us, else the profile's link latency) plus 2(tp-1)/tp of the message over one direction of
    the GPU's interconnect (its datasheet figure is both directions) at the engine's achieved fraction."""
    if tp <= 1:
        return np.zeros_like(np.asarray(message_bytes, dtype=float))
    fraction = engine.interconnect_bandwidth_fraction if engine is not None else 1.0
    latency = engine.allreduce_latency_us if engine is not None and engine.allreduce_latency_us is not None \
        else hw.interconnect_latency_us
    one_way = hw.interconnect_gbps / 2 * 1e9 * fraction
    if one_way <= 0 or latency is None:
        raise KfsimError(f"GPU {hw.name}: --tp {tp} needs interconnect_gbps > 0 and interconnect_latency_us in its "
                         f"profile (has {hw.interconnect_gbps:g} GB/s, latency {hw.interconnect_latency_us})")
    return latency * 1e-6 + bus_factor(tp) * np.asarray(message_bytes, dtype=float) / one_way


def message_bytes(w: Workload, batch, act_bytes: float) -> np.ndarray:
    """One all-reduce's message in a decode step: the batch's activations, batch x d_model."""
    return np.asarray(batch, dtype=float) * w.d_model * act_bytes


def comm_s(w: Workload, hw: Hardware, tp: int, batch, act_bytes: float, engine: Engine | None = None) -> np.ndarray:
    """Time a decode step spends all-reducing activations: ALLREDUCES_PER_LAYER per layer."""
    return w.n_layers * ALLREDUCES_PER_LAYER * allreduce_s(hw, message_bytes(w, batch, act_bytes), tp, engine)
