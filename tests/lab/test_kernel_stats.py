"""lab.kernel_stats: the SASS loop finder and residency arithmetic (always), and the kernels compiled for sm_90
without a GPU (where Triton is installed): the kernel is still the one the committed GPU runs ran."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from lab.kernel_stats import loop_instructions, ran_this_kernel, resident_programs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "lab" / "data" / "kernel-stats" / "kernel-stats-sm90.csv"

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/               @P0 SEL R9, R9, RZ, P1 ;
        /*0040*/                   MUFU.EX2 R10, R10 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   BRA 0x60 ;
        /*0070*/                   EXIT ;
"""


def test_loop_is_the_longest_backward_branch():
    # 0x10..0x50: the load, the product, the predicated select, the exp and the branch; 'BRA 0x60' is the
    # one-instruction trap loop every kernel ends with
    assert loop_instructions(SASS) == ["LDG", "HMMA", "SEL", "MUFU", "BRA"]
    assert loop_instructions("/*0000*/ EXIT ;") == []


def test_resident_programs_hand_count():
    # 168 registers x 32 threads = 5376 per warp (a multiple of 256), x 4 warps = 21504: 3 fit in 65536;
    # 102400 + 1024 reserved bytes of shared memory: 2 fit in 233472 -> 2
    assert resident_programs(168, 102400, 4) == 2
    # 80 registers (2560 per warp, 10240 per program: 6) and 71680 + 1024 bytes (3) -> 3
    assert resident_programs(80, 71680, 4) == 3
    # 255 registers round up to 8192 per warp: 2 programs of 4 warps
    assert resident_programs(255, 1024, 4) == 2


def test_rows_of_the_option_era_that_ran_this_kernel():
    base = {"regs": "96", "block_n": "0", "num_warps": "4", "num_stages": "3", "maxnreg": ""}
    assert ran_this_kernel({**base, "policy": "full"})  # today's bench_attention: no variant column
    assert ran_this_kernel({**base, "policy": "full", "variant": "write_first+fast_log+l2_hints"})
    assert not ran_this_kernel({**base, "policy": "full", "variant": "shipped"})
    assert not ran_this_kernel({**base, "policy": "keyformer", "variant": "write_first+fast_log+l2_hints"})
    assert ran_this_kernel({**base, "policy": "keyformer",
                            "variant": "write_first+fast_log+l2_hints+pos32+lane_partials+short_finish"})
    assert not ran_this_kernel({**base, "policy": "keyformer", "variant":
                                "write_first+fast_log+l2_hints+pos32+lane_partials+short_finish+fold_finish"})
    assert not ran_this_kernel({**base, "block_n": "64", "policy": "full"})


def _compile(points: list[tuple]) -> list[dict]:
    """kernel_stats rows, in a fresh interpreter: the fused-attention tests turn on Triton's interpreter for this
    process, and a kernel defined under it cannot be compiled."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; from lab.kernel_stats import kernel_stats; "
            "print(json.dumps([kernel_stats(*p) for p in json.loads(sys.argv[1])]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(points)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_triton = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0,
    reason="needs triton (the kernels compile for sm_90 without a GPU)")


VARIANTS = ROOT / "lab" / "data" / "attention" / "h200-attention-variants.csv"


@needs_triton
def test_the_kernel_is_the_one_the_gpu_ran():
    """Registers of the kernel compiled here equal those the H200 recorded for the same kernel when its features
    were options (lab/data/attention/h200-attention-variants.csv, batch 64: one split per row, so the split rule
    that changed since does not enter), and its loop swaps nothing in, in registers: the shipped kernel of the
    committed stats swapped the new token in with 273 selects per iteration (write_first removed them)."""
    rows = _compile([("keyformer", 32, 8, 128, 8192, 64), ("full", 16, 16, 256, 3277, 64)])
    gpu = {(r["model"], r["policy"], int(r["batch"]), int(r["tokens"])): int(r["regs"])
           for r in csv.DictReader(VARIANTS.open()) if ran_this_kernel(r)}
    assert [r["regs"] for r in rows] == [gpu[("llama-3-8b", "keyformer", 64, 8192)],
                                         gpu[("gpt-j-6b", "full", 64, 3277)]]
    committed = {(r["model"], r["policy"], int(r["batch"]), int(r["tokens"]), r["variant"]): r
                 for r in csv.DictReader(COMMITTED.open())}
    shipped = [int(r["loop_select"]) for k, r in committed.items() if k[4] == "shipped" and r["loop_select"]]
    assert shipped and all(r["loop_select"] < min(shipped) / 4 for r in rows)


@needs_triton
def test_alibi_adds_a_few_instructions_to_the_loop():
    """ALiBi's bias is one multiply-add per logit from a per-head slope: a few instructions, not a second pass."""
    off, on = _compile([("full", 32, 32, 128, 3277, 1), ("full", 32, 32, 128, 3277, 1, 132, 90, True)])
    assert off["loop_instructions"] < on["loop_instructions"] <= 1.1 * off["loop_instructions"]
    assert on["spill_bytes"] == 0 and on["resident_per_sm"] == off["resident_per_sm"]


@needs_triton
def test_every_kernel_of_a_step_compiles_for_the_gpu():
    """The CPU interpreter runs kernels Triton's GPU compiler rejects (a nested jit function's default constexpr
    string did, on the H200): every kernel a split step launches, with and without ALiBi, compiles here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from lab.kernel_stats import compile_step; "
            "print(json.dumps([sorted(compile_step(p, h, kv, d, 3277, 1, alibi=a)) "
            "for p in ('full', 'keyformer') for h, kv, d in ((16, 16, 256), (32, 8, 128)) for a in (False, True)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = json.loads(out.stdout.strip().splitlines()[-1])
    assert kernels == [["combine", "split"]] * 4 + [["finish", "split"]] * 4
