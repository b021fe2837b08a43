"""KV caches that physically hold what the policy keeps: full, Keyformer, H2O and a recent window.

Every cache is a set of preallocated tensors of fixed shape (so a decode step can be captured in a CUDA graph):
K, V [batch, kv_heads, slots, head_dim]. The full cache's slots are the context; an evicting cache has
budget + 1 slots: the budget of kept tokens plus the slot the next token is written into. Each decode step writes
the new token's K and V into the free slot, attends over all slots, updates the per-token score, and picks the
next free slot (the evicted token) per sequence and KV head. Nothing is masked and then read anyway: a step reads
budget + 1 tokens, not the context.

Keyformer (Adnan et al., MLSys 2024, arXiv 2403.09054; the authors' code, d-matrix-ai/keyformer-llm):
score += softmax((logits + Gumbel) / tau), tau rising linearly from tau_init; the recent window and the new token are never evicted; at the prompt the
budget is filled with the window plus the top-scoring others.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

#: Keyformer authors' temperature schedule (d-matrix-ai/keyformer-llm run scripts): tau_init 1 -> tau_end 2.
TAU_INIT, TAU_END = 1.0, 2.0


def gumbel_noise(like: torch.Tensor) -> torch.Tensor:
    """-log(-log U), U uniform in (0, 1): the standard Gumbel distribution."""
    u = torch.rand_like(like, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


def split_heads_gqa(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, kv_heads, H // kv_heads * T, D]: the query heads sharing one KV head, side by side."""
    B, H, T, D = q.shape
    return q.reshape(B, kv_heads, (H // kv_heads) * T, D)


#: Columns appended to every head for an ALiBi model's (MPT) prompt. K holds the key's position in base-256 digits
#: (each exact in bf16), the query holds slope x sqrt(head_dim) x the digits' weights, so q.k carries
#: slope x key position and causal flash attention applies ALiBi with no mask; slope x query position is the same
#: for every key of a row and cancels in the softmax. V's columns are zeros. 8 columns keep rows 16-byte aligned.
#: A decode step does not use them: see FullCache.
ALIBI_COLUMNS = 8
ALIBI_DIGITS = 3  # positions up to 256^3


def alibi_key_columns(positions: torch.Tensor, dtype) -> torch.Tensor:
    """[T] positions -> [T, ALIBI_COLUMNS]: base-256 digits, most significant first, then zeros."""
    p = positions.long()
    digits = [(p // 256 ** i) % 256 for i in reversed(range(ALIBI_DIGITS))]
    cols = torch.stack(digits, -1)
    return F.pad(cols, (0, ALIBI_COLUMNS - ALIBI_DIGITS)).to(dtype)


def alibi_query_columns(slopes: torch.Tensor, head_dim: int, dtype) -> torch.Tensor:
    """[H] slopes -> [H, ALIBI_COLUMNS]: what each head's query appends so that q.k / sqrt(head_dim) gains
    slope x key position."""
    weights = torch.tensor([256.0 ** i for i in reversed(range(ALIBI_DIGITS))], device=slopes.device)
    cols = slopes.float()[:, None] * math.sqrt(head_dim) * weights
    return F.pad(cols, (0, ALIBI_COLUMNS - ALIBI_DIGITS)).to(dtype)


class FullCache:
    """The whole context: `capacity` slots, attention through torch's fused SDPA.

    ALiBi (`alibi_slopes`, per query head): a decode step adds slope_h x (key - query position), one row of
    biases per head [H, 1, slots] shared by the batch, in cuDNN's fused attention: on the H200 1.24x unbiased
    attention at batch 1 x 16k and 1.03x at batch 16, where position columns took 2.1-2.5x (lab/bench_alibi.py,
    lab/data/alibi/). A prompt uses the position columns (ALIBI_COLUMNS), which need no [T, S] mask."""

    kind = "full"

    def __init__(self, batch, kv_heads, capacity, head_dim, dtype, device, alibi_slopes=None):
        self.head_dim = head_dim
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.slopes = None if alibi_slopes is None else alibi_slopes.float().to(device)
        if self.slopes is not None:
            # cuDNN takes a bias whose rows start 16-byte aligned: the row is allocated to a multiple of 8 slots
            self.bias = torch.zeros(len(self.slopes), 1, -(-capacity // 8) * 8, dtype=dtype, device=device)
            self.key_pos = torch.arange(capacity, device=device)
            self.q_columns = alibi_query_columns(self.slopes, head_dim, dtype)  # a prompt's (ALIBI_COLUMNS)
        self.length = 0  # tokens held
        self.steady = False  # steady state: every step rewrites the last slot, so shapes and cost stay fixed

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def cached_tokens(self) -> int:
        """Tokens held before a step adds one: the context."""
        return self.slots - 1

    def fill_random(self, tokens: int) -> None:
        """Hold `tokens` random tokens plus one slot for the step's new token (timing does not depend on values)."""
        self.k[:, :, : tokens + 1].normal_()
        self.v[:, :, : tokens + 1].normal_()
        self.length, self.steady = tokens, True

    def _write(self, start: int, k, v) -> None:
        stop = start + k.shape[2]
        self.k[:, :, start:stop] = k
        self.v[:, :, start:stop] = v

    def prefill(self, q, k, v, bias=None):
        """`bias`: an ALiBi bias for a cache made without slopes (a test's reference); ignored with them."""
        P = k.shape[2]
        self._write(0, k, v)
        self.length = P
        keys, values = self.k[:, :, :P], self.v[:, :, :P]
        if self.slopes is None:
            return _sdpa(q, keys, values, bias, causal=True)
        B, H, T, D = q.shape
        qc = torch.cat([q, self.q_columns[None, :, None].expand(B, H, T, -1)], -1)
        kc = torch.cat([keys, alibi_key_columns(self.key_pos[:P], q.dtype).expand(B, keys.shape[1], P, -1)], -1)
        out = F.scaled_dot_product_attention(qc, kc, F.pad(values, (0, ALIBI_COLUMNS)), is_causal=True,
                                             scale=1.0 / math.sqrt(D), enable_gqa=H != keys.shape[1])
        return out[..., :D]

    def decode(self, q, k, v, pos: int, bias_fn=None):
        """q [B, H, 1, D]; k, v [B, kv_heads, 1, D]. Writes the token at slot `length`, attends over length + 1."""
        n = self.length
        if bias_fn is not None and self.slopes is None:
            raise ValueError("an ALiBi model's full cache needs alibi_slopes (its bias is built from them)")
        self._write(n, k, v)
        keys, values = self.k[:, :, : n + 1], self.v[:, :, : n + 1]
        if self.slopes is None:
            out = _sdpa(q, keys, values, None, causal=False)
        else:
            bias = self.bias[..., : n + 1]
            bias.copy_(self.slopes[:, None, None] * (self.key_pos[: n + 1] - pos))
            with sdpa_kernel(_BIAS_BACKENDS, set_priority=True):
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias.expand(q.shape[0], -1, -1, -1),
                                                     enable_gqa=q.shape[1] != keys.shape[1])
        if not self.steady:
            self.length = n + 1
        return out


#: Attention with a bias: cuDNN's fused kernel first (H200: 1.03-1.5x unbiased flash attention, where torch's
#: default choice, memory-efficient attention, took 2-10x; lab/data/alibi/), then the others where it refuses.
_BIAS_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v, bias, causal):
    """Fused attention; GQA by broadcasting KV heads inside the kernel (no copies)."""
    gqa = q.shape[1] != k.shape[1]
    if bias is not None:
        bias = bias.to(q.dtype)  # SDPA takes no fp32 bias with bf16 inputs (ALiBi in a bf16 decode step)
    if bias is not None and causal:
        P = q.shape[2]
        mask = torch.full((P, k.shape[2]), float("-inf"), device=q.device, dtype=q.dtype).triu_(1 + k.shape[2] - P)
        bias = bias + mask
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=gqa)


#: Slot counts are rounded up to a multiple of this, so the bf16 rows of logits and probabilities stay 16-byte
#: aligned; an odd row length (budget + 1) sends cuBLAS to kernels several times slower (seen on H100: a budget
#: of 2048 ran slower than one of 3277 before alignment).
SLOT_ALIGN = 8
EMPTY, PADDING = -1, -2  # `pos` of a slot that holds no token yet, and of an alignment slot never used


class EvictingCache:
    """A budget of kept tokens plus one free slot (plus alignment padding). `kind`: keyformer | h2o | window.

    State per sequence and KV head: `pos` (token position in each slot; EMPTY or PADDING; int64, or int32 once a
    fused Keyformer cache holds it), `score` (fp32 accumulated score), `free` (slot the next token goes into). `noise` can be replaced in tests to make Keyformer
    deterministic.
    """

    def __init__(self, kind, batch, kv_heads, budget, window, head_dim, dtype, device, tau_delta=0.01):
        assert kind in ("keyformer", "h2o", "window")
        self.kind = kind
        self.budget = int(budget)
        self.window = max(1, int(window))  # tokens of the recent window (the new token is always in it)
        self.used = self.budget + 1  # slots that ever hold tokens
        slots = -(-self.used // SLOT_ALIGN) * SLOT_ALIGN
        self.k = torch.zeros(batch, kv_heads, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, kv_heads, slots), EMPTY, dtype=torch.long, device=device)
        self.pos[:, :, self.used :] = PADDING
        self.score = torch.zeros(batch, kv_heads, slots, dtype=torch.float32, device=device)
        self.free = torch.zeros(batch, kv_heads, 1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.float32, device=device)  # decode steps so far (for tau)
        self.tau_delta = tau_delta
        self.noise = gumbel_noise
        self.scale = 1.0 / math.sqrt(head_dim)

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def cached_tokens(self) -> int:
        """Tokens held before a step adds one: the budget."""
        return self.budget

    def fill_random(self, tokens: int) -> None:
        """Steady state for timing: budget tokens held (chosen from a context of `tokens`), one slot free."""
        self.k.normal_()
        self.v.normal_()
        B, H, S = self.pos.shape
        kept = torch.arange(tokens - self.budget, tokens, device=self.pos.device)
        self.pos[:, :, : self.budget] = kept
        self.pos[:, :, self.budget] = EMPTY
        self.score.uniform_()
        self.free.fill_(self.budget)

    # ---- prompt ----
    def prefill(self, q, k, v, bias=None, chunk=512):
        """Causal attention over the prompt, then keep the window + the top-scoring others (per sequence and head)."""
        out = _sdpa(q, k, v, bias, causal=True)
        B, Hkv, P, D = k.shape
        if P <= self.budget:  # everything fits: keep all, free slot after them
            self.k[:, :, :P], self.v[:, :, :P] = k, v
            self.pos[:, :, :P] = torch.arange(P, device=k.device)
            self.score[:, :, :P] = self._prompt_scores(q, k, bias, chunk) if self.kind != "window" else 0
            self.free.fill_(P)
            return out
        positions = torch.arange(P, device=k.device).expand(B, Hkv, P)
        if self.kind == "window":
            keep = positions[:, :, P - self.budget :]
            scores = torch.zeros(B, Hkv, self.budget, device=k.device)
        else:
            s = self._prompt_scores(q, k, bias, chunk)
            w = min(self.window, self.budget)
            ranked = s.masked_fill(positions >= P - w, float("inf"))  # window tokens rank first
            keep = ranked.topk(self.budget, dim=-1).indices.sort(dim=-1).values
            scores = s.gather(-1, keep)
        idx = keep.unsqueeze(-1).expand(-1, -1, -1, D)
        self.k[:, :, : self.budget] = k.gather(2, idx)
        self.v[:, :, : self.budget] = v.gather(2, idx)
        self.pos[:, :, : self.budget] = keep
        self.pos[:, :, self.budget] = EMPTY
        self.score[:, :, : self.budget] = scores
        self.score[:, :, self.budget :] = 0
        self.free.fill_(self.budget)
        return out

    def _prompt_scores(self, q, k, bias, chunk):
        """Sum over prompt queries (and the query heads of each KV head) of softmax((logits + noise) / tau_init)."""
        B, Hkv, P, D = k.shape
        H = q.shape[1]
        G = H // Hkv
        total = torch.zeros(B, Hkv, P, device=k.device, dtype=torch.float32)
        kf = k.float()
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            qc = q[:, :, start:stop].float().reshape(B, Hkv, G, stop - start, D)
            logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf) * self.scale
            if bias is not None:
                logits = logits + bias[:, start:stop].float().reshape(1, Hkv, G, stop - start, P)
            causal = torch.arange(P, device=k.device)[None, :] > torch.arange(start, stop, device=k.device)[:, None]
            logits = logits.masked_fill(causal, float("-inf"))
            total += self._score_probs(logits, TAU_INIT).sum(dim=(2, 3))
        return total

    def _score_probs(self, logits, tau):
        if self.kind == "keyformer":
            return torch.softmax((logits + self.noise(logits)) / tau, dim=-1)
        return torch.softmax(logits, dim=-1)  # h2o: plain accumulated attention

    # ---- one decode step ----
    def write(self, k, v, pos: torch.Tensor) -> None:
        """Put the new token's keys, values and position into each sequence and head's free slot, its score 0.
        Compiled, with index_put_: inductor keeps it in place, where it turns scatter_ into two copies of the whole
        cache a step (lab.compiled_cache_write; H100, one layer at 16 x 8,192 kept: 253 against 992 us). Eager,
        with scatter_, in place too and without the index tensors' five more dispatched ops a layer."""
        B, Hkv, _, D = self.k.shape
        if torch.compiler.is_compiling():
            at = (torch.arange(B, device=self.k.device)[:, None], torch.arange(Hkv, device=self.k.device)[None, :],
                  self.free[..., 0])
            self.k.index_put_(at, k[:, :, 0])
            self.v.index_put_(at, v[:, :, 0])
            self.pos.index_put_(at, pos.to(self.pos.dtype).expand(B, Hkv))
            self.score.index_put_(at, torch.zeros((), device=self.score.device, dtype=self.score.dtype))
            return
        idx = self.free.unsqueeze(-1).expand(B, Hkv, 1, D)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)
        self.pos.scatter_(2, self.free, pos.expand(B, Hkv, 1).to(self.pos.dtype))
        self.score.scatter_(2, self.free, 0.0)

    def decode(self, q, k, v, pos: int | torch.Tensor, bias_fn=None):
        """Write the new token into the free slot, attend over all slots, score, choose the next slot to free."""
        B, Hkv, S, D = self.k.shape
        H = q.shape[1]
        G = H // Hkv
        pos_t = torch.as_tensor(pos, device=self.pos.device)
        self.write(k, v, pos_t)
        qg = split_heads_gqa(q, Hkv)  # [B, Hkv, G, D]
        logits = torch.matmul(qg, self.k.transpose(-1, -2)).float() * self.scale  # [B, Hkv, G, S]
        if bias_fn is not None:
            logits = logits + bias_fn(self.pos, pos_t).reshape(B, Hkv, G, S)
        empty = (self.pos < 0).unsqueeze(2)
        logits = logits.masked_fill(empty, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out = torch.matmul(probs.to(self.v.dtype), self.v).reshape(B, H, 1, D)
        with scoring_range():
            if self.kind == "window":
                rank = self.pos.float()  # evict the oldest
            else:
                tau = TAU_INIT + self.step * self.tau_delta
                f = probs if self.kind == "h2o" else self._score_probs(logits, tau)
                self.score += f.sum(dim=2)
                rank = self.score
            protected = (self.pos > pos_t - self.window) | (self.pos == PADDING)  # recent window, new token in it
            rank = rank.masked_fill(protected, float("inf")).masked_fill(self.pos == EMPTY, float("-inf"))
            self.free.copy_(rank.argmin(dim=-1, keepdim=True))
            self.step += 1
        return out


#: a context around an evicting cache's scoring and eviction (its own profiler range under measure.profile)
scoring_range = contextlib.nullcontext


def attended(context: int, sliding_window: int | None) -> int:
    """Tokens of a `context` that a model with a sliding window (Mistral: 4096) can attend to, as kfsim counts them
    (kfsim.ops.attended_tokens): a step attends the last `sliding_window` of them."""
    return min(context, sliding_window) if sliding_window else context


def make_cache(policy, batch, kv_heads, head_dim, context, kv_ratio, window, dtype, device, extra_slots=0,
               sliding_window=None, alibi_slopes=None):
    """The cache a policy needs for `context` tokens (steady state) plus `extra_slots` for generating beyond it.
    With a `sliding_window` the cache holds only the tokens the window reaches (a rolling cache: the same bytes a
    step reads), and a reducing policy's budget is capped at it. `alibi_slopes`: the heads' ALiBi slopes, for a
    full cache of an ALiBi model (reducing caches take the bias from the decoder's bias_fn)."""
    held = attended(context, sliding_window)
    if policy == "full" or kv_ratio >= 1:
        return FullCache(batch, kv_heads, held + 1 + extra_slots, head_dim, dtype, device, alibi_slopes)
    budget = min(max(1, math.ceil(kv_ratio * context - 1e-9)), held)
    return EvictingCache(policy, batch, kv_heads, budget, round(window * budget), head_dim, dtype, device)
