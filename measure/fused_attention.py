"""Split-K (flash-decoding) decode attention in Triton, with Keyformer's scoring fused into the same pass.

One decode step of one layer, for an evicting cache (budget + free slot, see kv_policies.EvictingCache):
  A. `_split_kernel`   one program per (sequence, KV head, split of the cache): reads its K and V block once,
                       computes the logits of the KV head's query heads, the attention partials (max, sum, P.V) and
                       the Gumbel-softmax partials (max, sum of exp((logit + noise) / tau)); writes the fp32 logits.
  B. `_combine_kernel` one program per (sequence, query head): merges the partials into the attention output and
                       the Gumbel-softmax normaliser log Z.
  C. `_score_kernel`   one program per (sequence, KV head, split): f = exp((logit + noise) / tau - log Z) summed over
                       the query heads, added to the score; the split's lowest-ranked evictable slot.
The arg-min over splits and the write of the next token into the freed slot are small torch ops around them.
K and V are read once per step; the extra traffic is one fp32 logit per query head and token, written in A and
read in C, and the score read and written once. The full cache uses A and B only (no scoring).
Noise is generated in-kernel from a seed (tl.rand) or, for tests, read from a tensor shared with the plain path.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .kv_policies import TAU_INIT


@triton.jit
def _noise(NOISE, seed, offs, USE_NOISE: tl.constexpr):
    if USE_NOISE:
        return tl.load(NOISE + offs)
    u = tl.rand(seed, offs)
    u = tl.minimum(tl.maximum(u, 1e-10), 1.0 - 1e-7)
    return -tl.log(-tl.log(u))


@triton.jit
def _free_slot(CANDV, CANDI, row, NSPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
    """The slot to write the new token into: the lowest-ranked candidate over the splits of the last step."""
    s = tl.arange(0, BLOCK_S)
    vals = tl.load(CANDV + row * NSPLIT + s, mask=s < NSPLIT, other=float("inf"))
    idx = tl.load(CANDI + row * NSPLIT + s, mask=s < NSPLIT, other=2147483647)
    v = tl.min(vals, 0)
    first = tl.min(tl.where(vals == v, s, BLOCK_S), 0)
    return tl.sum(tl.where(s == first, idx, 0), 0)


@triton.jit
def _split_kernel(Q, K, V, KNEW, VNEW, POS, SCORE_BUF, CANDV, CANDI, STEP, CUR, LOGITS, NOISE, M, L, ACC, MZ, LZ,
                  S, n_valid, split_len, scale, tau_init, tau_delta,
                  H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, BLOCKS: tl.constexpr,
                  BLOCK_S: tl.constexpr, SCORE: tl.constexpr, HAS_POS: tl.constexpr, USE_NOISE: tl.constexpr,
                  IEEE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gmask = g < G
    heads = hk * G + g
    q = tl.load(Q + (b * H + heads)[:, None] * D + d[None, :], mask=gmask[:, None], other=0.0)
    kv_base = (b * HKV + hk) * S
    start = split * split_len
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    mz = tl.full([BLOCK_G], float("-inf"), tl.float32)
    lz = tl.zeros([BLOCK_G], tl.float32)
    # the new token: its K and V come from KNEW/VNEW and are written into its slot by the program that owns it
    if HAS_POS:
        new_slot = _free_slot(CANDV, CANDI, pid, NSPLIT, BLOCK_S)
        cur = tl.load(CUR)
    else:
        new_slot = n_valid - 1
    knew = tl.load(KNEW + pid * D + d)
    vnew = tl.load(VNEW + pid * D + d)
    if (new_slot >= start) & (new_slot < start + split_len):
        tl.store(K + (kv_base + new_slot) * D + d, knew)
        tl.store(V + (kv_base + new_slot) * D + d, vnew)
        if HAS_POS:
            tl.store(POS + kv_base + new_slot, cur)
            tl.store(SCORE_BUF + kv_base + new_slot, 0.0)
    if SCORE:
        step = tl.load(STEP)
        seed = step.to(tl.int32)
        tau = tau_init + step * tau_delta
    # a constant trip count (BLOCKS x BLOCK_N = split_len; Triton's CPU interpreter needs one); blocks past the
    # last valid token are skipped whole, so they cost no loads and no math
    for i in range(0, BLOCKS):
        n0 = start + i * BLOCK_N
        if n0 < n_valid:
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < n_valid
            is_new = n == new_slot
            k = tl.load(K + (kv_base + n)[:, None] * D + d[None, :], mask=nmask[:, None] & ~is_new[:, None], other=0.0)
            v = tl.load(V + (kv_base + n)[:, None] * D + d[None, :], mask=nmask[:, None] & ~is_new[:, None], other=0.0)
            k = tl.where(is_new[:, None], knew[None, :], k)
            v = tl.where(is_new[:, None], vnew[None, :], v)
            valid = nmask
            if HAS_POS:
                pos = tl.load(POS + kv_base + n, mask=nmask & ~is_new, other=-1)
                pos = tl.where(is_new, cur, pos)
                valid = valid & (pos >= 0)
            if IEEE:  # fp32 inputs (tests): exact fp32 products, not TF32
                x = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale
            else:
                x = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            x = tl.where(valid[None, :] & gmask[:, None], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(x - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
            if SCORE:
                offs = (b * H + heads)[:, None] * S + n[None, :]
                lmask = gmask[:, None] & nmask[None, :]
                tl.store(LOGITS + offs, x, mask=lmask)
                z = (x + _noise(NOISE, seed, offs, USE_NOISE)) / tau
                z = tl.where(valid[None, :] & gmask[:, None], z, float("-inf"))
                mz_new = tl.maximum(mz, tl.max(z, 1))
                mz_safe = tl.where(mz_new == float("-inf"), 0.0, mz_new)
                lz = lz * tl.exp(mz - mz_safe) + tl.sum(tl.exp(z - mz_safe[:, None]), 1)
                mz = mz_new
    part = (b * H + heads) * NSPLIT + split
    tl.store(M + part, m_i, mask=gmask)
    tl.store(L + part, l_i, mask=gmask)
    tl.store(ACC + part[:, None] * D + d[None, :], acc, mask=gmask[:, None])
    if SCORE:
        tl.store(MZ + part, mz, mask=gmask)
        tl.store(LZ + part, lz, mask=gmask)


@triton.jit
def _combine_kernel(M, L, ACC, MZ, LZ, OUT, LOGZ, D: tl.constexpr, NSPLIT: tl.constexpr,
                    BLOCK_S: tl.constexpr, SCORE: tl.constexpr):
    row = tl.program_id(0)  # b * H + h
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
    if SCORE:
        mz = tl.load(MZ + row * NSPLIT + s, mask=smask, other=float("-inf"))
        lz = tl.load(LZ + row * NSPLIT + s, mask=smask, other=0.0)
        mzmax = tl.max(mz, 0)
        wz = tl.where(smask & (mz > float("-inf")), tl.exp(mz - mzmax), 0.0)
        tl.store(LOGZ + row, mzmax + tl.log(tl.sum(lz * wz, 0)))


@triton.jit
def _score_kernel(LOGITS, NOISE, STEP, LOGZ, POS, SCORE_BUF, CAND_VAL, CAND_IDX, cur, window,
                  S, split_len, tau_init, tau_delta, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr, BLOCKS: tl.constexpr, USE_NOISE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    logz = tl.load(LOGZ + b * H + heads, mask=gmask, other=0.0)
    step = tl.load(STEP)
    seed = step.to(tl.int32)
    tau = tau_init + step * tau_delta
    cur_pos = tl.load(cur)
    kv_base = (b * HKV + hk) * S
    start = split * split_len
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int32)
    for i in range(0, BLOCKS):
        n0 = start + i * BLOCK_N
        if n0 < S:
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < S
            pos = tl.load(POS + kv_base + n, mask=nmask, other=-2)
            offs = (b * H + heads)[:, None] * S + n[None, :]
            lmask = gmask[:, None] & nmask[None, :]
            x = tl.load(LOGITS + offs, mask=lmask, other=float("-inf"))
            z = (x + _noise(NOISE, seed, offs, USE_NOISE)) / tau
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
    tl.store(CAND_VAL + pid * NSPLIT + split, v)
    tl.store(CAND_IDX + pid * NSPLIT + split, i)


def _blocks(head_dim: int) -> int:
    return 32 if head_dim > 128 else 64


class StepState:
    """Per-step scalars shared by every layer's cache: the new token's position and the decode-step counter
    (which sets Keyformer's temperature and the noise seed). The first layer sets `cur`, the last advances `step`."""

    def __init__(self, device, step=0.0):
        self.cur = torch.zeros((), dtype=torch.int64, device=device)
        self.step = torch.full((), float(step), dtype=torch.float32, device=device)


class FusedDecoder:
    """Buffers and launches for one layer shape; `splits` parts of the cache are read in parallel."""

    def __init__(self, batch, heads, kv_heads, slots, head_dim, device, split_tokens=512, scoring=True):
        self.B, self.H, self.HKV, self.S, self.D = batch, heads, kv_heads, slots, head_dim
        self.G = heads // kv_heads
        self.BLOCK_G = max(16, triton.next_power_of_2(self.G))
        self.BLOCK_N = _blocks(head_dim)
        # enough splits to fill the GPU when batch x KV heads is small, none smaller than one block
        self.split_len = max(self.BLOCK_N, triton.cdiv(split_tokens, self.BLOCK_N) * self.BLOCK_N)
        self.NSPLIT = triton.cdiv(slots, self.split_len)
        self.BLOCK_S = max(2, triton.next_power_of_2(self.NSPLIT))
        f32 = dict(dtype=torch.float32, device=device)
        self.m = torch.empty(batch * heads * self.NSPLIT, **f32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(batch * heads * self.NSPLIT * head_dim, **f32)
        self.scoring = scoring
        if scoring:
            self.mz, self.lz = torch.empty_like(self.m), torch.empty_like(self.m)
            self.logits = torch.empty(batch * heads * slots, **f32)
            self.logz = torch.empty(batch * heads, **f32)
            self.cand_val = torch.empty(batch * kv_heads * self.NSPLIT, **f32)
            self.cand_idx = torch.empty(batch * kv_heads * self.NSPLIT, dtype=torch.int32, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)

    def set_free(self, free):
        """Make the next step write into `free` [B, HKV] (as if the last step's candidates had chosen it)."""
        self.cand_val.view(self.B, self.HKV, self.NSPLIT).fill_(float("inf"))
        self.cand_val.view(self.B, self.HKV, self.NSPLIT)[..., 0] = float("-inf")
        self.cand_idx.view(self.B, self.HKV, self.NSPLIT)[..., 0] = free.view(self.B, self.HKV).int()

    def free(self):
        """The slot the next step will write into, [B, HKV, 1] (int64), from the candidates."""
        vals = self.cand_val.view(self.B, self.HKV, self.NSPLIT)
        return self.cand_idx.view(self.B, self.HKV, self.NSPLIT).gather(-1, vals.argmin(-1, keepdim=True)).long()

    def attend(self, q, k_new, v_new, k_cache, v_cache, n_valid, pos=None, score_buf=None, state=None,
               noise=None, tau_delta=0.0, out=None):
        """q [B, H, D], k_new/v_new [B, HKV, D] -> [B, H, D]. Full cache (pos None): the new token goes to slot
        n_valid - 1. Evicting cache: it goes to the slot the last step freed, with pos = state.cur, score 0."""
        out = torch.empty_like(q) if out is None else out
        dummy = self.m
        score = self.scoring and pos is not None
        grid = (self.B * self.HKV, self.NSPLIT)
        _split_kernel[grid](
            q, k_cache, v_cache, k_new, v_new, pos if pos is not None else dummy,
            score_buf if score_buf is not None else dummy, self.cand_val if score else dummy,
            self.cand_idx if score else dummy, state.step if state is not None else dummy,
            state.cur if state is not None else dummy, self.logits if score else dummy,
            noise if noise is not None else dummy, self.m, self.l, self.acc, self.mz if score else dummy,
            self.lz if score else dummy, self.S, n_valid, self.split_len, self.scale, TAU_INIT, tau_delta,
            H=self.H, HKV=self.HKV, G=self.G, D=self.D, BLOCK_G=self.BLOCK_G, BLOCK_N=self.BLOCK_N,
            NSPLIT=self.NSPLIT, BLOCKS=self.split_len // self.BLOCK_N, BLOCK_S=self.BLOCK_S, SCORE=score,
            HAS_POS=pos is not None, USE_NOISE=noise is not None, IEEE=q.dtype == torch.float32)
        _combine_kernel[(self.B * self.H,)](
            self.m, self.l, self.acc, self.mz if score else dummy, self.lz if score else dummy, out,
            self.logz if score else dummy, D=self.D, NSPLIT=self.NSPLIT, BLOCK_S=self.BLOCK_S, SCORE=score)
        return out

    def score(self, pos, score_buf, state, window, noise=None, tau_delta=0.0):
        """Add this step's Gumbel-softmax to `score_buf` and leave each split's eviction candidate."""
        grid = (self.B * self.HKV, self.NSPLIT)
        _score_kernel[grid](
            self.logits, noise if noise is not None else self.m, state.step, self.logz, pos, score_buf,
            self.cand_val, self.cand_idx, state.cur, window, self.S, self.split_len, TAU_INIT, tau_delta,
            H=self.H, HKV=self.HKV, G=self.G, BLOCK_G=self.BLOCK_G, BLOCK_N=self.BLOCK_N, NSPLIT=self.NSPLIT,
            BLOCKS=self.split_len // self.BLOCK_N, USE_NOISE=noise is not None)


class FusedKeyformerCache:
    """The EvictingCache algorithm (keyformer only) run by the fused kernels on the same state tensors.

    Three kernels per layer and step; `plain.free` and `plain.step` are brought up to date by `sync()`.
    """

    kind = "keyformer"

    def __init__(self, plain, split_tokens=512, state=None, first=True, last=True):
        self.plain = plain  # an EvictingCache holding the state
        self.fused = None
        self.split_tokens = split_tokens
        self.state = state or StepState(plain.k.device)
        self.first, self.last = first, last
        self.noise_tensor = None  # tests: [B, H, S] fp32 shared with the plain path

    def __getattr__(self, name):  # fill_random, prefill, slots, cached_tokens, ... come from the plain cache
        return getattr(self.plain, name)

    def _start(self, q):
        c = self.plain
        B, HKV, S, D = c.k.shape
        self.fused = FusedDecoder(B, q.shape[1], HKV, S, D, q.device, self.split_tokens)
        self.fused.set_free(c.free)
        if self.first:
            self.state.step.copy_(c.step)

    def decode(self, q, k, v, pos, bias_fn=None):
        assert bias_fn is None, "the fused kernel has no ALiBi; use the plain cache for MPT"
        c = self.plain
        B, HKV, S, D = c.k.shape
        H = q.shape[1]
        if self.fused is None:
            self._start(q)
        if self.first:
            self.state.cur.copy_(torch.as_tensor(pos, device=c.pos.device))
        out = self.fused.attend(q.reshape(B, H, D), k.reshape(B, HKV, D), v.reshape(B, HKV, D), c.k, c.v, S,
                                c.pos, c.score, self.state, self.noise_tensor, c.tau_delta)
        self.fused.score(c.pos, c.score, self.state, c.window, self.noise_tensor, c.tau_delta)
        if self.last:
            self.state.step += 1
        return out.view(B, H, 1, D)

    def sync(self):
        """Write the next free slot and the step count back into the plain cache's tensors."""
        self.plain.free.copy_(self.fused.free())
        self.plain.step.copy_(self.state.step)


class FusedFullCache:
    """The full cache read by the split-K kernel (the baseline Keyformer is compared with); the new token's K and
    V are written by the kernel itself."""

    def __init__(self, plain, split_tokens=512):
        self.plain, self.split_tokens, self.fused = plain, split_tokens, None

    def __getattr__(self, name):
        return getattr(self.plain, name)

    def decode(self, q, k, v, pos, bias_fn=None):
        assert bias_fn is None, "the fused kernel has no ALiBi; use the plain cache for MPT"
        c = self.plain
        B, HKV, S, D = c.k.shape
        H = q.shape[1]
        n = c.length
        if self.fused is None:
            self.fused = FusedDecoder(B, H, HKV, S, D, q.device, self.split_tokens, scoring=False)
        out = self.fused.attend(q.reshape(B, H, D), k.reshape(B, HKV, D), v.reshape(B, HKV, D), c.k, c.v, n + 1)
        if not c.steady:
            c.length = n + 1
        return out.view(B, H, 1, D)
