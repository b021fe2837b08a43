"""The fused decode-attention kernels alone: one layer's step for the full cache and for Keyformer at the same number
of cached tokens, for each kernel configuration (tokens per block, warps per program), as achieved bandwidth of the
K and V bytes against the HBM read ceiling. This is how the configuration `fused_attention` uses was chosen
(--configs, --programs-per-sm); the kernel options it was compared with before they became its only path are in
docs/fused-decoder.md and git history.

Each timing replays a CUDA graph of many layers' kernels over separate caches (far more than the 50 MB L2 holds),
so every layer reads its K and V from HBM, as in a real step. Run on a GPU (repository root):
  python -m lab.bench_attention --out attention.csv [--ceiling-gbps 3079]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys

import torch

from kfsim.errors import KfsimError
from kfsim.values import parse_list

from measure import timing
from measure.kv_policies import EvictingCache, FullCache

#: (name, KV heads, query heads per KV head, head dim): GPT-J-6B and Llama-3-8B (workloads/*.yaml)
SHAPES = (("gpt-j-6b", 16, 1, 256), ("llama-3-8b", 8, 4, 128))
CONFIGS = tuple(itertools.product((16, 32, 64), (4, 8), (3,)))  # (block_n, num_warps, num_stages) by default
IN_FLIGHT_BYTES = 400e6  # K and V bytes the graph's layers read in all: 8x the L2


def _caches(policy, batch, kv_heads, head_dim, tokens, layers, kernel):
    from measure.fused_attention import FusedFullCache, FusedKeyformerCache, StepState  # needs triton

    if policy == "full":
        out = []
        for _ in range(layers):
            c = FullCache(batch, kv_heads, tokens + 1, head_dim, torch.bfloat16, "cuda")
            c.fill_random(tokens)
            out.append(FusedFullCache(c, kernel=kernel))
        return out
    state = StepState("cuda")
    out = []
    for i in range(layers):
        c = EvictingCache("keyformer", batch, kv_heads, tokens, max(1, int(0.3 * tokens)), head_dim,
                          torch.bfloat16, "cuda")
        c.fill_random(tokens * 5)
        out.append(FusedKeyformerCache(c, state=state, first=i == 0, last=i == layers - 1, kernel=kernel))
    return out


def time_layer(policy, batch, kv_heads, g, head_dim, tokens, block_n, num_warps, num_stages=3, maxnreg=None,
               steps=20, options=None) -> dict:
    """Microseconds per layer and K+V GB/s of one configuration (and the split kernel's registers, spills, shared
    memory and splits); `options`: more FusedDecoder keywords."""
    kv_bytes = 2 * batch * kv_heads * (tokens + 1) * head_dim * 2
    layers = int(max(4, min(96, IN_FLIGHT_BYTES // kv_bytes)))
    caches = _caches(policy, batch, kv_heads, head_dim, tokens, layers,
                     {"block_n": block_n, "num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg,
                      **(options or {})})
    q = torch.randn(batch, kv_heads * g, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(batch, kv_heads, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    pos = torch.tensor(tokens * 5, device="cuda")

    def step():
        for c in caches:
            c.decode(q, k, v, pos)

    graph = timing.capture_graph(step)
    t = timing.time_steps(graph.replay, steps, 3)
    us = t.median_ms * 1e3 / layers
    handle, nsplit = caches[0].fused.split_handle, caches[0].fused.NSPLIT
    del caches, graph
    torch.cuda.empty_cache()
    return {"us_per_layer": round(us, 2), "kv_gbps": round(kv_bytes / (us * 1e-6) / 1e9, 1),
            "regs": getattr(handle, "n_regs", ""), "spills": getattr(handle, "n_spills", ""),
            "shared_bytes": getattr(getattr(handle, "metadata", None), "shared", ""), "splits": nsplit,
            "layers": layers}


def parse_config(text: str) -> tuple:
    """'BLOCK_NxWARPSxSTAGES[rMAXNREG]' (or 'default': the block fused_attention picks for the head dim, 4 warps,
    3 stages, no register cap) -> (block_n, num_warps, num_stages, maxnreg); block_n 0 means the default."""
    if text == "default":
        return 0, 4, 3, None
    try:
        body, _, cap = text.partition("r")
        block_n, warps, stages = (int(v) for v in body.split("x"))
        return block_n, warps, stages, int(cap) if cap else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"config {text!r}: expected BLOCK_NxWARPSxSTAGES[rMAXNREG] (e.g. 32x4x3, "
                                         f"64x4x3r168) or 'default'") from None


def _configs(text: str) -> list[tuple]:
    return [parse_config(c) for c in text.split(",")]


def _ints(flag: str):
    """An argparse type: kfsim's list parser (1,8,32 or start:stop:step), whole numbers >= 1."""
    def parse(text: str) -> list[int]:
        try:
            return parse_list(text, flag, int, lo=1)
        except KfsimError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _words(flag: str, allowed: tuple):
    """An argparse type: a comma list of words from `allowed`."""
    def parse(text: str) -> list[str]:
        words = parse_list(text, flag, str)
        if bad := [w for w in words if w not in allowed]:
            raise argparse.ArgumentTypeError(f"{bad[0]!r}: expected {' or '.join(allowed)}")
        return words
    return parse


