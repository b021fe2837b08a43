"""GPU memory a configuration holds (weights + KV + scores + workspace), whether it fits, the largest batch that does."""
from __future__ import annotations

import numpy as np

from .engine import Engine
from .hardware import Hardware
from .ops import Dtypes
from .policy import Policy
from .workload import Workload

LOGIT_BYTES = 4  # fp32 logits of the last token per sequence, for sampling


def per_sequence_bytes(w: Workload, policy: Policy, dt: Dtypes, cached) -> np.ndarray:
    """Memory one sequence adds: its KV cache of `cached` tokens, its fp32 scores if scored, its logits."""
    cached = np.asarray(cached, dtype=float)
    kv = cached * w.kv_bytes_per_token(dt.kv)
    scores = cached * w.n_layers * w.n_kv_heads * 4 if policy.scored else 0.0
    return kv + scores + w.vocab_size * LOGIT_BYTES


def fixed_bytes(w: Workload, dt: Dtypes, engine: Engine) -> float:
    """Memory held whatever the batch: stored weights and the engine's workspace."""
    return w.n_params * dt.weight.bytes + engine.workspace_gb * 1e9


def footprint(w: Workload, policy: Policy, dt: Dtypes, engine: Engine, batch, cached) -> np.ndarray:
    return fixed_bytes(w, dt, engine) + np.asarray(batch, dtype=float) * per_sequence_bytes(w, policy, dt, cached)


def max_batch(hw: Hardware, w: Workload, policy: Policy, dt: Dtypes, engine: Engine, cached) -> np.ndarray:
    """Largest whole batch whose footprint fits in the GPU's memory (0 where not even the weights fit)."""
    room = hw.memory_bytes - fixed_bytes(w, dt, engine)
    return np.maximum(0, np.floor(room / per_sequence_bytes(w, policy, dt, cached))).astype(np.int64)
