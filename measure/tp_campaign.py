"""`kfsim measure --tp N` and `kfsim microbench --tp N`: the plain decoder split over N GPUs of one host
(measure.tensor_parallel), and all-reduces alone, with torch.distributed (NCCL on GPUs; gloo on the CPU, for tests).

One process per GPU, spawned here or started by `torchrun` (RANK / WORLD_SIZE / MASTER_ADDR in the environment).
Every rank times the same steps with CUDA events; a row's step is the slowest rank's (each timing field is the
maximum over ranks). The ranks agree on every decision that would otherwise leave one waiting in a collective (a
point that does not fit, a step that failed). Rank 0 writes the rows. Board power is not read for these rows: the
energy window (measure.energy) repeats steps until the counter updates, a count that would differ between GPUs.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from kfsim import measurements
from kfsim.parallel import bus_factor, shard
from kfsim.workload import get_workload

from . import timing
from .decoder import build
from .kv_policies import attended, make_cache
from .tensor_parallel import gather_logits, rank_slopes, shard_hooks

#: all-reduce message sizes, bytes: 8 KB (a batch-1 step's activations, 1 x 4096 bf16) to 256 MB, doubling: a
#: decode step's messages (batch 1-64 x d_model 4096-8192 x 2 bytes: 8 KB-1 MB) and the sizes that reach bandwidth
ALLREDUCE_SIZES = tuple(8192 << i for i in range(16))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, tp: int, port: int | None, device: str) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and pick this rank's device."""
    if port is not None:  # spawned here; under torchrun the environment already names the rendezvous
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=tp, device_id=torch.device("cuda", rank))
        return torch.device("cuda", rank)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    return torch.device("cpu")


def _slowest(values: list[float], device) -> list[float]:
    """Each value's maximum over the ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _all_agree(ok: bool, device) -> bool:
    """True only where every rank says True."""
    t = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def build_rank(w, rank: int, tp: int, device, dtype=torch.bfloat16):
    """Rank `rank`'s part of `w` with random weights (timing does not depend on their values), its row-parallel
    layers all-reducing: built at the part's size, so a model larger than one GPU needs no whole copy."""
    part = build(shard(w, tp), dtype=dtype, device=device, seed=rank)
    with torch.no_grad():  # the embedding is replicated, the whole vocabulary (the LM head is split)
        part.embed = torch.nn.Embedding(w.vocab_size, w.d_model, device=device, dtype=dtype)
        part.embed.weight.normal_(0.0, 0.02)
    shard_hooks(part, w, rank, tp)
    return part


def _fits(w, pt, tp: int, device) -> bool:
    """Whether this rank's caches and the step's temporaries fit in its free memory (CPU: always)."""
    if torch.device(device).type != "cuda":
        return True
    from .campaign import _cache_bytes

    need = _cache_bytes(shard(w, tp), pt.policy, pt.batch, pt.context, pt.kv_ratio)
    return need < 0.92 * torch.cuda.mem_get_info()[0]


def time_point(model, w, pt, rank: int, tp: int, device, steps: int, warmup: int, graph: bool, window: float,
               dtype=torch.bfloat16) -> dict:
    """One decode point on this rank: the caches of its heads, a step that decodes and gathers the vocabulary's
    logits, timed; returns the timing fields (this rank's)."""
    s = shard(w, tp)
    caches = [make_cache(pt.policy, pt.batch, s.n_kv_heads, s.head_dim, pt.context, pt.kv_ratio, window, dtype,
                         device, 0, w.sliding_window, rank_slopes(w, rank, tp)) for _ in range(w.n_layers)]
    for c in caches:
        c.fill_random(attended(pt.context, w.sliding_window))
    tokens = torch.randint(0, w.vocab_size, (pt.batch,), device=device)
    pos = torch.tensor(pt.context, device=device)

    def step():
        return gather_logits(model.decode(tokens, pos, caches), w.vocab_size, tp)

    if graph:
        step = timing.capture_graph(step).replay
    t = timing.time_steps(step, steps, warmup)
    return {"step_ms": t.median_ms, "step_ms_p10": t.p10_ms, "step_ms_p90": t.p90_ms, "step_ms_min": t.min_ms,
            "warmup_s": t.warmup_s, "n_steps": t.n, "cached_tokens": caches[0].cached_tokens}


TIMED = ("step_ms", "step_ms_p10", "step_ms_p90", "step_ms_min", "warmup_s")


