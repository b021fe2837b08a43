"""`kfsim measure --tp` and `microbench --tp` on 2 CPU processes (gloo): rows with tp and the slowest rank's times,
resuming, the ranks' agreement, and all-reduce rows that calibrate's interconnect fit reads. Times here are wall
clock on a CPU: the code around the measurement is what is tested, never a figure."""
import csv
import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from kfsim.calibrate import fit_interconnect  # noqa: E402
from kfsim.hardware import get_hardware  # noqa: E402
from measure import tp_campaign  # noqa: E402
from measure.campaign import Point  # noqa: E402

ENV = {"gpu": "h200", "gpu_name": "CPU test (gloo)"}


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_measure_tp2_writes_rows_with_tp_and_resumes(tmp_path):
    out = tmp_path / "tp.csv"
    points = [Point("cerebras-gpt-111m", "decode", 2, 64, 1.0, "full"),
              Point("cerebras-gpt-111m", "decode", 2, 64, 0.5, "keyformer")]
    tp_campaign.run(points, out, 2, steps=3, warmup=1, graph=False, device="cpu", env=ENV, dtype=torch.float32)
    rows = _read(out)
    assert [(r["policy"], r["tp"], r["status"], r["engine"]) for r in rows] == [
        ("full", "2", "ok", "torch-eager"), ("keyformer", "2", "ok", "torch-eager")]
    assert all(float(r["step_ms"]) > 0 and r["n_steps"] == "3" for r in rows)
    # the keyformer budget: half of 64 tokens per GPU's own KV heads
    assert rows[1]["cached_tokens"] == "32"
    tp_campaign.run(points, out, 2, steps=3, warmup=1, graph=False, device="cpu", env=ENV, dtype=torch.float32)
    assert len(_read(out)) == 2  # resumed: nothing measured twice


def _slowest_rank(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        slow = tp_campaign._slowest([1.0 + rank, 10.0 - rank], "cpu")
        agree = tp_campaign._all_agree(rank == 0, "cpu"), tp_campaign._all_agree(True, "cpu")
        queue.put((rank, slow, agree))
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def test_each_timing_is_the_slowest_rank_and_decisions_are_shared():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = tp_campaign._free_port()
    procs = [ctx.Process(target=_slowest_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    assert got == [(0, [2.0, 10.0], (False, True)), (1, [2.0, 10.0], (False, True))]


def test_allreduce_rows_feed_the_interconnect_fit(tmp_path):
    out = tmp_path / "ar.csv"
    tp_campaign.allreduce_bench(out, 2, sizes=(8192, 1 << 20, 8 << 20), steps=3, device="cpu", env=ENV)
    rows = _read(out)
    assert [(r["bench"], r["tp"], int(r["bytes"])) for r in rows] == [
        ("allreduce", "2", 8192), ("allreduce", "2", 1 << 20), ("allreduce", "2", 8 << 20)]
    # bus bandwidth: 2(tp-1)/tp = 1 of the message per second at tp 2
    for r in rows:
        assert float(r["gbps"]) == pytest.approx(int(r["bytes"]) / (float(r["median_ms"]) * 1e-3) / 1e9, rel=0.01)
    import pandas as pd

    fit = fit_interconnect(pd.read_csv(out), get_hardware("h200"))
    assert fit["interconnect_bandwidth_fraction"] > 0 and fit["allreduce_latency_us"] >= 0


def test_a_failed_rank_fails_the_run(tmp_path):
    with pytest.raises(RuntimeError, match="rank 0 exited"):
        tp_campaign.run([Point("no-such-model", "decode", 1, 64, 1.0, "full")], tmp_path / "x.csv", 2, steps=3,
                        warmup=1, graph=False, device="cpu", env=ENV, dtype=torch.float32)
