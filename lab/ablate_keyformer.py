"""Where Keyformer's fused attention spends its time over the full cache's at the same cached tokens: one layer's
step timed as bench_attention times it, for the full cache, for Keyformer, and for Keyformer with one part of its
work taken out of the kernels' source (the scores are then wrong: for timing only, never for a measurement of the
method). What each ablation saves, as a share of Keyformer's extra time, says which part to make cheaper.

Ablations (edits of measure/fused_attention.py's text; one that no longer matches the kernel fails, naming it):
  z_store   the split kernel does not write z (the finish kernel still reads the buffer)
  noise     z = logit / tau: no Gumbel noise (hash and two logs per element)
  partials  no running Gumbel max and sum per token lane
  extract   z from noise alone: the query-head rows are not picked out of the 16-row logits tile
  pos       the split kernel does not read the token positions (every slot counts as valid)
  scoring   the split kernel does none of Keyformer's per-token work (still reads positions)
  finish    the full cache's combine kernel instead of the finish kernel (no score update, no eviction pick)
  all       scoring + finish

Run on a GPU (repository root):
  python -m lab.ablate_keyformer --out ablate.csv [--models llama-3-8b] [--batch 16,64] [--tokens 3277,8192]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import itertools
import os
import sys
import tempfile

import torch

from .bench_attention import SHAPES, _ints, _words
from measure.l2_persist import l2_sizes, set_persisting_l2

_LANE = "            z = (xc + _noise(NOISE, seed, offs, lmask, USE_NOISE, FAST_LOG)) * inv_tau\n"
_STORE = "            tl.store(Z + offs, z, mask=lmask, eviction_policy=\"evict_last\")\n"
_UPDATE = ("            mz_new = tl.maximum(mz_lane, z)\n"
           "            lz_lane = lz_lane * tl.exp(mz_lane - mz_new) + tl.exp(z - mz_new)\n"
           "            mz_lane = mz_new\n")
_FINISH = ("            grid, args, meta, options = self.finish_launch(out, pos, score_buf, state, window)\n"
           "            _finish_kernel[grid](*args, **meta, **options)\n")
_COMBINE = ("            grid, args, meta, options = self.combine_launch(out)\n"
            "            _combine_kernel[grid](*args, **meta, **options)\n")

#: ablation -> (text, replacement) edits of fused_attention.py (the split kernel's loop, the finish launch)
EDITS = {
    "z_store": [(_LANE + _STORE, _LANE)],
    "noise": [(_LANE, "            z = xc * inv_tau\n")],
    "partials": [(_STORE + _UPDATE, _STORE)],
    "extract": [("            xc = tl.max(tl.reshape(x, [BLOCK_G // GP, GP, BLOCK_N]), 0)\n",
                 "            xc = tl.zeros([GP, BLOCK_N], tl.float32)\n")],
    "pos": [("            pos = tl.load(POS + kv_base + n, mask=nmask, other=-1)\n",
             "            pos = n.to(POS.dtype.element_ty)\n")],
    "scoring": [("        if SCORE:\n            # rows past G hold -inf",
                 "        if False:\n            # rows past G hold -inf")],
    "finish": [(_FINISH, _COMBINE)],
}
EDITS["all"] = EDITS["scoring"] + EDITS["finish"]


def ablated_source(source: str, ablation: str) -> str:
    """fused_attention's source with `ablation`'s edits; each edit's text must occur exactly once."""
    if ablation not in EDITS:
        raise ValueError(f"ablation {ablation!r}: expected {', '.join(EDITS)}")
    for old, new in EDITS[ablation]:
        if source.count(old) != 1:
            raise ValueError(f"ablation {ablation!r}: its edit matches {source.count(old)} places of "
                             f"fused_attention.py, not 1 (the kernel changed): {old.strip()[:60]!r}")
        source = source.replace(old, new)
    return source


@contextlib.contextmanager
def ablated_module(ablation: str | None, workdir: str):
    """measure.fused_attention replaced by its ablated copy while the block runs (None: the real one). The copy is
    a file, as Triton's JIT reads its kernels' source."""
    if ablation is None:
        yield
        return
    from measure import fused_attention

    path = os.path.join(workdir, f"fused_attention_{ablation}.py")
    with open(fused_attention.__file__) as f:
        text = ablated_source(f.read(), ablation)
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"measure._ablated_{ablation}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    real = sys.modules["measure.fused_attention"]
    sys.modules["measure.fused_attention"] = module
    try:
        yield
    finally:
        sys.modules["measure.fused_attention"] = real


