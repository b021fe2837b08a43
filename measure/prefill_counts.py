"""What an eager transformers prefill does per attention score: its matrix FLOPs by precision and the bytes of
the scores it materialises.

A prompt of P tokens gives each sequence and query head a P x P square of scores. A model class's code decides
what they cost: SDPA with `is_causal` (Llama-3-8B) runs a fused kernel that skips the masked half and writes no
score; SDPA with an explicit mask (Mistral-7B's sliding window) computes the whole square and reads the mask;
GPT-J multiplies its queries and keys in fp32 (the vector units, not the tensor cores) and materialises fp32
scores, mask and softmax; MPT materialises its scores in 16 bits with an ALiBi bias. A Keyformer or H2O cache
adds its scorer's pass over every prompt query's logits. None of this depends on the GPU or the weights: it is
counted here on the CPU, from the FLOPs of every matrix product (and SDPA call) and the bytes of every
kernel-launching operation of one prefill, with one-layer models of each class whose heads have the real size,
at three prompt lengths and two head counts; the quadratic term, per score (sequence x query head x P^2) at
the model's own heads, is its count.

Columns: `tensor_flops` (16-bit matrix FLOPs per score, tensor cores), `fp32_flops` (fp32 matrix FLOPs per score,
vector units), `score_bytes` (bytes moved per score). Paths: `full`, and `keyformer` / `h2o` at kv-ratio 0.5
where measure.hf.KeyformerCache hooks the class.

    python -m measure.prefill_counts --out data/hf-prefill-counts/counts.csv
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from kfsim.workload import get_workload

from . import host_ops
from .kv_passes import SCORED_PATHS, SCORED_RATIO, ByteMeter

COLUMNS = ("model", "family", "path", "tensor_flops", "fp32_flops", "score_bytes", "transformers", "torch")
#: prompt lengths the quadratic is taken through (three points fix a + b P + c P^2 exactly)
SIZES = (128, 256, 512)
#: matrix products: FLOPs are 2 x output elements x the contracted length (the last dimension of this argument)
MATMULS = {"mm": 0, "bmm": 0, "matmul": 0, "linear": 0, "addmm": 1, "baddbmm": 1, "addbmm": 1}
SDPA_PREFIX = "_scaled_dot_product"


def matrix_flops(name: str, args, kwargs, out) -> tuple[float, torch.dtype | None]:
    """(FLOPs, dtype) of one matrix product or SDPA call, or (0, None) for any other op. An SDPA with
    `is_causal` and no mask skips the masked half of its square (flash kernels skip whole masked blocks); with a
    mask it computes every score."""
    kwargs = kwargs or {}
    if name == "einsum" and isinstance(out, torch.Tensor):  # 2 x output elements x the letters summed away
        inputs, output = args[0].replace(" ", "").split("->")
        sizes = {c: n for part, t in zip(inputs.split(","), args[1]) for c, n in zip(part, t.shape)}
        summed = np.prod([sizes[c] for c in set(sizes) - set(output)])
        return 2.0 * out.numel() * float(summed), args[1][0].dtype
    if name in MATMULS and isinstance(out, torch.Tensor):
        a = args[MATMULS[name]]
        return 2.0 * out.numel() * a.shape[-1], a.dtype
    if name == "scaled_dot_product_attention" or name.startswith(SDPA_PREFIX):
        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        share = 0.5 if causal and mask is None else 1.0
        return share * 2.0 * scores * (q.shape[-1] + v.shape[-1]), q.dtype
    return 0.0, None


class FlopMeter(ByteMeter):
    """ByteMeter that also adds up matrix FLOPs: 16-bit (tensor cores) and fp32 (vector units)."""

    def __init__(self):
        super().__init__()
        self.tensor_flops = self.fp32_flops = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        flops, dtype = matrix_flops(func.overloadpacket.__name__, args, kwargs, out)
        if dtype == torch.float32:
            self.fp32_flops += flops
        elif dtype is not None:
            self.tensor_flops += flops
        return out


def _prefill(name: str, prompt: int, path: str, widen: int) -> tuple[float, float, float, int]:
    """(16-bit FLOPs, fp32 FLOPs, bytes, query heads) of one prefill of a one-layer `name`, `widen` times the
    heads of host_ops.tiny's, over `prompt` tokens under `path` (full, or an evicting cache at kv-ratio
    SCORED_RATIO), batch 1."""
    import dataclasses
    from unittest import mock

    from . import hf, kv_policies
    from .campaign import Point
    from .hf_campaign import HfRunner

    w = host_ops.tiny(get_workload(name), 1, real_heads=True)
    heads, kv_heads = widen * w.n_heads, widen * w.n_kv_heads
    w = dataclasses.replace(w, n_heads=heads, n_kv_heads=kv_heads, d_model=heads * w.head_dim,
                            ffn_dim=4 * heads * w.head_dim)
    model = hf.build_model(w, 2 * prompt, device="cpu")
    if path != "full":
        hf.enable_keyformer(model)
    ratio = 1.0 if path == "full" else SCORED_RATIO
    step, _ = HfRunner.steps_only().prefill_step(model, w, Point(name, "prefill", 1, prompt, ratio, path), "cpu")
    meter = FlopMeter()
    with torch.inference_mode(), mock.patch.object(kv_policies, "scoring_range", meter.scoring):
        step()  # the first call builds what later calls reuse
        with meter:
            step()
    moved = meter.streamed + meter.strided + meter.scorer
    return meter.tensor_flops, meter.fp32_flops, float(moved), w.n_heads


def _square_terms(name: str, path: str, widen: int) -> tuple[np.ndarray, int]:
    """The P^2 coefficients of (16-bit FLOPs, fp32 FLOPs, bytes) of a prefill, and the query heads they are of."""
    runs = [_prefill(name, p, path, widen) for p in SIZES]
    square = np.vander(np.array(SIZES, dtype=float), 3)  # columns P^2, P, 1
    return np.linalg.solve(square, np.array([r[:3] for r in runs]))[0], runs[0][3]


def per_score(name: str, path: str = "full") -> dict[str, float]:
    """`name`'s count under `path`, per score at the model's own query heads: the P^2 terms are taken at two head
    counts, which splits the work per head (scores, softmax) from the work per sequence (a mask every head
    shares), as a tiny model's few heads would weigh the mask too much."""
    (c1, h1), (c2, h2) = _square_terms(name, path, 1), _square_terms(name, path, 2)
    per_head = (c2 - c1) / (h2 - h1)
    shared = c1 - per_head * h1
    score = per_head + shared / get_workload(name).n_heads
    return {k: max(0.0, float(v)) for k, v in zip(("tensor_flops", "fp32_flops", "score_bytes"), score)}


def paths(name: str) -> dict[str, dict[str, float]]:
    """Every path of `name`: full, and keyformer and h2o where measure.hf.KeyformerCache hooks its class."""
    from . import hf

    out = {"full": per_score(name)}
    if get_workload(name).family in hf.KEYFORMER_FAMILIES:
        out.update({p: per_score(name, p) for p in SCORED_PATHS})
    return out


def _rows(name: str):
    for path, count in paths(name).items():
        print(f"{name:20s} {path:10s} {count['tensor_flops']:8.1f} tensor FLOPs, {count['fp32_flops']:8.1f} fp32 "
              f"FLOPs, {count['score_bytes']:7.2f} bytes per score", file=sys.stderr)
        yield {"model": name, "family": get_workload(name).family, "path": path,
               **{k: round(v, 3) for k, v in count.items()}}


def main(argv=None) -> None:
    host_ops.write_counts(argv, __doc__, COLUMNS, _rows)


if __name__ == "__main__":
    main()
