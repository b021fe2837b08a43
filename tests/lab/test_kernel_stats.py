"""lab.kernel_stats: the SASS loop finder and residency arithmetic (always), and the kernels compiled for sm_90
without a GPU (where Triton is installed): the shipped kernel is still the one the committed GPU runs ran."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
from lab.kernel_stats import loop_instructions, resident_programs, variant_options  # noqa: E402

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


def test_variant_names():
    assert variant_options("shipped") == {}
    assert variant_options("write_first+l2_hints") == {"write_first": True, "l2_hints": True}
    with pytest.raises(ValueError, match="'fast'"):
        variant_options("write_first+fast")


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


@needs_triton
def test_shipped_kernel_is_the_one_the_gpu_ran():
    """Registers of the shipped kernel compiled here equal those the H200 recorded in the committed spread run
    (lab/data/attention/h200-attention-spread.csv, batch 1, 4 programs per SM), and its loop is the committed one."""
    rows = _compile([("keyformer", 32, 8, 128, 8192, 1, "shipped"), ("full", 16, 16, 256, 3277, 1, "shipped")])
    assert [r["regs"] for r in rows] == [194, 168]
    committed = {(r["model"], r["policy"], int(r["batch"]), int(r["tokens"]), r["variant"]): r
                 for r in csv.DictReader(COMMITTED.open())}
    for r, model in zip(rows, ("llama-3-8b", "gpt-j-6b")):
        c = committed.get((model, r["policy"], 1, r["tokens"], "shipped"))
        if c is not None and c["triton"] == r["triton"]:
            assert (r["regs"], r["loop_instructions"]) == (int(c["regs"]), int(c["loop_instructions"]))


@needs_triton
def test_write_first_loop_has_no_register_swap():
    """write_first's point: K and V go from shared memory into the dots without the per-element select that
    swaps the new token in, so the loop is shorter and the kernel lighter."""
    shipped, first = _compile([("full", 32, 8, 128, 3277, 64, "shipped"), ("full", 32, 8, 128, 3277, 64,
                                                                         "write_first")])
    assert first["loop_select"] < shipped["loop_select"] / 4
    assert first["loop_instructions"] < shipped["loop_instructions"]
    assert first["shared_bytes"] < shipped["shared_bytes"]


@needs_triton
def test_every_kernel_of_a_step_compiles_for_the_gpu():
    """The CPU interpreter runs kernels Triton's GPU compiler rejects (a nested jit function's default constexpr
    string did, on the H200): every kernel a split step launches, shipped and with every option, compiles here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from lab.kernel_stats import compile_step, variant_options; "
            "print(json.dumps([sorted(compile_step(p, h, kv, d, 3277, 1, variant_options(v))) "
            "for p in ('full', 'keyformer') for h, kv, d in ((16, 16, 256), (32, 8, 128)) "
            "for v in ('shipped', 'write_first+l2_hints+fast_log+wave')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = json.loads(out.stdout.strip().splitlines()[-1])
    assert kernels == [["combine", "split"]] * 4 + [["finish", "split"]] * 4
