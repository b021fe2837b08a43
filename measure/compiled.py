"""The `compiled` engine: the decoder's small ops fused by torch.compile, attention by the split-K Triton kernels.

Each layer's work outside attention is two functions of plain tensors (norm + QKV + rotary before attention;
output projection + residual + norm + MLP after it), compiled once per shape and reused by every layer, so the
32 layers cost one compilation rather than 32. The whole step is then replayed from a CUDA graph (campaign.py),
as pytorch-labs' gpt-fast does, leaving GEMMs, a few fused elementwise kernels and the attention kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decoder import Decoder
from .kv_policies import EvictingCache, FullCache

torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def fuse_caches(caches: list, split_tokens: int | None = None, slopes=None, kernel: dict | None = None) -> list:
    """Wrap full and Keyformer caches so that their attention runs in the fused kernels (others stay plain).
    `slopes`: an ALiBi model's slopes per query head, which the kernels add (its full caches are then made
    without alibi_slopes: the kernel reads head-wide rows); `kernel`: more FusedDecoder keywords (tests)."""
    from .fused_attention import FusedFullCache, FusedKeyformerCache, StepState  # needs triton

    out = []
    state = StepState(caches[0].k.device) if caches else None
    for i, c in enumerate(caches):
        if isinstance(c, FullCache):
            out.append(FusedFullCache(c, split_tokens, kernel=kernel, slopes=slopes))
        elif isinstance(c, EvictingCache) and c.kind == "keyformer":
            out.append(FusedKeyformerCache(c, split_tokens, state, first=i == 0, last=i == len(caches) - 1,
                                           kernel=kernel, slopes=slopes))
        else:
            out.append(c)
    return out


def _norm(x, w, b, rms: bool):
    if rms:
        return F.rms_norm(x, (x.shape[-1],), w, 1e-5)
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _rotate(x, cos, sin, dim: int, interleaved: bool):
    rot, rest = x[..., :dim], x[..., dim:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    else:
        a, b = rot.chunk(2, dim=-1)
        rot = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return torch.cat((rot, rest), dim=-1)


def gemv_supported(model: Decoder) -> bool:
    """Whether batch-1 steps can run on measure.gemv: a CUDA model and Triton present (no SwiGLU bias: none of
    the workloads has one, and the gated kernel adds none)."""
    w = model.w
    if model.lm_head.weight.device.type != "cuda" or (w.ffn_type == "swiglu" and w.mlp_bias):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _product(x, w, **kw):
    """One fused product of the rows of x [M, K] -> [M, N]: measure.gemv for one row (flat vectors), else
    measure.gemm_small."""
    if x.shape[0] == 1:
        from .gemv import gemv

        flat = {k: v.reshape(-1) if k in ("x2", "residual") and v is not None else v for k, v in kw.items()}
        return gemv(x.reshape(-1), w, **flat).view(1, -1)
    from .gemm_small import small_gemm

    return small_gemm(x, w, **kw)


def _kernel_rotary(model, cos, sin):
    """The new token's rotary as the fused attention kernels take it (cos, sin, dim, interleaved), or None."""
    if cos is None:
        return None
    return cos.reshape(-1), sin.reshape(-1), model.rotary.dim, model.rotary.interleaved


def _qkv_slices(qkv, w):
    """q, k, v [B, heads, 1, D] as column slices of the QKV product [B, q + 2 kv], without a copy (the fused kernels
    take their row stride)."""
    B = qkv.shape[0]
    return (t.view(B, -1, 1, w.head_dim) for t in qkv.split([w.q_dim, w.kv_dim, w.kv_dim], dim=1))


#: The CUDA context's L2 set-aside for persisting lines (measure.l2_persist), in MiB: the fused kernels write
#: Keyformer's z evict-last, which keeps it in L2 only inside the set-aside. 24 MiB: on the H200 (60 MiB of L2)
#: z then stays in L2 where it fits (Llama-3-8B batch 16 x 8192 tokens: 156.5 -> 145.4 us per layer) and the full
#: cache runs as fast as with the driver's default (11.25 MiB); at 37.5 MiB (the most it allows) the kernels ran
#: 7-28 % slower (lab/data/l2/h200-l2-sweep-llama.csv)
L2_PERSIST_MIB = 24