def _row_head(env: dict, pt, tp: int, engine: str, window: float) -> dict:
    return {**env, "model": pt.model, "phase": pt.phase, "batch": pt.batch, "context": pt.context,
            "kv_ratio": pt.kv_ratio, "policy": pt.policy, "engine": engine, "dtype": "bf16", "kv_dtype": "bf16",
            "window": window if pt.policy != "full" else "", "tp": tp,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _environment(device) -> dict:
    from .env import environment
    from .nvml import Nvml

    return environment(Nvml()) if torch.device(device).type == "cuda" else {}


def worker(rank: int, tp: int, port, device: str, points, out, steps: int, warmup: int, graph: bool, window: float,
           env: dict | None = None, dtype=torch.bfloat16, resume: bool = True) -> None:
    """One rank's share of a campaign: every point on every rank, rows written by rank 0."""
    dev = _init(rank, tp, port, device)
    try:
        env = dict(env) if env is not None else _environment(dev)
        engine = "torch-graph" if graph else "torch-eager"
        done = measurements.done_keys(out) if resume and rank == 0 else set()
        name, model = None, None
        for i, pt in enumerate(points, 1):
            head = _row_head(env, pt, tp, engine, window)
            skip = _all_agree(measurements.point_key(head) not in done, dev) is False
            if skip:
                if rank == 0:
                    print(f"[{i}/{len(points)}] tp {tp} {pt.model} B={pt.batch} C={pt.context} {pt.policy}: already "
                          "measured, skipped", flush=True)
                continue
            w = get_workload(pt.model)
            if pt.model != name:
                model = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                model, name = build_rank(w, rank, tp, dev, dtype), pt.model
            row = {**head}
            if not _all_agree(_fits(w, pt, tp, dev), dev):
                row.update(status="oom", error="the caches do not fit on every GPU")
            else:
                try:
                    with torch.inference_mode():
                        result, ok = time_point(model, w, pt, rank, tp, dev, steps, warmup, graph, window, dtype), True
                except Exception as exc:  # this rank's step failed: the others must hear of it, not wait
                    result, ok, error = {}, False, str(exc).splitlines()[0][:200]
                if _all_agree(ok, dev):
                    slow = _slowest([result[k] for k in TIMED], dev)
                    row.update({k: round(v, 5) for k, v in zip(TIMED, slow)}, n_steps=result["n_steps"],
                               cached_tokens=result["cached_tokens"], status="ok")
                else:
                    row.update(status="error", error=error if not ok else "another GPU's step failed")
            if dev.type == "cuda":
                from .nvml import Nvml

                state = Nvml(torch.cuda.current_device()).state()
                row.update({k: state.get(k) for k in ("sm_mhz", "mem_mhz", "temp_c", "mem_used_gb", "throttle")})
                torch.cuda.empty_cache()
            if rank == 0:
                measurements.append_row(out, row)
                result = f"{row['step_ms']:.3f} ms" if row["status"] == "ok" else row["status"]
                print(f"[{i}/{len(points)}] tp {tp} {pt.model} B={pt.batch} C={pt.context} {pt.policy} "
                      f"r={pt.kv_ratio:g}: {result}", flush=True)
    finally:
        dist.destroy_process_group()


def _launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def launch(target, tp: int, device: str, *args) -> None:
    """Run `target(rank, tp, port, device, *args)` on every rank: this process's rank under torchrun, else `tp`
    spawned processes (a failed rank fails the whole run)."""
    if _launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != tp:
            raise RuntimeError(f"--tp {tp} under torchrun with WORLD_SIZE {os.environ['WORLD_SIZE']}")
        target(int(os.environ["RANK"]), tp, None, device, *args)
        return
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, tp, port, device, *args)) for r in range(tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if bad := [r for r, p in enumerate(procs) if p.exitcode]:
        raise RuntimeError(f"tensor-parallel rank {bad[0]} exited with code {procs[bad[0]].exitcode}")


def run(points, out: str | Path, tp: int, steps: int = 50, warmup: int = 10, graph: bool = True,
        window: float = 0.3, device: str = "cuda", env: dict | None = None, dtype=torch.bfloat16,
        resume: bool = True) -> None:
    """Measure decode `points` split over `tp` GPUs, appending rows (with tp) to `out`."""
    launch(worker, tp, device, list(points), str(out), steps, warmup, graph, window, env, dtype, resume)


def allreduce_worker(rank: int, tp: int, port, device: str, out, sizes, steps: int, env: dict | None) -> None:
    """All-reduces of bf16 messages of `sizes` bytes, each timed on every rank; rank 0 writes the rows."""
    from .microbench import COLUMNS, _row, write_rows

    dev = _init(rank, tp, port, device)
    try:
        env = dict(env) if env is not None else _environment(dev)
        rows = []
        for size in sizes:
            x = torch.ones(size // 2, dtype=torch.bfloat16, device=dev)
            t = timing.time_steps(lambda: dist.all_reduce(x), steps, 5)
            median, p10, p90 = _slowest([t.median_ms, t.p10_ms, t.p90_ms], dev)
            slow = timing.Timing(median, p10, p90, t.min_ms, t.std_ms, t.n, t.warmup_s)
            # bus bandwidth (NCCL's): the bytes each GPU sends, 2(tp-1)/tp of the message, per second
            rows.append({**{k: env.get(k) for k in COLUMNS if k in env},
                         **_row("allreduce", slow, bytes_=size, tp=tp),
                         "gbps": float(f"{bus_factor(tp) * size / (median * 1e-3) / 1e9:.4g}")})
            del x
        if rank == 0:
            write_rows(out, rows)
            for r in rows:
                print(f"all-reduce tp {tp} {r['bytes']:>10d} B: {r['median_ms'] * 1e3:9.1f} us, bus "
                      f"{r['gbps']:7.1f} GB/s", flush=True)
    finally:
        dist.destroy_process_group()


def allreduce_bench(out: str | Path, tp: int, sizes=ALLREDUCE_SIZES, steps: int = 30, device: str = "cuda",
                    env: dict | None = None) -> None:
    """`kfsim microbench --tp N`: all-reduce time and bus bandwidth over message sizes, into `out`."""
    launch(allreduce_worker, tp, device, str(out), tuple(sizes), steps, env)
