"""Split-K (flash-decoding) decode attention in Triton, with Keyformer's scoring fused into the same pass.

One decode step of one layer, for an evicting cache (budget + free slot, see kv_policies.EvictingCache):
  A. `_split_kernel`   one program per (sequence, KV head, split of the cache): applies rotary to q and the new
                       token's K if asked (the decoder hands over q and K unrotated, saving a kernel), writes the
                       new token's K and V into the slot the last step freed, then reads its K and V block once,
                       computes the logits of the KV head's query heads (plus the ALiBi bias, slope x (key position
                       - query position), for an ALiBi model), the attention partials (max, sum, P.V) and the
                       Gumbel-softmax partials (max, sum of exp(z)) of z = (logit + noise) / tau, kept per token
                       lane and reduced once after the loop; writes z (fp32) for B.
  B. `_finish_kernel`  one program per (sequence, KV head, FINISH_CHUNK slots): merges the Gumbel partials into
                       log Z, adds f = exp(z - log Z), summed over the query heads, to each token's score, and
                       leaves the chunk's lowest-ranked evictable slot; programs of the first chunks also merge the
                       attention partials of one query head each into the output. The next step's kernel A takes
                       the arg-min over the chunks' candidates.
K and V are read once per step; the extra traffic is one fp32 z per query head and token (written in A, read in
B), the score read and written once and the int32 positions read twice: 3 % (GPT-J) to 11 % (Llama-3-8B) of the K
and V bytes. K and V are marked to leave L2 first and z to stay (the layers share one z buffer), so z can stay out
of HBM; z keeps that mark only inside the L2's set-aside for persisting lines, which the compiled decoder sizes
(measure/l2_persist.py).
The full cache runs A without scoring and `_combine_kernel`: two launches per layer, like Keyformer. When one split
holds a whole row (large batches), A does B's work (or the combine's) itself: one launch per layer.
The query heads of one KV head are the rows of a 16-row tensor-core tile (MHA pads 15 of them); the scoring then
runs on the real rows only. K and V loads are software-pipelined (no branch in the loop).
The cache is split so that (sequences x KV heads x splits) fills the GPU about four times over (about twice where
the rows are fewer than the SMs: batch 1), so a batch-1 step reads the cache with every SM, as flash-decoding
does. Noise is generated in A only, from a hash of the step and the element's offset (logs on the special-function
unit on a GPU), or, for tests, read from a tensor shared with the plain path. Each of these choices won a
measurement on the H200 against the alternatives it replaced (docs/fused-decoder.md; their code is in git history).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kfsim.errors import KfsimError

from .kv_policies import TAU_INIT


@triton.jit
def _lg2_approx(x):
    """log2 on the GPU's special-function unit (one MUFU.LG2; PTX lg2.approx, relative error about 2^-22):
    tl.log and tl.log2 compile to a polynomial of about 15 instructions instead (kernel_stats)."""
    return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _noise(NOISE, seed, offs, mask, USE_NOISE: tl.constexpr, FAST_LOG: tl.constexpr):
    """Standard Gumbel noise -log(-log U) per element: read from NOISE (tests), or U from an integer hash of the
    element's offset and the step (a few integer ops: uniform and independent enough to break ties and explore,
    which is all Keyformer asks of it; Philox costs more integer work than the attention itself here).
    FAST_LOG takes both logs on the special-function unit (GPU only: Triton's interpreter has no PTX). `mask`:
    the elements NOISE holds (0 elsewhere, so that noise is finite wherever it is added)."""
    if USE_NOISE:
        return tl.load(NOISE + offs, mask=mask, other=0.0)
    # lowbias32-style mixing (xor-shift, multiply by odd constants); constants below 2^31 keep the math in uint32
    h = offs.to(tl.uint32) ^ (seed.to(tl.uint32) * 0x27D4EB2D)
    h = (h ^ (h >> 16)) * 0x7FEB352D
    h = (h ^ (h >> 15)) * 0x2C1B3C6D
    h = h ^ (h >> 16)
    u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0) + (0.5 / 16777216.0)  # 24 bits, strictly inside (0, 1)
    if FAST_LOG:  # ln x = ln 2 * log2 x
        # -ln u, floored at its exact least value (u's largest, 1 - 2^-25): near u = 1 the approximate log2 is
        # good to an absolute, not relative, error, and could return -ln u <= 0 (then NaN) without the floor
        e = tl.maximum(-0.6931471805599453 * _lg2_approx(u), 2.9802322e-08)
        return -0.6931471805599453 * _lg2_approx(e)
    return -tl.log(-tl.log(u))


@triton.jit
def _noise_kernel(OUT, seed, n, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, _noise(OUT, seed, offs, offs < n, False, FAST_LOG), mask=offs < n)


def kernel_noise(n: int, step: int, device, fast_log: bool = False) -> torch.Tensor:
    """The in-kernel Gumbel noise of elements 0..n-1 at decode step `step` (to test its distribution)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    _noise_kernel[(triton.cdiv(n, 1024),)](out, step, n, BLOCK=1024, FAST_LOG=fast_log)
    return out


@triton.jit
def _free_slot(CANDV, CANDI, row, NCAND: tl.constexpr, BLOCK_C: tl.constexpr):
    """The slot to write the new token into: the lowest-ranked of the row's NCAND candidates of the last step
    (one per split, or per finish chunk)."""
    s = tl.arange(0, BLOCK_C)
    vals = tl.load(CANDV + row * NCAND + s, mask=s < NCAND, other=float("inf"))
    idx = tl.load(CANDI + row * NCAND + s, mask=s < NCAND, other=2147483647)
    v = tl.min(vals, 0)
    first = tl.min(tl.where(vals == v, s, BLOCK_C), 0)
    return tl.sum(tl.where(s == first, idx, 0), 0)


@triton.jit
def _qk(q, k, IEEE: tl.constexpr):
    """Logits [BLOCK_G, BLOCK_N] of q [BLOCK_G, D] against k [BLOCK_N, D] on tensor cores."""
    if IEEE:  # fp32 inputs (tests): exact fp32 products, not TF32
        return tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32)
    return tl.dot(q, tl.trans(k)).to(tl.float32)