class CompiledDecoder:
    """decode(tokens, pos, caches) like Decoder.decode, with the per-layer glue compiled; a batch-1 step runs on
    the fused matrix-vector kernels of measure.gemv instead (`batch1_gemv`), a step of 2-16 sequences
    (SMALL_GEMM_ROWS) on the fused products of measure.gemm_small (`small_gemm`), each by default where supported.
    Every step hands q, k and v to a fused attention cache as column slices of the QKV product and lets its kernel
    rotate them (no rotary or copy kernels)."""

    def __init__(self, model: Decoder, compile: bool = True, batch1_gemv: bool | None = None,
                 small_gemm: bool | None = None, l2_persist_mib: int | None = L2_PERSIST_MIB):
        w = model.w
        if l2_persist_mib is not None and next(model.parameters()).is_cuda:
            from .l2_persist import set_persisting_l2

            set_persisting_l2(l2_persist_mib << 20)
        self.model, self.w = model, w
        rms = w.norm == "rmsnorm"
        rotary = model.rotary
        dims = (w.q_dim, w.kv_dim, w.kv_dim)
        B_heads = (w.n_heads, w.n_kv_heads, w.head_dim)

        def heads(qkv, cos, sin):
            """[B, 1, q + 2 kv] projections -> rotated q [B, H, 1, D], k and v [B, HKV, 1, D], contiguous."""
            B = qkv.shape[0]
            q, k, v = qkv.split(dims, dim=-1)
            q = q.view(B, 1, B_heads[0], B_heads[2]).transpose(1, 2)
            k = k.view(B, 1, B_heads[1], B_heads[2]).transpose(1, 2)
            v = v.view(B, 1, B_heads[1], B_heads[2]).transpose(1, 2)
            if rotary is not None:
                q = _rotate(q, cos, sin, rotary.dim, rotary.interleaved)
                k = _rotate(k, cos, sin, rotary.dim, rotary.interleaved)
            return q.contiguous(), k.contiguous(), v.contiguous()

        def pre(x, nw, nb, wqkv, bqkv, cos, sin):
            h = _norm(x, nw, nb, rms)
            return (h, *heads(F.linear(h, wqkv, bqkv), cos, sin))

        def pre_qkv(x, nw, nb, wqkv, bqkv):
            """pre without the heads: the projections [B, q + 2 kv] for an attention kernel that rotates itself."""
            h = _norm(x, nw, nb, rms)
            return h, F.linear(h, wqkv, bqkv).reshape(x.shape[0], -1)

        swiglu = w.ffn_type == "swiglu"

        def mlp(h, wu, bu, wd, bd):
            u = F.linear(h, wu, bu)
            if swiglu:
                g, u = u.chunk(2, dim=-1)
                u = F.silu(g) * u
            else:
                u = F.gelu(u, approximate="tanh")
            return F.linear(u, wd, bd)

        parallel = w.parallel_residual

        def post(x, h, y, wo, bo, n2w, n2b, wu, bu, wd, bd):
            B = x.shape[0]
            a = F.linear(y.transpose(1, 2).reshape(B, 1, -1), wo, bo)
            if parallel:
                return x + a + mlp(h, wu, bu, wd, bd)
            x = x + a
            return x + mlp(_norm(x, n2w, n2b, rms), wu, bu, wd, bd)

        def head(x, nw, nb, wl, bl):
            return F.linear(_norm(x, nw, nb, rms), wl, bl)[:, 0]

        fns = (pre, post, head, heads, pre_qkv)
        self.pre, self.post, self.head, self.heads, self.pre_qkv = (
            (torch.compile(f, dynamic=False) for f in fns) if compile else fns)
        self.gemv = batch1_gemv if batch1_gemv is not None else gemv_supported(model)
        self.small_gemm = (small_gemm is not False) and self.gemv and _tiles_small_gemm(w)
        self._consts = {}
        if self.gemv:
            self._fold_norms()

    def _fold_norms(self):
        """Fold every norm's scale and shift into the products after it (measure.gemv.fold_norm), so the batch-1
        kernels apply a bare norm to their sums; the model computes the same function (batch > 1 too)."""
        from .gemv import fold_norm

        m = self.model
        for block in m.blocks:
            n1, n2, mlp = block.norm1, block.norm2, block.mlp
            fold_norm(n1.weight, getattr(n1, "bias", None), [block.attn.qkv] + ([mlp.up] if n2 is None else []))
            if n2 is not None:
                fold_norm(n2.weight, getattr(n2, "bias", None), [mlp.up])
        self.fold_head = m.lm_head.weight is not m.embed.weight  # a tied head is the embedding: not folded
        if self.fold_head:
            fold_norm(m.norm.weight, getattr(m.norm, "bias", None), [m.lm_head])

    def _layer_consts(self, i, block):
        """Built once per layer: GPT-J's stacked biases ([qkv | up], out + down) and, for layernorm models, the
        fp32 row sums of each normed product's (folded) weights."""
        if i not in self._consts:
            a, mlp = block.attn, block.mlp
            ln = self.w.norm != "rmsnorm"
            sums = lambda *ws: torch.cat([x.sum(1, dtype=torch.float32) for x in ws]) if ln else None  # noqa: E731
            zeros = lambda n: torch.zeros(n, dtype=mlp.up.weight.dtype, device=mlp.up.weight.device)  # noqa: E731
            c = {}
            if self.w.parallel_residual:
                c["first"] = c["second"] = None
                if a.qkv.bias is not None or mlp.up.bias is not None:
                    c["first"] = torch.cat([a.qkv.bias if a.qkv.bias is not None else zeros(a.qkv.out_features),
                                            mlp.up.bias if mlp.up.bias is not None else zeros(mlp.up.out_features)])
                if a.out.bias is not None or mlp.down.bias is not None:
                    c["second"] = sum(b for b in (a.out.bias, mlp.down.bias) if b is not None)
                c["first_sums"] = sums(a.qkv.weight, mlp.up.weight)
            else:
                c["qkv_sums"], c["up_sums"] = sums(a.qkv.weight), sums(mlp.up.weight)
            self._consts[i] = c
        return self._consts[i]

    def decode(self, tokens, pos, caches):
        B = tokens.shape[0]
        if (self.gemv and B == 1) or (self.small_gemm and B <= SMALL_GEMM_ROWS):
            return self.decode_fused(tokens, pos, caches)
        m, w = self.model, self.w
        positions = torch.as_tensor(pos, device=tokens.device).reshape(1)
        x = m._embed(tokens[:, None], positions)
        cos = sin = None
        if m.rotary is not None:
            cos, sin = m.rotary.cos[positions].to(x.dtype), m.rotary.sin[positions].to(x.dtype)
        rotary = _kernel_rotary(m, cos, sin)
        for block, cache in zip(m.blocks, caches):
            a = block.attn
            n1 = (block.norm1.weight, getattr(block.norm1, "bias", None), a.qkv.weight, a.qkv.bias)
            if getattr(cache, "rotates", False):  # a fused cache: rotary (if any) in its kernel
                h, qkv = self.pre_qkv(x, *n1)
                y = cache.decode(*_qkv_slices(qkv, w), pos, a.bias_fn if w.position == "alibi" else None,
                                 rotary=rotary)
            else:
                h, q, k, v = self.pre(x, *n1, cos, sin)
                y = cache.decode(q, k, v, pos, a.bias_fn if w.position == "alibi" else None)
            n2 = block.norm2
            x = self.post(x, h, y, a.out.weight, a.out.bias, None if n2 is None else n2.weight,
                          None if n2 is None else getattr(n2, "bias", None), block.mlp.up.weight, block.mlp.up.bias,
                          block.mlp.down.weight, block.mlp.down.bias)
        return self.head(x, m.norm.weight, getattr(m.norm, "bias", None), m.lm_head.weight, m.lm_head.bias)

    def decode_fused(self, tokens, pos, caches):
        """A step on the fused products (measure.gemv for one sequence, measure.gemm_small for up to
        SMALL_GEMM_ROWS): per layer, norm + products + bias + activation + residual in two kernels (GPT-J's parallel
        attention and MLP) or four (sequential layers), plus attention (which applies rotary itself on the fused
        caches; otherwise a kernel of its own before it). Activations are [B, width] rows throughout."""
        m, w = self.model, self.w
        B = tokens.shape[0]
        norm = "rmsnorm" if w.norm == "rmsnorm" else "layernorm"
        positions = torch.as_tensor(pos, device=tokens.device).reshape(1)
        x = m._embed(tokens[:, None], positions).reshape(B, -1)
        cos = sin = None
        if m.rotary is not None:
            cos, sin = m.rotary.cos[positions].to(x.dtype), m.rotary.sin[positions].to(x.dtype)
        qkv_rows = w.q_dim + 2 * w.kv_dim
        rotary = _kernel_rotary(m, cos, sin)
        for i, (block, cache) in enumerate(zip(m.blocks, caches)):
            a, mlp = block.attn, block.mlp
            c = self._layer_consts(i, block)
            if w.parallel_residual:
                hu = _product(x, a.qkv.weight, w2=mlp.up.weight, stack="rows", bias=c["first"], act="gelu_tanh",
                              act_from=qkv_rows, norm=norm, row_sums=c["first_sums"])
                qkv, u = hu[:, :qkv_rows], hu[:, qkv_rows:]
            else:
                qkv = _product(x, a.qkv.weight, bias=a.qkv.bias, norm=norm, row_sums=c["qkv_sums"])
            if getattr(cache, "rotates", False):  # the attention kernel applies rotary (if any)
                # column slices of the products, handed over without a copy (the kernel takes their row stride)
                y = cache.decode(*_qkv_slices(qkv, w), pos, a.bias_fn if w.position == "alibi" else None,
                                 rotary=rotary).reshape(B, -1)
            else:
                q, k, v = self.heads(qkv.reshape(B, 1, -1), cos, sin)
                y = cache.decode(q, k, v, pos, a.bias_fn if w.position == "alibi" else None).reshape(B, -1)
            if w.parallel_residual:
                x = _product(y, a.out.weight, w2=mlp.down.weight, x2=u, stack="cols", bias=c["second"], residual=x)
                continue
            x = _product(y, a.out.weight, bias=a.out.bias, residual=x)
            if w.ffn_type == "swiglu":
                h = _product(x, mlp.up.weight, stack="glu", norm=norm, row_sums=c["up_sums"])
            else:
                h = _product(x, mlp.up.weight, bias=mlp.up.bias, act="gelu_tanh", norm=norm, row_sums=c["up_sums"])
            x = _product(h, mlp.down.weight, bias=mlp.down.bias, residual=x)
        fn = m.norm
        if self.fold_head:
            if "head" not in self._consts:
                self._consts["head"] = m.lm_head.weight.sum(1, dtype=torch.float32) if norm == "layernorm" else None
            return _product(x, m.lm_head.weight, bias=m.lm_head.bias, norm=norm, row_sums=self._consts["head"])
        if B == 1:  # a tied head (the embedding) keeps its norm's scale and shift: gemv applies them per chunk
            return _product(x, m.lm_head.weight, bias=m.lm_head.bias, norm=norm, norm_weight=fn.weight,
                            norm_bias=getattr(fn, "bias", None))
        return _product(_norm(x, fn.weight, getattr(fn, "bias", None), norm == "rmsnorm"), m.lm_head.weight,
                        bias=m.lm_head.bias)


#: the most sequences the decoder runs on measure.gemm_small: at 16 its fused products matched cuBLAS's products
#: (glue not counted) on the H200, at 64 they were up to 1.4x slower (lab/data/gemm/h200-gemm-small-fused.txt)
SMALL_GEMM_ROWS = 16


def _tiles_small_gemm(w) -> bool:
    """Whether measure.gemm_small's blocks (32 output rows, inputs in multiples of 128) fit every product (the
    MLP's up product has ffn_dim output rows, SwiGLU's gated rows too)."""
    rows = (w.q_dim + 2 * w.kv_dim, w.d_model, w.ffn_dim, w.vocab_size)
    return all(n % 32 == 0 for n in rows) and all(k % 128 == 0 for k in (w.d_model, w.q_dim, w.ffn_dim))