def _append(path: str, row: dict, first: bool) -> None:
    """Write `row` to the CSV at `path`, the header and a fresh file with the first row."""
    with open(path, "w" if first else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if first:
            w.writeheader()
        w.writerow(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV to write")
    ap.add_argument("--models", type=_words("models", tuple(s[0] for s in SHAPES)),
                    default=",".join(s[0] for s in SHAPES), help="model shapes, a list (default: %(default)s)")
    ap.add_argument("--batch", type=_ints("batch"), default="1,16,64")
    ap.add_argument("--tokens", type=_ints("tokens"), default="205,820,3277", help="cached tokens (the full cache's context, "
                    "Keyformer's budget)")
    ap.add_argument("--configs", type=_configs, default=",".join(f"{b}x{w}x{s}" for b, w, s in CONFIGS),
                    help="BLOCK_NxWARPSxSTAGES list, or 'default' for the shipped choice (default: %(default)s)")
    ap.add_argument("--programs-per-sm", type=_ints("programs-per-sm"), default=None,
                    help="programs per SM the split aims at, a list (default: fused_attention's PROGRAMS_PER_SM, "
                         "FEW_ROWS_PER_SM where the rows are fewer than the SMs)")
    ap.add_argument("--ceiling-gbps", type=float, default=0.0, help="HBM read ceiling, for the fraction column")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: bench_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from triton.runtime.errors import OutOfResources

    from measure import fused_attention  # needs triton
    from measure.env import environment
    from measure.nvml import Nvml

    nvml = Nvml()
    env = {**environment(nvml), "triton": triton.__version__}

    rows = []
    with torch.inference_mode():
        shapes = [shape for shape in SHAPES if shape[0] in a.models]
        for (name, hkv, g, d), batch, tokens in itertools.product(shapes, a.batch, a.tokens):
            for policy in ("full", "keyformer"):
                best, line = None, []
                for (block_n, warps, stages, maxnreg), per_sm in itertools.product(a.configs,
                                                                                   a.programs_per_sm or [None]):
                    if per_sm is not None:  # both rules at this count
                        fused_attention.PROGRAMS_PER_SM = fused_attention.FEW_ROWS_PER_SM = per_sm
                    try:
                        timed = time_layer(policy, batch, hkv, g, d, tokens, block_n, warps, stages, maxnreg)
                    except KfsimError as exc:  # a shape the kernel does not take (fused_attention.INT32_MAX)
                        print(f"{name:10s} B={batch:<3d} T={tokens:<5d} {policy:9s} skipped: {exc}", flush=True)
                        break
                    except OutOfResources as exc:  # a configuration whose blocks do not fit an SM: the next one
                        print(f"{name:10s} B={batch:<3d} T={tokens:<5d} {policy:9s} {block_n}x{warps}x{stages}: "
                              f"{type(exc).__name__}", flush=True)
                        continue
                    r = {"model": name, "batch": batch, "tokens": tokens, "policy": policy, "block_n": block_n,
                         "num_warps": warps, "num_stages": stages, "maxnreg": maxnreg or "",
                         "programs_per_sm": per_sm or "", **timed}
                    if a.ceiling_gbps:
                        r["fraction"] = round(r["kv_gbps"] / a.ceiling_gbps, 3)
                    clocks = nvml.state()  # just after the timed replays
                    r.update({k: clocks.get(k) for k in ("sm_mhz", "mem_mhz", "power_w")}, **env)
                    rows.append(r)
                    _append(a.out, r, first=len(rows) == 1)  # row by row: a run cut off keeps what it timed
                    best = r if best is None or r["us_per_layer"] < best["us_per_layer"] else best
                    cap = f"r{maxnreg}" if maxnreg else ""
                    line.append(f"{block_n}x{warps}x{stages}{cap}{'p' + str(per_sm) if per_sm else ''}/"
                                f"{r['splits']} {r['us_per_layer']:.1f}/{r['regs']}/{r['spills']}/{r['shared_bytes']}")
                if best is not None:
                    print(f"{name:10s} B={batch:<3d} T={tokens:<5d} {policy:9s} best {best['kv_gbps']:5.0f} GB/s | "
                          f"[config/splits us/regs/spills/smem]: {'  '.join(line)}", flush=True)
    if not rows:
        print("Error: nothing ran (every shape was skipped)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