def gap_shares(rows: list[dict]) -> list[dict]:
    """Per point and ablation: microseconds and the share of Keyformer's extra time over the full cache the
    ablation removes, (keyformer - ablated) / (keyformer - full)."""
    by_point: dict = {}
    for r in rows:
        key = (r["model"], int(r["batch"]), int(r["tokens"]), r.get("l2_persist") or "default")
        by_point.setdefault(key, {})[r["ablation"]] = float(r["us_per_layer"])
    out = []
    for key, t in sorted(by_point.items()):
        full, kf = t.get("full"), t.get("keyformer")
        for name, us in t.items():
            if name in ("full", "keyformer"):
                continue
            share = (kf - us) / (kf - full) if full is not None and kf is not None and kf > full else None
            out.append({"model": key[0], "batch": key[1], "tokens": key[2], "l2_persist": key[3], "ablation": name,
                        "us": us, "full_us": full, "keyformer_us": kf,
                        "gap_share": None if share is None else round(share, 3)})
    return out


def table(rows: list[dict]) -> str:
    shares = gap_shares(rows)
    names = list(dict.fromkeys(s["ablation"] for s in shares))
    lines = [f"{'model':10s} {'B':>3s} {'T':>5s} {'L2 set-aside':>12s} {'full':>7s} {'kf':>7s} | " +
             " ".join(f"{n:>15s}" for n in names)]
    points = list(dict.fromkeys((s["model"], s["batch"], s["tokens"], s["l2_persist"]) for s in shares))
    for p in points:
        cells = {s["ablation"]: s for s in shares if (s["model"], s["batch"], s["tokens"], s["l2_persist"]) == p}
        first = next(iter(cells.values()))
        line = (f"{p[0]:10s} {p[1]:3d} {p[2]:5d} {p[3]:>12s} {first['full_us']:7.1f} {first['keyformer_us']:7.1f} | ")
        line += " ".join(f"{c['us']:7.1f} ({c['gap_share']:+.2f})" if (c := cells.get(n)) and c["gap_share"] is not None
                         else f"{'':>15s}" for n in names)
        lines.append(line)
    lines.append("each cell: us per layer with the part taken out (share of Keyformer's extra time it removes)")
    return "\n".join(lines)


def _l2_settings(text: str) -> list[str]:
    """An argparse type: a comma list of 'default', 'off', 'on' or whole MiB."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or (bad := [w for w in words if w not in ("default", "off", "on") and not w.isdigit()]):
        raise argparse.ArgumentTypeError(f"{(bad or [text])[0]!r}: expected default, off, on or MiB (a whole number)")
    return words


def persisting_bytes(setting: str) -> int:
    """Apply an --l2-persist setting to this process's CUDA context; the set-aside in bytes it then has."""
    if setting == "default":
        return l2_sizes()["persisting_bytes"]
    return set_persisting_l2(0 if setting == "off" else None if setting == "on" else int(setting) << 20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV to write")
    ap.add_argument("--models", type=_words("models", tuple(s[0] for s in SHAPES)), default="llama-3-8b")
    ap.add_argument("--batch", type=_ints("batch"), default="16,64")
    ap.add_argument("--tokens", type=_ints("tokens"), default="3277,8192")
    ap.add_argument("--ablations", type=_words("ablations", tuple(EDITS)), default=",".join(EDITS))
    ap.add_argument("--l2-persist", type=_l2_settings, default="default",
                    help="the L2 set-aside for persisting lines (measure.l2_persist), where l2_hints' evict-last z "
                         "can stay: 'default' (as the driver set it), 'off' (none), 'on' (the device's maximum) or "
                         "MiB; a list, run in turn (default: %(default)s)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: ablate_keyformer needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from .bench_attention import time_layer
    from measure.env import environment
    from measure.nvml import Nvml

    nvml = Nvml()
    env = {**environment(nvml), "triton": triton.__version__}
    rows = []
    runs = [("full", None), ("keyformer", None)] + [("keyformer", n) for n in a.ablations]
    with torch.inference_mode(), tempfile.TemporaryDirectory() as work, open(a.out, "w", newline="") as f:
        writer = None
        for persist, (name, hkv, g, d) in itertools.product(a.l2_persist, [s for s in SHAPES if s[0] in a.models]):
            aside = persisting_bytes(persist)
            for batch in a.batch:
                for tokens in a.tokens:
                    for policy, ablation in runs:
                        with ablated_module(ablation, work):
                            t = time_layer(policy, batch, hkv, g, d, tokens, 0, 4)
                        clocks = nvml.state()
                        r = {"model": name, "batch": batch, "tokens": tokens, "policy": policy,
                             "ablation": ablation or policy, "l2_persist": persist, "l2_persist_bytes": aside, **t,
                             **{k: clocks.get(k) for k in ("sm_mhz", "mem_mhz", "power_w")}, **env}
                        rows.append(r)
                        if writer is None:
                            writer = csv.DictWriter(f, fieldnames=list(r))
                            writer.writeheader()
                        writer.writerow(r)
                        f.flush()
                        print(f"{name:10s} B={batch:<3d} T={tokens:<5d} L2 set-aside {aside >> 20} MiB "
                              f"{r['ablation']:9s} {t['us_per_layer']:8.1f} us", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
