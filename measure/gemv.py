"""Batch-1 matrix-vector products in Triton that stream a layer's weights near the HBM read ceiling, with the glue
around them fused in: the norm before (prologue), bias, activation and residual after (epilogue).

A batch-1 decode step is a chain of matrix-vector products. cuBLAS runs each as its own kernel, reaching 0.67-0.88
of the read ceiling on a decoder's 33-134 MB matrices (lab/data/profiles/h100-sxm-profile.csv), and the norms,
activations and residual adds between them are kernels of their own. Here one kernel may read two matrices:
  - stacked rows: [W1; W2] x, e.g. GPT-J's QKV and MLP-up projections, which read the same normed input;
  - stacked columns: [W1 | W2] [x1; x2], e.g. GPT-J's output and MLP-down projections, whose sum enters the
    residual (GPT-J's attention and MLP run in parallel);
  - gated rows (SwiGLU): silu(W[:F] x) * (W[F:] x), Llama's gate and up projections.
Each program reads BN whole rows of the weights, BK columns at a time, so every load is a contiguous run of BK
weights; all programs read the (tiny) input vector from L2. In the committed runs they beat cuBLAS on every product
of GPT-J-6B and Llama-3-8B on the H100 and the H200 (lab/data/gemv/*-gemv.txt); cuBLAS's time for Llama's gate+up
on the H200 varies from run to run (the run committed in d4932cf had it faster than ours).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: activations the epilogue applies (to rows from `act_from` on)
ACTS = {None: 0, "gelu_tanh": 1}
NORMS = {None: 0, "layernorm": 1, "rmsnorm": 2}


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh written with exp (Triton has no tanh on all targets)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _normed(X, NW, NB, k, mean, rstd, NORM: tl.constexpr, HAS_NB: tl.constexpr):
    """Columns k of the input after the norm (none, layernorm, rmsnorm), rounded to bf16 as the unfused path's."""
    x = tl.load(X + k).to(tl.float32)
    if NORM == 0:
        return x
    if NORM == 1:
        x = (x - mean) * rstd * tl.load(NW + k).to(tl.float32)
    else:
        x = x * rstd * tl.load(NW + k).to(tl.float32)
    if HAS_NB:
        x += tl.load(NB + k).to(tl.float32)
    return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _sums_normed(y, C1, rows, mean, rstd, NORM: tl.constexpr, AFFINE: tl.constexpr):
    """Row sums W x of the raw input -> W norm(x), for a norm without scale or shift (folded into W)."""
    if AFFINE or NORM == 0:
        return y
    if NORM == 1:
        return rstd * (y - mean * tl.load(C1 + rows))
    return rstd * y