@triton.jit
def _pv(p, v, IEEE: tl.constexpr):
    """p [BLOCK_G, BLOCK_N] (fp32) times v [BLOCK_N, D] -> [BLOCK_G, D] fp32."""
    if IEEE:
        return tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
    return tl.dot(p.to(v.dtype), v).to(tl.float32)


@triton.jit
def _rotated(X, offs, d, COS, SIN, mask, ROT: tl.constexpr, ROT_DIM: tl.constexpr):
    """Load rows X + offs (+ columns d) and apply rotary to their first ROT_DIM columns, as decoder.Rotary does
    (ROT 1: interleaved pairs, GPT-J; 2: halves, Llama; cos and sin [ROT_DIM / 2] of the new token's position);
    rounded back to the input's dtype like the unfused path's result."""
    x = tl.load(X + offs + d, mask=mask, other=0.0)
    if ROT == 0:
        return x
    HALF: tl.constexpr = ROT_DIM // 2
    inrot = d < ROT_DIM
    if ROT == 1:
        partner = d ^ 1
        idx = d // 2
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        idx = d % HALF
        sign = tl.where(d < HALF, -1.0, 1.0)
    partner = tl.where(inrot, partner, d)
    xp = tl.load(X + offs + partner, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(COS + idx, mask=inrot, other=1.0).to(tl.float32)
    s = tl.load(SIN + idx, mask=inrot, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    return tl.where(inrot, xf * c + sign * xp * s, xf).to(x.dtype)


@triton.jit
def _split_kernel(Q, K, V, KNEW, VNEW, POS, SCORE_BUF, CANDV, CANDI, STEP, CUR, Z, NOISE, M, L, ACC, MZ, LZ, OUT,
                  COS, SIN, SLOPES, S, n_valid, split_len, scale, tau_init, tau_delta, window, sq, skv,
                  ROT: tl.constexpr, ROT_DIM: tl.constexpr, ALIBI: tl.constexpr,
                  H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                  BLOCK_G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
                  BLOCKS: tl.constexpr, BLOCK_S: tl.constexpr, SCORE: tl.constexpr, HAS_POS: tl.constexpr,
                  USE_NOISE: tl.constexpr, IEEE: tl.constexpr, FINISH: tl.constexpr,
                  FBLOCK: tl.constexpr, FBLOCKS: tl.constexpr, FAST_LOG: tl.constexpr, OFFS64: tl.constexpr,
                  ROWS_APART: tl.constexpr, NCAND: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gmask = g < G
    heads = hk * G + g
    # q and the new K and V: with ROWS_APART, the rows of sequence b start sq and skv elements apart (column
    # slices of a batch's stacked projections); else they are contiguous [B, heads, D]
    if ROWS_APART:
        q = _rotated(Q, (b * sq + heads * D)[:, None], d[None, :], COS, SIN, gmask[:, None], ROT, ROT_DIM)
        new_row = b * skv + hk * D
    else:
        q = _rotated(Q, (b * H + heads)[:, None] * D, d[None, :], COS, SIN, gmask[:, None], ROT, ROT_DIM)
        new_row = pid * D
    if OFFS64:  # a layer's K or V past 2^31 elements: its offsets in 64 bits (every other buffer stays below)
        kv_base = pid.to(tl.int64) * S
    else:
        kv_base = pid * S
    start = split * split_len
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    # Keyformer's scoring runs on the GP (G rounded up to a power of two) real query-head rows, not the 16-row tile
    gc = tl.arange(0, GP)
    gcmask = gc < G
    rows_c = b * H + hk * G + gc
    mz = tl.full([GP], float("-inf"), tl.float32)
    lz = tl.zeros([GP], tl.float32)
    # the Gumbel partials kept per token lane and reduced over the tokens once, after the loop: no reduction over
    # a block's tokens inside it (each costs the program a barrier)
    mz_lane = tl.full([GP, BLOCK_N], -1e30, tl.float32)
    lz_lane = tl.zeros([GP, BLOCK_N], tl.float32)
    # the new token: its K and V come from KNEW/VNEW and are written into its slot by the program that owns it
    if HAS_POS:
        new_slot = _free_slot(CANDV, CANDI, pid, NCAND, BLOCK_C)
        cur = tl.load(CUR).to(POS.dtype.element_ty)  # the new token's position (int32, as the positions)
    else:
        new_slot = n_valid - 1
    if ALIBI:  # each query head's slope (padding rows 0); the full cache holds position p in slot p
        slope = tl.load(SLOPES + heads, mask=gmask, other=0.0)
        if HAS_POS:
            qpos = cur
        else:
            qpos = new_slot
    knew = _rotated(KNEW, new_row, d, COS, SIN, d < D, ROT, ROT_DIM)
    vnew = tl.load(VNEW + new_row + d)
    if (new_slot >= start) & (new_slot < start + split_len):
        tl.store(K + (kv_base + new_slot) * D + d, knew)
        tl.store(V + (kv_base + new_slot) * D + d, vnew)
        if HAS_POS:
            tl.store(POS + kv_base + new_slot, cur)
            tl.store(SCORE_BUF + kv_base + new_slot, 0.0)
    # the loop reads the new token back from the cache: K and V then go from memory straight into the dots, which
    # lets Triton pipeline their loads (a value swapped in, in registers, on the way is not pipelined)
    tl.debug_barrier()
    if SCORE:
        step = tl.load(STEP)
        seed = step.to(tl.int32)
        tau = tau_init + step * tau_delta
        inv_tau = 1.0 / tau
    # a constant trip count (BLOCKS x BLOCK_N = split_len) and no branch in the body, so Triton software-pipelines
    # the K and V loads (num_stages) and the next blocks stream in while this one is computed; blocks past the
    # last valid token (the tail of the last split) are masked loads, which read nothing
    for i in range(0, BLOCKS):
        n0 = start + i * BLOCK_N
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < n_valid
        k = tl.load(K + (kv_base + n)[:, None] * D + d[None, :], mask=nmask[:, None], other=0.0,
                    eviction_policy="evict_first")
        v = tl.load(V + (kv_base + n)[:, None] * D + d[None, :], mask=nmask[:, None], other=0.0,
                    eviction_policy="evict_first")
        valid = nmask
        if HAS_POS:
            pos = tl.load(POS + kv_base + n, mask=nmask, other=-1)
            valid = valid & (pos >= 0)
        x = _qk(q, k, IEEE) * scale
        if ALIBI:  # the bias of MPT's attention, on the logits that both the softmax and the scores take
            if HAS_POS:
                x += slope[:, None] * (pos - qpos).to(tl.float32)[None, :]
            else:
                x += slope[:, None] * (n - qpos).to(tl.float32)[None, :]
        x = tl.where(valid[None, :] & gmask[:, None], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(x - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _pv(p, v, IEEE)
        m_i = m_new
        if SCORE:
            # rows past G hold -inf, so the max over the tile's row groups picks out rows 0..GP-1
            xc = tl.max(tl.reshape(x, [BLOCK_G // GP, GP, BLOCK_N]), 0)
            offs = rows_c[:, None] * S + n[None, :]
            lmask = gcmask[:, None] & nmask[None, :]
            # an online max and sum per element, two exps each, and a multiply by 1 / tau instead of a division;
            # x is -inf at invalid tokens already, so is z, and the running max starts finite (no guards)
            z = (xc + _noise(NOISE, seed, offs, lmask, USE_NOISE, FAST_LOG)) * inv_tau
            tl.store(Z + offs, z, mask=lmask, eviction_policy="evict_last")
            mz_new = tl.maximum(mz_lane, z)
            lz_lane = lz_lane * tl.exp(mz_lane - mz_new) + tl.exp(z - mz_new)
            mz_lane = mz_new
    if SCORE:  # mz_lane starts finite, so mz is too
        mz = tl.max(mz_lane, 1)
        lz = tl.sum(lz_lane * tl.exp(mz_lane - mz[:, None]), 1)
    if FINISH:  # one split holds the whole row (large batch): output, log Z and scores right here, no partials
        out = acc / tl.where(gmask, l_i, 1.0)[:, None]
        tl.store(OUT + (b * H + heads)[:, None] * D + d[None, :], out.to(OUT.dtype.element_ty), mask=gmask[:, None])
        if SCORE:
            logz = tl.where(gcmask, mz + tl.log(tl.where(gcmask, lz, 1.0)), 0.0)
            tl.debug_barrier()  # z stored by this program's threads above is read back by others below
            _score_and_candidate(Z, POS, SCORE_BUF, CANDV, CANDI, rows_c, gcmask, logz, cur, window, kv_base, start,
                                 S, split_len, pid, FBLOCK, FBLOCKS)
    else:
        part = (b * H + heads) * NSPLIT + split
        tl.store(M + part, m_i, mask=gmask)
        tl.store(L + part, l_i, mask=gmask)
        tl.store(ACC + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
        if SCORE:
            tl.store(MZ + rows_c * NSPLIT + split, mz, mask=gcmask)
            tl.store(LZ + rows_c * NSPLIT + split, lz, mask=gcmask)


@triton.jit
def _combine_row(M, L, ACC, OUT, row, D: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the splits' attention partials of one (sequence, query head) row into its output."""
    s = tl.arange(0, BLOCK_S)
    smask = s < NSPLIT
    d = tl.arange(0, D)
    m = tl.load(M + row * NSPLIT + s, mask=smask, other=float("-inf"))
    l = tl.load(L + row * NSPLIT + s, mask=smask, other=0.0)
    mmax = tl.max(m, 0)
    w = tl.where(smask & (m > float("-inf")), tl.exp(m - mmax), 0.0)
    acc = tl.load(ACC + (row * NSPLIT + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(OUT + row * D + d, out.to(OUT.dtype.element_ty))


@triton.jit
def _combine_kernel(M, L, ACC, OUT, D: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
    _combine_row(M, L, ACC, OUT, tl.program_id(0), D, NSPLIT, BLOCK_S)


@triton.jit
def _finish_kernel(M, L, ACC, OUT, MZ, LZ, Z, POS, SCORE_BUF, CAND_VAL, CAND_IDX, cur, window, S, chunk_len,
                   H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, GP: tl.constexpr,
                   BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_S: tl.constexpr,
                   NCAND: tl.constexpr):
    """One program per (sequence, KV head, chunk of chunk_len slots, one block): many short programs, not a few
    long loops, read z and the scores."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    for gi in tl.static_range(G):  # the attention output of query head gi, merged by one of the chunks' programs
        if chunk == gi % NCAND:
            _combine_row(M, L, ACC, OUT, b * H + hk * G + gi, D, NSPLIT, BLOCK_S)
    g = tl.arange(0, GP)
    gmask = g < G
    rows = b * H + hk * G + g
    # log Z of each query head, from every split's Gumbel partials
    s = tl.arange(0, BLOCK_S)
    parts = rows[:, None] * NSPLIT + s[None, :]
    pmask = gmask[:, None] & (s < NSPLIT)[None, :]
    mz = tl.load(MZ + parts, mask=pmask, other=float("-inf"))
    lz = tl.load(LZ + parts, mask=pmask, other=0.0)
    mzmax = tl.max(mz, 1)
    mzmax = tl.where(mzmax == float("-inf"), 0.0, mzmax)
    logz = mzmax + tl.log(tl.where(gmask, tl.sum(lz * tl.exp(mz - mzmax[:, None]), 1), 1.0))
    cur_pos = tl.load(cur).to(POS.dtype.element_ty)
    _score_and_candidate(Z, POS, SCORE_BUF, CAND_VAL, CAND_IDX, rows, gmask, logz, cur_pos, window,
                         (b * HKV + hk) * S, chunk * chunk_len, S, chunk_len, pid * NCAND + chunk, BLOCK_N, BLOCKS)


@triton.jit
def _score_and_candidate(Z, POS, SCORE_BUF, CAND_VAL, CAND_IDX, rows, gmask, logz, cur_pos, window, kv_base, start,
                         S, split_len, cand, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    """Add f = exp(z - log Z), summed over the query heads `rows`, to the score of each token of the split
    [start, start + split_len) and store the split's lowest-ranked evictable slot at CAND_*[cand] (z's last read
    marked to leave L2 first)."""
    end = start + split_len
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for i in range(0, BLOCKS):  # BLOCKS x BLOCK_N >= split_len (blocks here are wider than the split kernel's)
        n = start + i * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = (n < S) & (n < end)
        pos = tl.load(POS + kv_base + n, mask=nmask, other=-2)
        lmask = gmask[:, None] & nmask[None, :]
        z = tl.load(Z + rows[:, None] * S + n[None, :], mask=lmask, other=float("-inf"), eviction_policy="evict_first")
        f = tl.where(lmask & (pos[None, :] >= 0), tl.exp(z - logz[:, None]), 0.0)
        score = tl.load(SCORE_BUF + kv_base + n, mask=nmask, other=0.0) + tl.sum(f, 0)
        tl.store(SCORE_BUF + kv_base + n, score, mask=nmask)
        protected = (pos > cur_pos - window) | (pos == -2) | (~nmask)
        rank = tl.where(protected, float("inf"), tl.where(pos == -1, float("-inf"), score))
        take = rank < best
        best = tl.where(take, rank, best)
        best_i = tl.where(take, n, best_i)
    v = tl.min(best, 0)
    # lowest index among the minima, as torch's argmin returns the first
    i = tl.min(tl.where(best == v, best_i, 2147483647), 0)
    tl.store(CAND_VAL + cand, v)
    tl.store(CAND_IDX + cand, i)


#: Triton indexes with int32: past this many elements in one layer's K or V the split kernel computes their offsets
#: in 64 bits (with 32, GPT-J-6B at batch 64 x 8200 slots read out of bounds on the H200,
#: lab/data/attention/h200-attention-options-run1.txt); z, scores and positions (B x H x slots) must stay below it
INT32_MAX = 2**31 - 1

#: Slots per program of Keyformer's finish kernel, one block each (no loop): many short programs read z and the
#: scores faster than one loop per split (H200: Llama-3-8B's batch-16 x 16384 finish kernels 566 -> 409 us per
#: step, lab/data/profiles/h200-profile-keyformer.txt; chunks of 1024 slots: 575 us)
FINISH_CHUNK = 256


def _blocks(head_dim: int) -> int:
    """Tokens per block: 32 x 256 or 64 x 128 bf16 elements of K (and of V) per load."""
    return 32 if head_dim > 128 else 64


#: The split kernel's programs per SM that the split aims at: about 4 (a wave and a third, with 3 resident per
#: SM), but 2 where sequences x KV heads are fewer than the SMs (batch 1): there 2 per SM was faster on the H200
#: (GPT-J-6B at 8192 tokens 45.3 -> 39.6 us per layer for the full cache, Llama-3-8B 17.0 -> 14.5) and at batch
#: 16-64 slower (lab/data/attention/h200-attention-variants-per-sm.csv)
PROGRAMS_PER_SM = 4
FEW_ROWS_PER_SM = 2


def split_length(slots: int, rows: int, block: int, sms: int, split_tokens: int | None = None) -> int:
    """Tokens per split, whole blocks: `split_tokens` rounded up if given, else the slots spread over
    ceil(programs per SM x `sms` / `rows`) splits, `rows` being sequences x KV heads."""
    if split_tokens is not None:
        return max(block, -(-split_tokens // block) * block)
    per_sm = FEW_ROWS_PER_SM if rows < sms else PROGRAMS_PER_SM
    splits = -(-per_sm * sms // rows)
    blocks = -(-slots // block)
    return -(-blocks // splits) * block


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's CPU interpreter (tests): a few splits, so the multi-split paths run


class StepState:
    """Per-step scalars shared by every layer's cache: the new token's position and the decode-step counter
    (which sets Keyformer's temperature and the noise seed). The first layer sets `cur`, the last advances `step`.
    `scratch` holds buffers a layer needs only during its own step, which the layers share (Keyformer's z)."""

    def __init__(self, device, step=0.0):
        self.cur = torch.zeros((), dtype=torch.int64, device=device)
        self.step = torch.full((), float(step), dtype=torch.float32, device=device)
        self.scratch: dict[str, torch.Tensor] = {}


def _scratch(shared: dict | None, name: str, numel: int, like: dict) -> torch.Tensor:
    """A buffer of `numel` elements, from `shared` (made there on first use) if given, else new."""
    if shared is None:
        return torch.empty(numel, **like)
    if name not in shared or shared[name].numel() < numel:
        shared[name] = torch.empty(numel, **like)
    return shared[name][:numel]


class FusedDecoder:
    """Buffers and launches for one layer shape; the cache is read in `NSPLIT` parallel parts of `split_len`.
    `slopes` [heads] (fp32): an ALiBi model's slopes, added in the kernel as slope x (key - query position)."""

    def __init__(self, batch, heads, kv_heads, slots, head_dim, device, split_tokens=None, scoring=True,
                 block_n=None, num_warps=4, num_stages=3, maxnreg=None, finish_chunk=FINISH_CHUNK, scratch=None,
                 offsets64=None, slopes=None):
        if batch * heads * slots > INT32_MAX:
            raise KfsimError(f"the fused attention kernel addresses Keyformer's z and a layer's scores with 32-bit "
                             f"offsets: batch {batch} x {heads} heads x {slots} slots = {batch * heads * slots} "
                             f"is over {INT32_MAX}")
        # K and V offsets in 64 bits only where 32 would overflow (None), so other shapes run the kernel as measured
        self.offsets64 = batch * kv_heads * slots * head_dim > INT32_MAX if offsets64 is None else offsets64
        self.B, self.H, self.HKV, self.S, self.D = batch, heads, kv_heads, slots, head_dim
        self.G = heads // kv_heads
        # tensor-core dots need 16 rows, so MHA (G = 1) pads 15; CUDA-core products instead need a [BLOCK_N, D]
        # fp32 temporary, which ran Keyformer's kernel out of registers (tried with bench_attention on the H100)
        self.BLOCK_G = max(16, triton.next_power_of_2(self.G))
        self.GP = triton.next_power_of_2(self.G)
        self.BLOCK_N = block_n or _blocks(head_dim)
        self.num_warps, self.num_stages, self.maxnreg = num_warps, num_stages, maxnreg
        # Keyformer's noise takes its logs on the special-function unit: PTX, which Triton's interpreter cannot run
        self.fast_log = torch.device(device).type == "cuda"
        if slopes is not None and tuple(slopes.shape) != (heads,):
            raise ValueError(f"fused attention: ALiBi slopes must be [{heads}] (one per query head), got "
                             f"{tuple(slopes.shape)}")
        self.slopes = None if slopes is None else slopes.to(device=device, dtype=torch.float32).contiguous()
        self.split_len = split_length(slots, batch * kv_heads, self.BLOCK_N, _sm_count(device), split_tokens)
        self.NSPLIT = triton.cdiv(slots, self.split_len)
        self.BLOCK_S = max(2, triton.next_power_of_2(self.NSPLIT))
        # Keyformer's finish kernel: a program per `finish_chunk` slots in one block, never longer than a split
        # (short splits, at batch 1, keep their one program each)
        self.chunk_len = min(finish_chunk, self.split_len) if self.NSPLIT > 1 else self.split_len
        self.FBLOCK = min(triton.next_power_of_2(finish_chunk), triton.next_power_of_2(self.chunk_len))
        self.NCAND = triton.cdiv(slots, self.chunk_len)
        self.BLOCK_C = max(2, triton.next_power_of_2(self.NCAND))
        f32 = dict(dtype=torch.float32, device=device)
        self.m = torch.empty(batch * heads * self.NSPLIT, **f32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(batch * heads * self.NSPLIT * head_dim, **f32)
        if scoring:
            self.mz, self.lz = torch.empty_like(self.m), torch.empty_like(self.m)
            # z lives for one layer's step: the layers that share `scratch` (a dict) share one buffer, which can
            # then stay in L2 from layer to layer
            self.z = _scratch(scratch, "z", batch * heads * slots, f32)
            self.cand_val = torch.empty(batch * kv_heads * self.NCAND, **f32)
            self.cand_idx = torch.empty(batch * kv_heads * self.NCAND, dtype=torch.int32, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)

    def set_free(self, free):
        """Make the next step write into `free` [B, HKV] (as if the last step's candidates had chosen it)."""
        self.cand_val.view(self.B, self.HKV, self.NCAND).fill_(float("inf"))
        self.cand_val.view(self.B, self.HKV, self.NCAND)[..., 0] = float("-inf")
        self.cand_idx.view(self.B, self.HKV, self.NCAND)[..., 0] = free.view(self.B, self.HKV).int()

    def free(self):
        """The slot the next step will write into, [B, HKV, 1] (int64), from the candidates."""
        vals = self.cand_val.view(self.B, self.HKV, self.NCAND)
        return self.cand_idx.view(self.B, self.HKV, self.NCAND).gather(-1, vals.argmin(-1, keepdim=True)).long()

    def split_launch(self, q, k_new, v_new, k_cache, v_cache, n_valid, out, pos=None, score_buf=None, state=None,
                     noise=None, tau_delta=0.0, window=0, rotary=None):
        """The split kernel's grid, arguments and compile-time constants for one step (kernel_stats compiles
        the same kernel from them without a GPU)."""
        dummy = self.m
        cos, sin, rot_dim, interleaved = rotary or (dummy, dummy, 0, False)
        score = score_buf is not None
        if q.stride()[1:] != (self.D, 1) or k_new.stride()[1:] != (self.D, 1) or k_new.stride() != v_new.stride():
            raise ValueError(f"fused attention: q, k_new and v_new must be [B, heads, D] with contiguous heads (rows "
                             f"may be further apart), got strides {q.stride()}, {k_new.stride()}, {v_new.stride()}")
        if k_cache.shape[-1] != self.D:
            raise ValueError(f"fused attention: the cache's rows must be {self.D} wide (the head), got "
                             f"{k_cache.shape[-1]} (a full cache made with alibi_slopes carries extra columns: "
                             f"make it without them and give the slopes to the fused cache)")
        args = (q, k_cache, v_cache, k_new, v_new, pos if pos is not None else dummy,
                score_buf if score else dummy, self.cand_val if score else dummy,
                self.cand_idx if score else dummy, state.step if state is not None else dummy,
                state.cur if state is not None else dummy, self.z if score else dummy,
                noise if noise is not None else dummy, self.m, self.l, self.acc, self.mz if score else dummy,
                self.lz if score else dummy, out, cos, sin, self.slopes if self.slopes is not None else dummy,
                self.S, n_valid, self.split_len, self.scale, TAU_INIT, tau_delta, window, q.stride(0),
                k_new.stride(0))
        meta = dict(
            ROT=0 if rotary is None else 1 if interleaved else 2, ROT_DIM=rot_dim, ALIBI=self.slopes is not None,
            H=self.H, HKV=self.HKV, G=self.G, D=self.D, BLOCK_G=self.BLOCK_G, GP=self.GP, BLOCK_N=self.BLOCK_N,
            NSPLIT=self.NSPLIT, BLOCKS=self.split_len // self.BLOCK_N, BLOCK_S=self.BLOCK_S, SCORE=score,
            HAS_POS=pos is not None, USE_NOISE=noise is not None, IEEE=q.dtype == torch.float32,
            FINISH=self.NSPLIT == 1, FBLOCK=self.FBLOCK, FBLOCKS=triton.cdiv(self.split_len, self.FBLOCK),
            FAST_LOG=self.fast_log, OFFS64=self.offsets64, NCAND=self.NCAND, BLOCK_C=self.BLOCK_C,
            ROWS_APART=self.B > 1 and not (q.is_contiguous() and k_new.is_contiguous() and v_new.is_contiguous()))
        options = dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)
        return (self.B * self.HKV, self.NSPLIT), args, meta, options

    def _split(self, *args, **kwargs):
        grid, args, meta, options = self.split_launch(*args, **kwargs)
        self.split_handle = _split_kernel[grid](*args, **meta, **options)

    def combine_launch(self, out):
        """The full cache's combine kernel (more than one split): grid, arguments, constants, options."""
        return ((self.B * self.H,), (self.m, self.l, self.acc, out),
                dict(D=self.D, NSPLIT=self.NSPLIT, BLOCK_S=self.BLOCK_S), {})

    def finish_launch(self, out, pos, score_buf, state, window):
        """Keyformer's finish kernel (more than one split): grid, arguments, constants, options."""
        args = (self.m, self.l, self.acc, out, self.mz, self.lz, self.z, pos, score_buf, self.cand_val,
                self.cand_idx, state.cur, window, self.S, self.chunk_len)
        meta = dict(H=self.H, HKV=self.HKV, G=self.G, D=self.D, GP=self.GP, BLOCK_N=self.FBLOCK, NSPLIT=self.NSPLIT,
                    BLOCKS=triton.cdiv(self.chunk_len, self.FBLOCK), BLOCK_S=self.BLOCK_S, NCAND=self.NCAND)
        return (self.B * self.HKV, self.NCAND), args, meta, dict(num_warps=self.num_warps)

    def attend(self, q, k_new, v_new, k_cache, v_cache, n_valid, out=None, rotary=None):
        """Full cache: q [B, H, D], k_new/v_new [B, HKV, D] -> [B, H, D]; the new token goes to slot n_valid - 1.
        `rotary` (cos, sin, dim, interleaved): q and k_new are not rotated yet; the kernel rotates them."""
        out = torch.empty_like(q) if out is None else out
        self._split(q, k_new, v_new, k_cache, v_cache, n_valid, out, rotary=rotary)
        if self.NSPLIT > 1:
            grid, args, meta, options = self.combine_launch(out)
            _combine_kernel[grid](*args, **meta, **options)
        return out

    def attend_and_score(self, q, k_new, v_new, k_cache, v_cache, pos, score_buf, state, window, noise=None,
                         tau_delta=0.0, out=None, rotary=None):
        """Evicting cache: as `attend`, with the new token in the slot the last step freed (pos = state.cur,
        score 0); this step's Gumbel-softmax is added to `score_buf` and each chunk's eviction candidate left."""
        out = torch.empty_like(q) if out is None else out
        self._split(q, k_new, v_new, k_cache, v_cache, self.S, out, pos, score_buf, state, noise, tau_delta,
                    window, rotary)
        if self.NSPLIT > 1:
            grid, args, meta, options = self.finish_launch(out, pos, score_buf, state, window)
            _finish_kernel[grid](*args, **meta, **options)
        return out


class FusedKeyformerCache:
    """The EvictingCache algorithm (keyformer only) run by the fused kernels on the same state tensors (the
    positions made int32: half the bytes each kernel reads for them).

    Two kernels per layer and step; `plain.free` and `plain.step` are brought up to date by `sync()`.
    `slopes`: an ALiBi model's slopes per query head (the kernel adds the bias; `decode`'s bias_fn is then unused).
    """

    kind = "keyformer"

    def __init__(self, plain, split_tokens=None, state=None, first=True, last=True, kernel=None, slopes=None):
        self.plain = plain  # an EvictingCache holding the state
        self.fused = None
        self.split_tokens = split_tokens
        self.kernel = dict(kernel or {})  # more FusedDecoder keywords (block_n, num_warps, finish_chunk, ...)
        self.slopes = slopes
        plain.pos = plain.pos.to(torch.int32)
        self.state = state or StepState(plain.k.device)
        self.first, self.last = first, last
        self.noise_tensor = None  # tests: [B, H, S] fp32 shared with the plain path

    def __getattr__(self, name):  # fill_random, prefill, slots, cached_tokens, ... come from the plain cache
        return getattr(self.plain, name)

    def _start(self, q):
        c = self.plain
        B, HKV, S, D = c.k.shape
        self.fused = FusedDecoder(B, q.shape[1], HKV, S, D, q.device, self.split_tokens, scratch=self.state.scratch,
                                  slopes=self.slopes, **self.kernel)
        self.fused.set_free(c.free)
        if self.first:
            self.state.step.copy_(c.step)

    #: decode() takes q and k before rotary (rotary=...) and rotates them in the kernel
    rotates = True

    def decode(self, q, k, v, pos, bias_fn=None, rotary=None):
        _check_bias(bias_fn, self.slopes)
        c = self.plain
        B, HKV, S, D = c.k.shape
        H = q.shape[1]
        if self.fused is None:
            self._start(q)
        if self.first:
            self.state.cur.copy_(torch.as_tensor(pos, device=c.pos.device))
        out = self.fused.attend_and_score(q.reshape(B, H, D), k.reshape(B, HKV, D), v.reshape(B, HKV, D), c.k, c.v,
                                          c.pos, c.score, self.state, c.window, self.noise_tensor, c.tau_delta,
                                          rotary=rotary)
        if self.last:
            self.state.step += 1
        return out.view(B, H, 1, D)

    def sync(self):
        """Write the next free slot and the step count back into the plain cache's tensors."""
        self.plain.free.copy_(self.fused.free())
        self.plain.step.copy_(self.state.step)


def _check_bias(bias_fn, slopes):
    """An ALiBi model's decoder passes its bias_fn: the fused cache must have been given the slopes instead."""
    if bias_fn is not None and slopes is None:
        raise ValueError("an ALiBi model's fused cache needs its slopes (fuse_caches(..., slopes=...)): the kernel "
                         "adds the bias itself")


class FusedFullCache:
    """The full cache read by the split-K kernel (the baseline Keyformer is compared with); the new token's K and
    V are written by the kernel itself. `slopes` as FusedKeyformerCache's (the plain cache is made without them)."""

    def __init__(self, plain, split_tokens=None, kernel=None, slopes=None):
        self.plain, self.split_tokens, self.fused = plain, split_tokens, None
        self.kernel, self.slopes = dict(kernel or {}), slopes

    def __getattr__(self, name):
        return getattr(self.plain, name)

    rotates = True  # as FusedKeyformerCache

    def decode(self, q, k, v, pos, bias_fn=None, rotary=None):
        _check_bias(bias_fn, self.slopes)
        c = self.plain
        B, HKV, S, D = c.k.shape
        H = q.shape[1]
        n = c.length
        if self.fused is None:
            self.fused = FusedDecoder(B, H, HKV, S, D, q.device, self.split_tokens, scoring=False, slopes=self.slopes,
                                      **self.kernel)
        out = self.fused.attend(q.reshape(B, H, D), k.reshape(B, HKV, D), v.reshape(B, HKV, D), c.k, c.v, n + 1,
                                rotary=rotary)
        if not c.steady:
            c.length = n + 1
        return out.view(B, H, 1, D)
