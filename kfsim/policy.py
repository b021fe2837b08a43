"""KV-cache policies: how many tokens a decode step reads, and what bookkeeping it does to choose them.

- full:      every token of the context (capped at the model's sliding window where it has one).
- keyformer: a budget of kv_ratio x context tokens = a recent window (`window` x budget) plus the key tokens with
             the highest accumulated Gumbel-softmax score (Adnan et al., MLSys 2024); one eviction per step.
- h2o:       the same structure with a plain-softmax accumulated score (Zhang et al., NeurIPS 2023).
- window:    the most recent kv_ratio x context tokens only (no score).
A budget of the whole context (kv_ratio = 1) evicts nothing: `window` is then the full cache, while `keyformer` and
`h2o` read the full cache's bytes but still score every token each step, and pay for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KfsimError

POLICIES = ("full", "keyformer", "h2o", "window")
#: Policies that keep a per-token score and so pay per-step selection work.
SCORED = ("keyformer", "h2o")
#: Keyformer authors' default recent window: 30% of the budget (d-matrix-ai/keyformer-llm `recent` = 30).
DEFAULT_WINDOW = 0.3


@dataclass(frozen=True)
class Policy:
    kind: str = "full"
    kv_ratio: float = 1.0
    window: float = DEFAULT_WINDOW

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise KfsimError(f"unknown policy {self.kind!r}; allowed: {', '.join(POLICIES)}")
        if not (0 < self.kv_ratio <= 1):
            raise KfsimError(f"kv-ratio {self.kv_ratio} is out of range; allowed: 0 < kv-ratio <= 1")
        if not (0 <= self.window <= 1):
            raise KfsimError(f"window {self.window} is out of range; allowed: 0 <= window <= 1")
        if self.kind == "full" and self.kv_ratio != 1:
            raise KfsimError(f"policy full keeps the whole cache; kv-ratio {self.kv_ratio} needs another policy "
                             f"({', '.join(p for p in POLICIES if p != 'full')})")

    @property
    def evicts(self) -> bool:
        """True where the policy keeps fewer tokens than the context (kv_ratio < 1)."""
        return self.kind != "full" and self.kv_ratio < 1

    @property
    def scored(self) -> bool:
        """True where a step scores tokens (Keyformer, H2O), at any kv-ratio: a scoring decoder pays at 1 too."""
        return self.kind in SCORED

    @property
    def is_full(self) -> bool:
        """True where a step is the full cache's: nothing evicted and nothing scored."""
        return not (self.evicts or self.scored)

    def budget(self, context) -> np.ndarray:
        """Tokens kept for a context of `context` tokens: ceil(kv_ratio x context), at least 1."""
        context = np.asarray(context)
        if not self.evicts:
            return context
        return np.maximum(1, np.ceil(self.kv_ratio * context - 1e-9)).astype(context.dtype)

    def label(self) -> str:
        if self.is_full:
            return "full"
        if not self.evicts:
            return f"{self.kind} (kv-ratio 1: keeps every token, still scores them)"
        return f"{self.kind} (kv-ratio {self.kv_ratio:g}, window {self.window:g} of budget)"


def measured_pairs(policies, kv_ratios) -> list[tuple[str, float]]:
    """(policy, kv-ratio) pairs that are distinct measurements: full only at 1, the others only below 1."""
    return [(p, r) for p in policies for r in kv_ratios if (p == "full") == (r >= 1)]


def make_policy(kind: str | None, kv_ratio: float, window: float = DEFAULT_WINDOW) -> Policy:
    """The policy the CLI means: keyformer when kv_ratio < 1 and none is named, else full."""
    if kind is None:
        kind = "keyformer" if kv_ratio < 1 else "full"
    if kind == "full" and kv_ratio == 1:
        return Policy("full", 1.0, window)
    return Policy(kind, kv_ratio, window)