@triton.jit
def _rows(acc, X, WP, NW, NB, K, mean, rstd, BK: tl.constexpr, NORM: tl.constexpr, HAS_NB: tl.constexpr):
    """acc [BN, BK] plus the partial sums of the rows at WP (row pointers [BN, 1]) times norm(x), over K columns."""
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = _normed(X, NW, NB, k, mean, rstd, NORM, HAS_NB)
        acc += tl.load(WP + k[None, :]).to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _gated_rows(X, WP, NW, NB, K, mean, rstd, UP, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                HAS_NB: tl.constexpr):
    """As _rows for the gate rows at WP and the up rows UP elements further, in one pass over norm(x)."""
    acc = tl.zeros([BN, BK], tl.float32)
    acc_up = tl.zeros([BN, BK], tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        x = _normed(X, NW, NB, k, mean, rstd, NORM, HAS_NB)
        acc += tl.load(WP + k[None, :]).to(tl.float32) * x[None, :]
        acc_up += tl.load(WP + UP + k[None, :]).to(tl.float32) * x[None, :]
    return acc, acc_up


@triton.jit
def _gemv_kernel(X, W, W2, X2, OUT, BIAS, RES, NW, NB, C1, K, K2, ROWS1, F, ACT_FROM, eps,
                 BN: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr, NORM: tl.constexpr, AFFINE: tl.constexpr,
                 HAS_NB: tl.constexpr,
                 ACT: tl.constexpr, STACK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """STACK: 0 one matrix; 1 rows of W then rows of W2 (ROWS1 rows in W); 2 columns [W | W2] times [X; X2];
    3 gated: silu(W[r] x) * (W[F + r] x).
    NORM with AFFINE normalises each input chunk (weights NW, shift NB); without, the norm has no scale or shift
    (folded into W, see fold_norms) and is applied to the sums: rstd (W x - mean C1), C1 the rows' sums."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    mean = 0.0
    rstd = 1.0
    if NORM != 0:  # statistics of the whole input, recomputed by every program: one load of K values from L2
        kp = tl.arange(0, KP)
        xs = tl.load(X + kp, mask=kp < K, other=0.0).to(tl.float32)
        if NORM == 1:
            mean = tl.sum(xs, 0) / K
            xc = tl.where(kp < K, xs - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / K + eps)
        else:
            rstd = 1.0 / tl.sqrt(tl.sum(xs * xs, 0) / K + eps)
    # a norm with scale and shift (AFFINE) is applied to each input chunk in the loop; a folded one only to the sums
    # at the end, which keeps the loop as lean as a plain product (the per-chunk layernorm made GPT-J's QKV+up
    # slower than cuBLAS in a one-off H100 trial; folded, it is faster: lab/data/gemv/h100-sxm-gemv.txt)
    CHUNK: tl.constexpr = NORM if AFFINE else 0
    if STACK == 3:
        acc, acc_up = _gated_rows(X, W + rows[:, None] * K, NW, NB, K, mean, rstd, F * K, BN, BK, CHUNK, HAS_NB)
        g = _sums_normed(tl.sum(acc, 1), C1, rows, mean, rstd, NORM, AFFINE).to(tl.bfloat16).to(tl.float32)
        u = _sums_normed(tl.sum(acc_up, 1), C1, rows + F, mean, rstd, NORM, AFFINE).to(tl.bfloat16).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u  # the unfused path rounds both products to bf16 first
    else:
        acc = tl.zeros([BN, BK], tl.float32)
        if STACK == 1:
            if pid * BN >= ROWS1:
                acc = _rows(acc, X, W2 + (rows - ROWS1)[:, None] * K, NW, NB, K, mean, rstd, BK, CHUNK, HAS_NB)
            else:
                acc = _rows(acc, X, W + rows[:, None] * K, NW, NB, K, mean, rstd, BK, CHUNK, HAS_NB)
        else:
            acc = _rows(acc, X, W + rows[:, None] * K, NW, NB, K, mean, rstd, BK, CHUNK, HAS_NB)
        if STACK == 2:  # into the same partial sums (a second accumulator ran slower); no norm here
            acc = _rows(acc, X2, W2 + rows[:, None] * K2, NW, NB, K2, 0.0, 1.0, BK, 0, False)
        y = _sums_normed(tl.sum(acc, 1), C1, rows, mean, rstd, NORM, AFFINE)
        if HAS_BIAS:
            y += tl.load(BIAS + rows).to(tl.float32)
        if ACT == 1:
            y = tl.where(rows >= ACT_FROM, _gelu_tanh(y), y)
    if HAS_RES:
        y = y.to(tl.bfloat16).to(tl.float32) + tl.load(RES + rows).to(tl.float32)
    tl.store(OUT + rows, y.to(OUT.dtype.element_ty))


def _block_k(k: int, want: int = 1024) -> int:
    """The widest load of at most `want` columns that divides an input of width k."""
    for bk in (2048, 1024, 512, 256, 128, 64, 32, 16):
        if bk <= want and k % bk == 0:
            return bk
    raise ValueError(f"gemv: input width {k} is not a multiple of 16")


def fold_norm(norm_weight, norm_bias, linears) -> None:
    """Fold a norm's scale g and shift b into the nn.Linear layers that read its output, in place:
    W norm(x) = (W g) n(x) + W b, n the norm without scale or shift; the norm is left with g = 1, b = 0.
    Exact in real arithmetic (the products round differently in bf16); inference engines do the same."""
    g = norm_weight.detach().float()
    b = None if norm_bias is None else norm_bias.detach().float()
    with torch.no_grad():
        for lin in linears:
            w = lin.weight.float()
            if b is not None and bool(b.any()):
                shift = (w @ b).to(lin.weight.dtype)
                if lin.bias is None:
                    lin.bias = torch.nn.Parameter(shift)
                else:
                    lin.bias += shift
            if not bool((g == 1).all()):
                lin.weight.copy_((w * g).to(lin.weight.dtype))
        norm_weight.fill_(1.0)
        if norm_bias is not None:
            norm_bias.zero_()


def _config(rows: int, divisor: int, norm, stack=None) -> tuple[int, int, int]:
    """(rows per program, warps, columns per load) from bench_gemv's sweeps on the H100 and the H200
    (lab/data/gemv/*-gemv-sweep.csv): the choice within 4 % of the fastest configuration on both GPUs for every
    product of GPT-J-6B and Llama-3-8B. A product without a norm, and gated rows (each program reads two rows):
    one row per program of 4 warps, 1024 columns per load (many small programs keep the most loads in flight).
    Other normed products: 8 rows x 256 columns, or 2 x 1024 where the rows are few (< 8192, Llama's QKV).
    A block that does not divide `divisor` (the rows, or the gcd of two matrices' rows) falls back to the widest
    that does."""
    if not norm or stack == "glu":
        want, bk = 1, 1024
    else:
        want, bk = (8, 256) if rows >= 8192 else (2, 1024)
    return next(bn for bn in (want, 8, 4, 2, 1) if bn <= want and divisor % bn == 0), 4, bk


def gemv(x, w, *, w2=None, x2=None, stack=None, bias=None, residual=None, norm=None, norm_weight=None,
         norm_bias=None, row_sums=None, eps=1e-5, act=None, act_from=0, out=None, block_n=None, block_k=None,
         num_warps=None, num_stages=1):
    """One batch-1 product, x [K] (or [1, K]) bf16:
      stack None:   act(w @ norm(x) + bias) + residual               w [N, K]
      stack 'rows': [w; w2] @ norm(x), act on output rows >= act_from   w [N1, K], w2 [N2, K]
      stack 'cols': w @ norm(x) + w2 @ x2 (+ bias + residual)       w [N, K], w2 [N, K2], x2 [K2]
      stack 'glu':  silu(w[:F] @ norm(x)) * (w[F:] @ norm(x))        w [2F, K]
    norm 'layernorm' or 'rmsnorm' with `norm_weight` (and `norm_bias`) normalises each input chunk; without them
    the norm has no scale or shift (folded into w by fold_norms, 5-8 % faster) and a layernorm needs `row_sums`,
    the fp32 sums of the rows of w (and w2). Returns a flat [N] tensor (or writes `out`)."""
    x = x.reshape(-1)
    K = x.numel()
    mode = {None: 0, "rows": 1, "cols": 2, "glu": 3}[stack]
    rows1 = w.shape[0]
    n = rows1 + (w2.shape[0] if mode == 1 else 0)
    if mode == 3:
        n = rows1 // 2
    K2 = x2.numel() if mode == 2 else 0
    if mode == 3 and bias is not None:
        raise ValueError("gemv: gated rows take no bias")
    if mode == 2 and norm:
        raise ValueError("gemv: stacked columns take no norm")
    affine = norm_weight is not None
    if norm == "layernorm" and not affine and row_sums is None:
        raise ValueError("gemv: a layernorm without weights (folded) needs the rows' sums")
    bn, warps, bk = _config(n, math.gcd(n, rows1), norm, stack)
    bn, warps, bk = block_n or bn, num_warps or warps, block_k or bk
    if n % bn or (mode == 1 and rows1 % bn):
        raise ValueError(f"gemv: block of {bn} rows does not divide the {n} output rows (first matrix {rows1})")
    bk = min(_block_k(K, bk), _block_k(K2, bk) if K2 else bk)
    if out is None:
        out = torch.empty(n, dtype=x.dtype, device=x.device)
    dummy = x
    _gemv_kernel[(n // bn,)](
        x, w, w2 if w2 is not None else w, x2.reshape(-1) if x2 is not None else dummy, out,
        bias if bias is not None else dummy, residual.reshape(-1) if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy, norm_bias if norm_bias is not None else dummy,
        row_sums if row_sums is not None else dummy, K, K2, rows1, n, act_from, eps, BN=bn, BK=bk,
        KP=triton.next_power_of_2(K), NORM=NORMS[norm], AFFINE=affine, HAS_NB=norm_bias is not None,
        ACT=ACTS[act], STACK=mode,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, num_warps=warps, num_stages=num_stages)
    return out
