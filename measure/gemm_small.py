"""Products of a few rows (decode steps of batch 2-64; the decoder uses it up to 16) in Triton, with the glue
around them fused in: the batch-M counterpart of measure.gemv, which does the same for one row.

At batch 16 a decode step is still a chain of weight reads, but it runs as four cuBLAS GEMMs per layer plus
torch.compile's kernels for norms, activations and residuals between them; on the H200 GPT-J-6B's batch-16
step spent 3214 us in GEMMs, 237 us in 141 small fused kernels and 141 us in gaps between kernels, against 2867 us
for all products of the batch-1 step (lab/data/profiles/h200-profile-batch.csv). Here, as in measure.gemv, one kernel
reads one or two matrices (stacked rows [W1; W2] x, stacked columns [W1 | W2] [x1; x2], or SwiGLU's gated rows)
and applies a folded norm to its sums, then bias, activation and residual: two kernels per GPT-J layer, four per
Llama layer. Each program reads BN whole rows of the weights, BK columns at a time (contiguous runs), and
multiplies them with the M input rows (from L2) on tensor cores.

Norms must be folded (measure.gemv.fold_norm): the kernel applies a bare norm to the sums, rstd (W x - mean C1)
with C1 the rows' sums for a layernorm, rstd W x for an RMSNorm. The rows' mean and rstd come from a small kernel
launched first (one program per row): summed inside the product's loop instead, from the chunks the dot reads,
they made GPT-J-6B's normed QKV+up 3.1x slower than cuBLAS at batch 16 (1.7x on the tensor cores), where the same
kernel without a norm beat cuBLAS (lab/data/gemm/h200-gemm-small-fused-stats-in-loop.txt, commit e26ce96).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gemv import ACTS, NORMS, _block_k, _gelu_tanh

#: Triton's CPU interpreter gets bf16 dots wrong (tests/test_gemv), so under it the tiles go to fp32 first
DOT_FP32 = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 64


@triton.jit
def _chunk(X, sx, m, mmask, k):
    return tl.load(X + m[:, None] * sx + k[None, :], mask=mmask[:, None], other=0.0)


@triton.jit
def _dot(x, w, DOT_F32: tl.constexpr):
    """x [BM, BK] times w [BN, BK]^T -> [BM, BN] fp32."""
    if DOT_F32:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
    return tl.dot(x, tl.trans(w))


@triton.jit
def _row_stats_kernel(X, STATS, K, sx, eps, KP: tl.constexpr, NORM: tl.constexpr):
    """mean and rstd of input row program_id (KP >= K columns at once, as measure.gemv's prologue) -> STATS[row]."""
    row = tl.program_id(0)
    k = tl.arange(0, KP)
    x = tl.load(X + row * sx + k, mask=k < K, other=0.0).to(tl.float32)
    mean = 0.0
    if NORM == 1:
        mean = tl.sum(x, 0) / K
        x = tl.where(k < K, x - mean, 0.0)
    tl.store(STATS + 2 * row, mean)
    tl.store(STATS + 2 * row + 1, 1.0 / tl.sqrt(tl.sum(x * x, 0) / K + eps))


@triton.jit
def _product(acc, X, sx, WP, K, m, mmask, BK: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += x WP^T over K columns (WP: row pointers [BN, 1])."""
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        acc += _dot(_chunk(X, sx, m, mmask, k), tl.load(WP + k[None, :]), DOT_F32)
    return acc


@triton.jit
def _normed_sums(acc, mean, rstd, C1, cols, NORM: tl.constexpr):
    """acc = W x of the raw input -> W norm(x), the norm without scale or shift (folded into W)."""
    if NORM == 0:
        return acc
    if NORM == 1:
        return rstd[:, None] * (acc - mean[:, None] * tl.load(C1 + cols)[None, :])
    return rstd[:, None] * acc


@triton.jit
def _small_gemm_kernel(X, W, W2, X2, OUT, BIAS, RES, C1, STATS, M, K, K2, N, ROWS1, F, ACT_FROM, sx, sx2,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                       ACT: tl.constexpr, STACK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                       DOT_F32: tl.constexpr):
    """STACK: 0 one matrix; 1 rows of W then rows of W2 (ROWS1 rows in W); 2 columns [W | W2] times [X; X2];
    3 gated: silu(W[c] x) * (W[F + c] x). Output [M, N] contiguous; X and X2 rows sx and sx2 elements apart."""
    pid = tl.program_id(0)
    cols = pid * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    mmask = m < M
    acc = tl.zeros([BM, BN], tl.float32)
    mean = tl.zeros([BM], tl.float32)
    rstd = tl.zeros([BM], tl.float32)
    if NORM != 0:  # the rows' statistics, from _row_stats_kernel
        mean = tl.load(STATS + 2 * m, mask=mmask, other=0.0)
        rstd = tl.load(STATS + 2 * m + 1, mask=mmask, other=0.0)
    if STACK == 3:
        up = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            x = _chunk(X, sx, m, mmask, k)
            acc += _dot(x, tl.load(W + cols[:, None] * K + k[None, :]), DOT_F32)
            up += _dot(x, tl.load(W + (cols + F)[:, None] * K + k[None, :]), DOT_F32)
        # the unfused path rounds both products to bf16 before the gate
        g = _normed_sums(acc, mean, rstd, C1, cols, NORM).to(tl.bfloat16).to(tl.float32)
        u = _normed_sums(up, mean, rstd, C1, cols + F, NORM).to(tl.bfloat16).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
    else:
        if STACK == 1:  # one loop over the block's rows of W or W2 (a loop per branch doubled the shared memory)
            second = pid * BN >= ROWS1
            rows = tl.where(second, cols - ROWS1, cols)
            acc = _product(acc, X, sx, tl.where(second, W2, W) + rows[:, None] * K, K, m, mmask, BK, DOT_F32)
        else:
            acc = _product(acc, X, sx, W + cols[:, None] * K, K, m, mmask, BK, DOT_F32)
        y = _normed_sums(acc, mean, rstd, C1, cols, NORM)
        if STACK == 2:  # the second matrix's columns add to the same sums (no norm on this input)
            y = _product(y, X2, sx2, W2 + cols[:, None] * K2, K2, m, mmask, BK, DOT_F32)
        if HAS_BIAS:
            y += tl.load(BIAS + cols).to(tl.float32)[None, :]
        if ACT == 1:
            y = tl.where((cols >= ACT_FROM)[None, :], _gelu_tanh(y), y)
    offs = m[:, None] * N + cols[None, :]
    if HAS_RES:
        y = y.to(tl.bfloat16).to(tl.float32) + tl.load(RES + offs, mask=mmask[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mmask[:, None])


def _config(rows: int, stack) -> tuple[int, int, int]:
    """(rows per program, columns per load, pipeline stages), from bench_gemm_small on the H200
    (lab/data/gemm/h200-gemm-small-plain.csv: 32 rows x 256 columns x 5 stages fastest for most products at batch
    16, 32 x 128 x 5 at batch 64); gated rows load two tiles per step and stacked columns run two loops, so fewer
    stages fit in shared memory past 16 rows."""
    if rows <= 16:
        return 32, 256, 4 if stack == "glu" else 5
    return 32, 128, 4 if stack in ("glu", "cols") else 5


def small_gemm(x, w, *, w2=None, x2=None, stack=None, bias=None, residual=None, norm=None, row_sums=None,
               eps=1e-5, act=None, act_from=0, out=None, block_n=None, block_k=None, num_warps=4, num_stages=None):
    """One product of M <= 64 rows, x [M, K] bf16 (rows may be a strided view):
      stack None:   act(norm(x) @ w^T + bias) + residual                 w [N, K]
      stack 'rows': norm(x) @ [w; w2]^T, act on output columns >= act_from  w [N1, K], w2 [N2, K]
      stack 'cols': norm(x) @ w^T + x2 @ w2^T (+ bias + residual)          w [N, K], w2 [N, K2], x2 [M, K2]
      stack 'glu':  silu(norm(x) @ w[:F]^T) * (norm(x) @ w[F:]^T)          w [2F, K]
    `norm` ('layernorm', 'rmsnorm') has no scale or shift (folded into w by gemv.fold_norm); a layernorm needs
    `row_sums`, the fp32 sums of the rows of w (and w2); the rows' statistics come from a small kernel first.
    Returns [M, N] (or writes `out`)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"small_gemm: x must be [M, K] with contiguous rows, got shape {tuple(x.shape)}")
    M, K = x.shape
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"small_gemm: {M} rows, expected 1 to {MAX_ROWS}")
    mode = {None: 0, "rows": 1, "cols": 2, "glu": 3}[stack]
    rows1 = w.shape[0]
    n = rows1 + (w2.shape[0] if mode == 1 else 0)
    if mode == 3:
        n = rows1 // 2
        if bias is not None:
            raise ValueError("small_gemm: gated rows take no bias")
    K2 = x2.shape[1] if mode == 2 else 0
    if mode == 2 and (norm or x2.stride(1) != 1 or x2.shape[0] != M):
        raise ValueError("small_gemm: stacked columns take no norm and an x2 of the same rows as x")
    if norm == "layernorm" and row_sums is None:
        raise ValueError("small_gemm: a (folded) layernorm needs the rows' sums")
    bn, bk, stages = _config(M, stack)
    bn, stages = block_n or bn, num_stages or stages
    bk = min(_block_k(K, block_k or bk), _block_k(K2, block_k or bk) if K2 else 256)
    if n % bn or (mode == 1 and rows1 % bn):
        raise ValueError(f"small_gemm: blocks of {bn} rows do not divide the {n} output rows (first matrix {rows1})")
    if out is None:
        out = torch.empty(M, n, dtype=x.dtype, device=x.device)
    dummy = x
    stats = dummy
    if norm:
        stats = torch.empty(M, 2, dtype=torch.float32, device=x.device)
        _row_stats_kernel[(M,)](x, stats, K, x.stride(0), eps, KP=triton.next_power_of_2(K), NORM=NORMS[norm])
    _small_gemm_kernel[(n // bn,)](
        x, w, w2 if w2 is not None else w, x2 if x2 is not None else dummy, out,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        row_sums if row_sums is not None else dummy, stats, M, K, K2, n, rows1, n if mode == 3 else 0, act_from,
        x.stride(0), x2.stride(0) if x2 is not None else 0,
        BM=max(16, triton.next_power_of_2(M)), BN=bn, BK=bk, NORM=NORMS[norm], ACT=ACTS[act], STACK=mode,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, DOT_F32=DOT_FP32, num_warps=num_warps,
        num_stages=stages)
    return out
