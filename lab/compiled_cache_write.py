"""Does torch.compile write an evicting cache's new token in place? scatter_ (EvictingCache's write until this
trial) becomes, under inductor, an out-of-place scatter (a new copy of the whole keys and values, that attention
then reads) and a copy back into the cache; index_put_ at the same slots (EvictingCache.write's compiled path now)
stays in place. For each write and cache size: the whole-cache copies in the compiled graph and, on a GPU, the
compiled decode step's time (mode reduce-overhead, CUDA events, median of --steps after warm-up), one layer of
Llama-3-8B's attention shape by default.

Run (repository root): python -m lab.compiled_cache_write --out write.csv [--batch 16 --budgets 512,2048,8192]
"""
from __future__ import annotations

import argparse
import contextlib
import unittest.mock

import pandas as pd
import torch

from measure import timing
from measure.kv_policies import EvictingCache


class ScatterCache(EvictingCache):
    """The same cache, its new token written with scatter_ (which inductor turns into a copy of the whole cache)."""

    def write(self, k, v, pos: torch.Tensor) -> None:
        B, Hkv, _, D = self.k.shape
        idx = self.free.unsqueeze(-1).expand(B, Hkv, 1, D)
        self.k.scatter_(2, idx, k)
        self.v.scatter_(2, idx, v)
        self.pos.scatter_(2, self.free, pos.expand(B, Hkv, 1).to(self.pos.dtype))
        self.score.scatter_(2, self.free, 0.0)


WRITES = {"scatter_": ScatterCache, "index_put_": EvictingCache}


@contextlib.contextmanager
def whole_copies(numel: int, found: list[int]):
    """Count, in each graph compiled inside, the copy_ nodes left after inductor's reinplacing pass (the last say
    on what stays in place) that write `numel` elements (a whole K or V)."""
    from torch._inductor import config
    from torch._inductor.fx_passes import post_grad

    reinplace = post_grad.reinplace_inplaceable_ops

    def counted(updater, graph):
        reinplace(updater, graph)
        found.append(sum(1 for n in graph.nodes if n.target is torch.ops.aten.copy_.default
                         and n.args[0].meta["val"].numel() == numel))

    with config.patch(fx_graph_cache=False), unittest.mock.patch.object(post_grad, "reinplace_inplaceable_ops",
                                                                         counted):
        yield


def cache(write: str, batch: int, kv_heads: int, budget: int, head_dim: int, device: str) -> EvictingCache:
    """A full cache of `budget` kept tokens (every slot holding a token), its tensors marked static."""
    c = WRITES[write]("keyformer", batch, kv_heads, budget, budget // 4, head_dim, torch.bfloat16, device)
    slots = c.pos.shape[-1]
    c.pos.copy_(torch.arange(slots, device=device).expand_as(c.pos))
    c.k.normal_()
    c.v.normal_()
    c.scale = head_dim ** -0.5
    c.noise = torch.zeros_like  # the same evictions for both writes
    for t in (c.k, c.v, c.pos, c.score, c.free, c.step):
        torch._dynamo.mark_static_address(t)
    return c


def run(write: str, batch: int, heads: int, kv_heads: int, head_dim: int, budget: int, steps: int,
        device: str) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)  # the same cache and token for each write
    c = cache(write, batch, kv_heads, budget, head_dim, device)
    q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(batch, kv_heads, 1, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor(c.pos.shape[-1], device=device)
    mode = "reduce-overhead" if device == "cuda" else None
    step = torch.compile(lambda: c.decode(q, k, v, pos), mode=mode, fullgraph=True)
    found: list[int] = []
    with torch.inference_mode(), whole_copies(c.k.numel(), found):
        t = timing.time_steps(step, steps=steps, warmup=5)
        out = step().float()
    return {"write": write, "batch": batch, "kv_heads": kv_heads, "head_dim": head_dim, "budget": budget,
            "whole_copies": sum(found), "step_us": round(t.median_ms * 1e3, 1) if device == "cuda" else None,
            "kv_mb": round(2 * c.k.numel() * c.k.element_size() / 1e6, 1), "out_sum": float(out.sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budgets", default="512,2048,8192", help="kept tokens per sequence, comma-separated")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [run(w, args.batch, args.heads, args.kv_heads, args.head_dim, int(b), args.steps, args.device)
            for b in args.budgets.split(",") for w in WRITES]
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print(df.drop(columns="out_sum").to_string(index=False))
    return df


if __name__ == "__main__":
    main()
