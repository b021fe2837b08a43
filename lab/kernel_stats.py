"""What the fused attention's split kernel costs the GPU before it runs: registers, spills, shared memory, how many
programs fit on one SM at a time, and the machine instructions of its K/V loop per cached token (with and without
ALiBi). Triton compiles the kernel for the target architecture (sm_90 by default: H100 and H200) on any machine,
GPU or not, and cuobjdump (shipped with Triton) lists the SASS; so a change can be checked for what it does to
the inner loop without a GPU. Times still come from bench_attention.

  python -m lab.kernel_stats --out kernel-stats.csv [--alibi off,on] [--arch 90]
"""
from __future__ import annotations

import argparse
import collections
import csv
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch

from .bench_attention import SHAPES, _ints, _words
from measure.kernel_options import KERNEL_FEATURES


# Per-SM limits of compute capability 9.0 (H100, H200): CUDA C++ Programming Guide, "Features and Technical
# Specifications", table "Technical Specifications per Compute Capability" (CUDA 12/13).
SM90_LIMITS = {"registers": 65536, "shared_bytes": 233472, "shared_per_block_reserved": 1024, "blocks": 32,
               "warps": 64, "register_granularity": 256}

#: SASS opcodes by what they do, for the loop's instruction mix (the rest count as "other": integer and address
#: arithmetic, compares, moves)
CLASSES = {
    "global": ("LDG", "LDGSTS", "STG", "LDGDEPBAR", "DEPBAR", "ATOMG", "RED"),
    "shared": ("LDS", "STS", "LDSM", "STSM"),
    "barrier": ("BAR",),
    "tensor": ("HMMA",),
    "special": ("MUFU",),
    "float": ("FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "F2FP", "I2FP", "F2I", "FCHK"),
    "select": ("SEL", "PRMT"),
    "shuffle": ("SHFL",),
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}


def _signature(args) -> tuple[dict, dict]:
    """Triton types of the runtime arguments, and the divisibility Triton's JIT would have seen: 16-byte aligned
    tensors (torch's allocations) and integers that are multiples of 16."""
    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64",
             torch.int32: "*i32"}
    sig, aligned = [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            sig.append(types[a.dtype])
            aligned.append(i)
        elif isinstance(a, int):
            sig.append("i32")
            if a % 16 == 0:
                aligned.append(i)
        else:
            sig.append("fp32")
    return sig, aligned


def _step(policy: str, heads: int, kv_heads: int, head_dim: int, tokens: int, batch: int, sms: int,
          alibi: bool = False):
    """A CPU FusedDecoder of one layer sized as bench_attention's (`tokens` cached, the cache split for `batch` x
    `kv_heads` rows on `sms` SMs; ALiBi slopes if `alibi`) and the tensors of its step: (decoder, split_launch's
    keywords)."""
    from measure.fused_attention import FusedDecoder, StepState, _blocks, split_length
    from measure.kv_policies import SLOT_ALIGN

    score = policy == "keyformer"
    slots = -(-(tokens + 1) // SLOT_ALIGN) * SLOT_ALIGN if score else tokens + 1
    split = split_length(slots, batch * kv_heads, _blocks(head_dim), sms)  # sized here, for `sms`
    dec = FusedDecoder(1, heads, kv_heads, slots, head_dim, "cpu", split_tokens=split, scoring=score,
                       slopes=torch.ones(heads) if alibi else None)
    bf16 = dict(dtype=torch.bfloat16)
    cache = torch.empty(1, kv_heads, slots, head_dim, **bf16)
    step = dict(q=torch.empty(1, heads, head_dim, **bf16), k_new=torch.empty(1, kv_heads, head_dim, **bf16),
                v_new=torch.empty(1, kv_heads, head_dim, **bf16), k_cache=cache, v_cache=cache, n_valid=slots,
                out=torch.empty(1, heads, head_dim, **bf16))
    if score:  # bench_attention's window (kv_policies' default share of the budget)
        step.update(pos=torch.empty(1, kv_heads, slots, dtype=torch.int32),
                    score_buf=torch.empty(1, kv_heads, slots, dtype=torch.float32), state=StepState("cpu"),
                    window=max(1, int(0.3 * tokens)))
    return dec, step


def aot_compile(fn, args, meta: dict, options: dict, arch: int = 90):
    """Compile the jit kernel `fn` for sm_`arch` from its launch (runtime arguments, constants, options), as
    Triton's JIT would on the GPU, but without one."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    sig, aligned = _signature(args)
    signature = dict(zip(names, sig + ["constexpr"] * len(meta)))
    constexprs = {(names.index(k),): v for k, v in meta.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    options = {k: v for k, v in options.items() if v is not None}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _gpu_split_launch(dec, step) -> tuple:
    """split_launch's (arguments, constants, options) as on a GPU: the noise's logs on the special-function unit
    (a CPU decoder turns them off for Triton's interpreter)."""
    _, args, meta, opts = dec.split_launch(**step)
    return args, {**meta, "FAST_LOG": True}, opts


def compile_split_kernel(policy: str, heads: int, kv_heads: int, head_dim: int, tokens: int, batch: int,
                         sms: int = 132, arch: int = 90, alibi: bool = False):
    """The split kernel of one layer's step, as bench_attention launches it, compiled for sm_`arch`; and its
    compile-time constants."""
    from measure.fused_attention import _split_kernel

    args, meta, opts = _gpu_split_launch(*_step(policy, heads, kv_heads, head_dim, tokens, batch, sms, alibi))
    return aot_compile(_split_kernel, args, meta, opts, arch), meta


def compile_step(policy: str, heads: int, kv_heads: int, head_dim: int, tokens: int, batch: int, sms: int = 132,
                 arch: int = 90, alibi: bool = False) -> dict:
    """Every kernel one layer's step launches ({"split", and "combine" or "finish" where the cache is split}),
    compiled for sm_`arch`."""
    from measure.fused_attention import _combine_kernel, _finish_kernel, _split_kernel

    dec, step = _step(policy, heads, kv_heads, head_dim, tokens, batch, sms, alibi)
    out = {"split": aot_compile(_split_kernel, *_gpu_split_launch(dec, step), arch)}
    if dec.NSPLIT > 1 and policy == "keyformer":
        launch = dec.finish_launch(step["out"], step["pos"], step["score_buf"], step["state"], step["window"])
        out["finish"] = aot_compile(_finish_kernel, *launch[1:], arch)
    elif dec.NSPLIT > 1:
        out["combine"] = aot_compile(_combine_kernel, *dec.combine_launch(step["out"])[1:], arch)
    return out


def _tool(name: str) -> str:
    """A CUDA binary utility: Triton's own copy (the version its ptxas matches), else the PATH's."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else name


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([_tool("cuobjdump"), flag, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def loop_instructions(sass: str) -> list[str]:
    """The opcodes of the kernel's main loop: the instructions the longest backward branch jumps over."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    best = None
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    if best is None:
        return []
    ops = []
    for addr, text in ins:
        if best[0] <= addr <= best[1]:
            words = text.split()
            ops.append((words[1] if words[0].startswith("@") else words[0]).split(".")[0])
    return ops


def resident_programs(regs: int, shared: int, warps: int, limits: dict = SM90_LIMITS) -> int:
    """Programs of this kernel one SM holds at once: the least of what its registers, shared memory, warps and
    block slots allow."""
    g = limits["register_granularity"]
    per_warp = -(-regs * 32 // g) * g
    by_regs = limits["registers"] // (per_warp * warps)
    by_shared = limits["shared_bytes"] // (shared + limits["shared_per_block_reserved"])
    return int(min(by_regs, by_shared, limits["warps"] // warps, limits["blocks"]))


def kernel_stats(policy, heads, kv_heads, head_dim, tokens, batch, sms=132, arch=90, alibi=False) -> dict:
    """One row: the compiled kernel's resources and its loop's instruction mix, per cached token."""
    import triton

    compiled, meta = compile_split_kernel(policy, heads, kv_heads, head_dim, tokens, batch, sms, arch, alibi)
    usage = _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = int(compiled.metadata.shared)
    warps = int(compiled.metadata.num_warps)
    ops = loop_instructions(_cuobjdump(compiled.asm["cubin"], "-sass"))
    mix = collections.Counter(_CLASS_OF.get(op, "other") for op in ops)
    block = meta["BLOCK_N"]
    row = {"arch": f"sm_{arch}", "triton": triton.__version__, "alibi": "on" if alibi else "off", "policy": policy,
           "batch": batch, "tokens": tokens, "splits": meta["NSPLIT"], "blocks_per_split": meta["BLOCKS"],
           "block_n": block, "num_warps": warps, "regs": regs, "spill_bytes": spills,
           "shared_bytes": shared, "resident_per_sm": resident_programs(regs, shared, warps),
           # a split of one block has no loop (blank): the kernel then runs straight through
           "loop_instructions": len(ops) or None,
           # warp instructions per cached token: the loop's count x warps / tokens per iteration
           "warp_instructions_per_token": round(len(ops) * warps / block, 1) if ops else None}
    row.update({f"loop_{cls}": mix.get(cls, 0) if ops else None for cls in (*CLASSES, "other")})
    return row


#: the split kernel's own options, when they were options (bench_attention's `variant` column): a GPU row ran
#: today's split kernel if its variant has these and nothing that is not a kernel feature now
SPLIT_KERNEL_FEATURES = {"full": {"write_first", "l2_hints"},
                         "keyformer": {"write_first", "l2_hints", "fast_log", "pos32", "lane_partials"}}


def ran_this_kernel(r: dict) -> bool:
    """Whether a bench_attention row timed today's split kernel: the default block configuration, and (in files
    of the option era) a variant with every split-kernel feature and no option that lost."""
    if not (r.get("regs") and int(r.get("block_n") or 0) == 0 and int(r.get("num_warps") or 4) == 4
            and int(r.get("num_stages") or 3) == 3 and not r.get("maxnreg")):
        return False
    if "variant" not in r:  # a file of today's bench_attention
        return True
    names = set(r["variant"].split("+"))
    return SPLIT_KERNEL_FEATURES.get(r["policy"], set()) <= names <= set(KERNEL_FEATURES)


def check_registers(rows: list[dict], measured_csv: str) -> list[str]:
    """Lines comparing the kernel's compiled registers with those a GPU run of bench_attention recorded at the
    same model, policy, batch and tokens (the check that this compile is the one the GPU ran)."""
    with open(measured_csv, newline="") as f:
        measured = {(r["model"], r["policy"], int(r["batch"]), int(r["tokens"])): int(r["regs"])
                    for r in csv.DictReader(f) if ran_this_kernel(r)}
    lines = []
    for r in rows:
        key = (r["model"], r["policy"], r["batch"], r["tokens"])
        if r["alibi"] == "off" and key in measured:
            lines.append(f"{' '.join(map(str, key))}: compiled {r['regs']} registers, GPU run {measured[key]}"
                         + ("" if r["regs"] == measured[key] else "  <- differs"))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="CSV to write (default: print only)")
    ap.add_argument("--alibi", type=_words("alibi", ("off", "on")), default="off",
                    help="without and/or with ALiBi's bias, a list (default: %(default)s)")
    ap.add_argument("--policy", type=_words("policy", ("full", "keyformer")), default="full,keyformer")
    ap.add_argument("--batch", type=_ints("batch"), default="1,64",
                    help="sequences; they set the split (1: many splits and a finish kernel, 64: one split per row; "
                         "default: %(default)s)")
    ap.add_argument("--tokens", type=_ints("tokens"), default="3277", help="cached tokens (default: %(default)s)")
    ap.add_argument("--sms", type=int, default=132, help="SMs the split is sized for (default: %(default)s, H100 "
                    "SXM and H200)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: %(default)s, Hopper)")
    ap.add_argument("--check", metavar="ATTENTION_CSV",
                    help="a bench_attention CSV from a GPU: compare the kernel's registers with it")
    a = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("Error: kernel_stats needs triton (pip install triton; no GPU needed)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("Error: TRITON_INTERPRET=1 runs kernels in Python; unset it to compile them", file=sys.stderr)
        return 2
    rows = []
    for (name, hkv, g, d), policy, batch, tokens, alibi in itertools.product(SHAPES, a.policy, a.batch, a.tokens,
                                                                              a.alibi):
        r = {"model": name, **kernel_stats(policy, hkv * g, hkv, d, tokens, batch, a.sms, a.arch, alibi == "on")}
        rows.append(r)
        print(f"{name:10s} {policy:9s} B={batch:<3d} T={tokens:<5d} {r['splits']:3d} splits alibi {alibi:3s} "
              f"regs {r['regs']:3d} spill {r['spill_bytes']:3d} smem {r['shared_bytes'] // 1024:3d} KB "
              f"resident {r['resident_per_sm']} | " + (
                  f"loop {r['loop_instructions']:4d} instr, {r['warp_instructions_per_token']:5.1f} warp-instr/token "
                  f"(select {r['loop_select']}, shared {r['loop_shared']}, barrier {r['loop_barrier']})"
                  if r["loop_instructions"] else "no loop (one block per split)"), flush=True)
    if a.out:
        with open(a.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if a.check:
        lines = check_registers(rows, a.check)
        print("\n".join(lines) if lines else f"no row of {a.check} ran this kernel at these points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
