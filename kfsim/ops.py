"""The operations of one decode step and of prefill, with the FLOPs and bytes each must move.

Pure functions over numpy arrays: `batch`, `context` and `cached` broadcast, so one call prices one configuration
or a sweep of 100,000. Counts are per step (per-layer ops already multiplied by the number of layers).

Conventions (hand-checked in tests/test_counts.py):
- a GEMM of a [B, m] activation with an [m, n] weight: 2*B*m*n FLOPs, m*n weight elements read once per step;
- attention over k cached tokens, per query head: 2*k*head_dim FLOPs for q.K and as many for p.V, plus 5 per
  token for scale/mask/softmax; K and V are read once per KV head (GQA query heads share them);
- activations are read and written once per op in the compute dtype;
- Keyformer/H2O scoring keeps an fp32 score per cached token and KV head, read and written each step; a scorer
  not fused into attention also passes over fp32 logits per query head (`logit_pass_bytes` is one such pass).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .dtypes import STORAGE_DTYPES, DType
from .policy import Policy
from .workload import Workload

#: FLOPs per element of common elementwise work (counted as vector FLOPs; choices, not measurements):
NORM_FLOPS = 5  # mean, variance, scale, shift per element (RMSNorm is a little less)
GELU_FLOPS = 8  # tanh-approximated GELU
SILU_MUL_FLOPS = 5  # silu(gate) * up
SOFTMAX_FLOPS = 5  # scale, max, exp, sum, divide per logit
GUMBEL_FLOPS = 10  # -log(-log U), add, divide by temperature, exp, normalise, accumulate per logit
ROTARY_FLOPS = 3  # two multiplies and an add per rotated element


@dataclass(frozen=True)
class Op:
    """One operation of a step, summed over layers. Byte and FLOP fields are arrays of the broadcast shape."""

    name: str
    kind: str  # gemm | attention | norm | elementwise | keyformer  (what the engine scales)
    launches: float  # kernels a plain (unfused) implementation launches for it per step
    flops: np.ndarray
    weight_bytes: np.ndarray
    kv_read_bytes: np.ndarray
    kv_write_bytes: np.ndarray
    other_bytes: np.ndarray  # activations, score buffers
    tensor: bool  # True: runs on tensor cores (dtype peak); False: vector units (fp32 peak)
    logit_pass_bytes: np.ndarray | float = 0.0  # one fp32 pass over materialised scoring logits (engine: passes)


@dataclass(frozen=True)
class Dtypes:
    """Storage and compute formats for one prediction."""

    weight: DType
    kv: DType
    compute: DType

    @classmethod
    def of(cls, workload: Workload, weight: str | None = None, kv: str | None = None) -> "Dtypes":
        w = DType.parse(weight or workload.weight_dtype, STORAGE_DTYPES, what="weight dtype")
        k = DType.parse(kv or workload.kv_dtype, STORAGE_DTYPES, what="KV dtype")
        # int weights are dequantised to bf16 for the matmul (weight-only quantisation); float weights compute as is
        compute = w if w.is_float and w is not DType.FP32 else (DType.FP32 if w is DType.FP32 else DType.BF16)
        return cls(w, k, compute)


def _z(shape) -> np.ndarray:
    return np.zeros(shape)


def _op(name, kind, launches, shape, *, flops=0.0, weight=0.0, kv_read=0.0, kv_write=0.0, other=0.0, tensor=False,
        logits=0.0):
    b = lambda x: np.broadcast_to(np.asarray(x, dtype=float), shape)  # noqa: E731
    return Op(name, kind, float(launches), b(flops), b(weight), b(kv_read), b(kv_write), b(other), tensor, b(logits))


def attended_tokens(w: Workload, policy: Policy, context) -> np.ndarray:
    """Tokens a decode step attends to: the policy's budget, capped at the model's sliding window."""
    cached = policy.budget(np.asarray(context))
    if w.sliding_window:
        cached = np.minimum(cached, w.sliding_window)
    return cached


def decode_ops(w: Workload, policy: Policy, dt: Dtypes, batch, cached) -> list[Op]:
    """Operations of one decode step for `batch` sequences each attending to `cached` tokens (see attended_tokens)."""
    B = np.asarray(batch, dtype=float)
    k = np.asarray(cached, dtype=float)
    shape = np.broadcast(B, k).shape
    L, d, f = w.n_layers, w.d_model, w.ffn_dim
    q, kv = w.q_dim, w.kv_dim
    wb, kb, ab = dt.weight.bytes, dt.kv.bytes, dt.compute.bytes
    ops: list[Op] = []

    def gemm(name, m, n_out, bias, count=1):
        """`count` matrices of [m, n_out] per layer, each a kernel."""
        ops.append(_op(name, "gemm", L * count, shape, flops=L * count * 2 * B * m * n_out,
                       weight=L * count * (m * n_out + (n_out if bias else 0)) * wb,
                       other=L * count * B * (m + n_out) * ab, tensor=True))

    def elementwise(name, kind, count, elems, flops_per, weight=0.0):
        """`count` kernels per layer, each reading and writing `elems` activations."""
        ops.append(_op(name, kind, L * count, shape, flops=L * count * flops_per * elems,
                       weight=L * count * weight, other=L * count * 2 * elems * ab))

    # --- one layer, times L ---
    elementwise("norm", "norm", w.norms_per_layer, B * d, NORM_FLOPS, weight=w.norm_params * wb)
    gemm("q_proj", d, q, w.attn_bias)
    gemm("kv_proj", d, kv, w.attn_bias, count=2)
    if w.position == "rotary":
        elementwise("rotary", "positional", 2, B * (w.n_heads + w.n_kv_heads) * w.rotary_dim / 2, 2 * ROTARY_FLOPS)
    kv_token = 2 * kv * kb  # K and V of one token in one layer
    ops.append(_op(
        "attention", "attention", L, shape,
        flops=L * B * w.n_heads * k * (4 * w.head_dim + SOFTMAX_FLOPS + (1 if w.position == "alibi" else 0)),
        kv_read=L * B * k * kv_token, kv_write=L * B * kv_token,
        other=L * B * 2 * q * ab, tensor=True))
    if policy.scored:
        per_logit = GUMBEL_FLOPS if policy.kind == "keyformer" else SOFTMAX_FLOPS
        # fp32 accumulated score per cached token and KV head: read, update, write; then an arg-min over it.
        # An unfused scorer also makes passes over fp32 logits per query head (the engine says how many).
        ops.append(_op(policy.kind + "_score", "keyformer", L, shape,
                       flops=L * B * k * (w.n_heads * per_logit + w.n_kv_heads),
                       other=L * B * k * w.n_kv_heads * 2 * 4, logits=L * B * k * w.n_heads * 4))
    gemm("o_proj", q, d, w.attn_bias)
    ffn_in = w.ffn_matrices - 1
    gemm("ffn_up", d, f, w.mlp_bias, count=ffn_in)
    if w.ffn_type == "swiglu":
        ops.append(_op("ffn_act", "elementwise", L, shape, flops=L * SILU_MUL_FLOPS * B * f, other=L * 3 * B * f * ab))
    else:
        elementwise("ffn_act", "elementwise", 1, B * f, GELU_FLOPS)
    gemm("ffn_down", f, d, w.mlp_bias)
    ops.append(_op("residual", "elementwise", 2 * L, shape, flops=2 * L * B * d, other=2 * L * 3 * B * d * ab))

    # --- once per step ---
    ops.append(_op("embed", "elementwise", 1 + (w.position == "learned"), shape,
                   other=(1 + (w.position == "learned")) * 2 * B * d * ab))
    ops.append(_op("final_norm", "norm", 1, shape, flops=NORM_FLOPS * B * d, weight=w.norm_params * wb,
                   other=2 * B * d * ab))
    ops.append(_op("lm_head", "gemm", 1, shape, flops=2 * B * d * w.vocab_size,
                   weight=w.lm_head_params * wb, other=B * (d + w.vocab_size) * ab, tensor=True))
    ops.append(_op("sample", "elementwise", 1, shape, flops=B * w.vocab_size, other=B * w.vocab_size * ab))
    return ops


def prefill_ops(w: Workload, policy: Policy, dt: Dtypes, batch, prompt) -> list[Op]:
    """Operations of prefill: `batch` prompts of `prompt` tokens through every layer, then the LM head once."""
    B = np.asarray(batch, dtype=float)
    P = np.asarray(prompt, dtype=float)
    shape = np.broadcast(B, P).shape
    T = B * P  # tokens processed
    L, d, f = w.n_layers, w.d_model, w.ffn_dim
    q, kv = w.q_dim, w.kv_dim
    wb, kb, ab = dt.weight.bytes, dt.kv.bytes, dt.compute.bytes
    layer_matrix_elems = d * q + 2 * d * kv + q * d + w.ffn_matrices * d * f
    matrices = 4 + w.ffn_matrices
    ops = [
        _op("norm", "norm", L * w.norms_per_layer, shape, flops=L * w.norms_per_layer * NORM_FLOPS * T * d,
            weight=L * w.norms_per_layer * w.norm_params * wb, other=L * w.norms_per_layer * 2 * T * d * ab),
        _op("gemms", "gemm", L * matrices, shape, flops=L * 2 * T * layer_matrix_elems,
            weight=L * (w.attn_params_per_layer + w.ffn_params_per_layer) * wb,
            other=L * T * (2 * d + q + 2 * kv + q + d + (w.ffn_matrices - 1) * f + f + d) * ab, tensor=True),
    ]
    # causal attention: query i sees i+1 keys, so P(P+1)/2 query-key pairs per head
    pairs = B * P * (P + 1) / 2
    if w.sliding_window:
        S = float(w.sliding_window)
        pairs = np.where(P > S, B * (S * (S + 1) / 2 + (P - S) * S), pairs)
    ops.append(_op("attention", "attention", L, shape,
                   flops=L * w.n_heads * pairs * (4 * w.head_dim + SOFTMAX_FLOPS),
                   kv_write=L * T * 2 * kv * kb, other=L * T * (2 * q + 2 * kv) * ab, tensor=True))
    if policy.scored:
        # the score needs every query's probabilities over the prompt: the logits again (flash attention keeps
        # none), the Gumbel-softmax per logit, column sums into an fp32 score, and one top-k per KV head
        ops.append(_op(policy.kind + "_score", "keyformer", L, shape,
                       flops=L * w.n_heads * pairs * (2 * w.head_dim + GUMBEL_FLOPS),
                       other=L * B * P * w.n_kv_heads * 3 * 4, logits=L * w.n_heads * pairs * 4))
    ops.append(_op("elementwise", "elementwise", L * (4 if w.position == "rotary" else 2), shape,
                   flops=L * T * (2 * d + GELU_FLOPS * f), other=L * T * (6 * d + 2 * f) * ab))
    ops.append(_op("lm_head", "gemm", 1, shape, flops=2 * B * d * w.vocab_size, weight=w.lm_head_params * wb,
                   other=B * (d + w.vocab_size) * ab, tensor=True))
    return ops


def counted_prefill_ops(ops: list[Op], w: Workload, counts: dict[str, float], batch, prompt) -> list[Op]:
    """Prefill's `ops` (prefill_ops) with attention and scoring as a stack's code runs them, from its count per
    score (Engine.counted_prefill; a score is one sequence, query head, query and key of the prompt's square):
    16-bit matrix FLOPs on the tensor cores in place of the causal half's, and two ops of their own, kernels
    apart from it, for fp32 matrix FLOPs on the vector units and the bytes of materialised scores. The count
    holds a scorer's work, so the policy's scoring op goes."""
    B = np.asarray(batch, dtype=float)
    P = np.asarray(prompt, dtype=float)
    shape = np.broadcast(B, P).shape
    scores = w.n_layers * w.n_heads * B * P * P
    out = [dataclasses.replace(op, flops=np.broadcast_to(counts["tensor_flops"] * scores, shape))
           if op.kind == "attention" else op for op in ops if op.kind != "keyformer"]
    out.append(_op("attention_fp32", "attention", 0, shape, flops=counts["fp32_flops"] * scores))
    out.append(_op("attention_scores", "attention", 0, shape, other=counts["score_bytes"] * scores))
    return out
