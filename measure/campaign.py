"""Measure a grid of decode (and prefill) points on the GPU and append one row per point to a measurement CSV.

Each decode point is a steady-state step: the cache holds `context` tokens (or the policy's budget of them) and
every timed step writes one new token and attends over the cache, so all timed steps cost what step `context`
costs. Points are appended as they finish, so an interrupted campaign keeps its rows and resumes where it stopped;
a point that does not fit in memory is recorded with status `oom` (one the kernels do not take, `unsupported`) and
the campaign goes on.
"""
from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from kfsim import measurements
from kfsim.errors import KfsimError
from kfsim.policy import measured_pairs
from kfsim.workload import get_workload

from . import energy, kernel_options, timing
from .decoder import build, slopes_of
from .env import environment
from .kv_policies import attended, make_cache
from .nvml import Nvml



@dataclass(frozen=True)
class Point:
    model: str
    phase: str  # decode | prefill
    batch: int
    context: int  # decode: tokens a full cache holds; prefill: prompt length
    kv_ratio: float
    policy: str


def grid(models, batches, contexts, kv_ratios, policies, prefill_prompts=(), prefill_batches=(1,)) -> list[Point]:
    """Decode points (full only at kv-ratio 1; reducing policies only below 1), then prefill points."""
    combos = measured_pairs(policies, kv_ratios)
    points = [Point(m, "decode", b, c, r, p) for m in models for (p, r) in combos for c in contexts for b in batches]
    points += [Point(m, "prefill", b, c, r, p) for m in models for (p, r) in combos for c in prefill_prompts
               for b in prefill_batches]
    return points


def _cache_bytes(w, policy, batch, context, kv_ratio) -> float:
    """Memory the caches and the step's temporaries need (to skip points that cannot fit)."""
    context = attended(context, w.sliding_window)
    slots = context + 1 if policy == "full" or kv_ratio >= 1 else math.ceil(kv_ratio * context) + 1
    kv = w.n_layers * 2 * batch * w.n_kv_heads * slots * w.head_dim * 2
    state = 0 if policy == "full" else w.n_layers * batch * w.n_kv_heads * slots * (8 + 4)
    temp = batch * w.n_heads * slots * 4 * 6 + batch * w.vocab_size * 4 * 2  # explicit logits, probs, noise; logits
    return kv + state + temp


try:  # a Triton kernel whose blocks do not fit an SM's shared memory or registers (compiled engine)
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: nothing raises it
    OutOfResources = ()


class Runner:
    """Holds the model of the current workload and measures points one by one."""

    def __init__(self, steps=50, warmup=10, graph=True, window=0.3, nvml=None, engine=None, profile=False):
        """`engine`: torch-graph (default with graph=True), torch-eager (graph=False) or compiled; `profile`: also
        profile each decode point's step by operation group (measure.profile: eager steps, one GPU)."""
        self.engine = engine or ("torch-graph" if graph else "torch-eager")
        self.profile = profile
        self.kernel_options = kernel_options.recorded() if self.engine == "compiled" else ""
        self.graph = self.engine != "torch-eager"
        self.steps, self.warmup, self.window = steps, warmup, window
        self.nvml = nvml or Nvml()
        self.env = environment(self.nvml)
        self.model_name, self.model, self.compiled = None, None, None
        # the board with the CUDA context open and no work, before the campaign's first point
        self.idle, self.power_limit_w = energy.idle_power(self.nvml.energy_mj), self.nvml.power_limit_w()

    def model_for(self, name):
        if name != self.model_name:
            self.model = self.compiled = None
            torch.cuda.empty_cache()
            self.model = build(get_workload(name))
            if self.engine == "compiled":
                from .compiled import CompiledDecoder

                self.compiled = CompiledDecoder(self.model)
            self.model_name = name
        return self.model

    def row_head(self, pt: Point) -> dict:
        """The columns of `pt`'s row that say what was measured, where and when."""
        return {**self.env, "model": pt.model, "phase": pt.phase, "batch": pt.batch, "context": pt.context,
                "kv_ratio": pt.kv_ratio, "policy": pt.policy, "engine": self.engine,
                "kernel_options": self.kernel_options,
                "dtype": "bf16", "kv_dtype": "bf16", "window": self.window if pt.policy != "full" else "",
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def measure(self, pt: Point, power: bool = True) -> dict:
        """One row for `pt`; `power`: also read board power and clocks (seconds of extra steps)."""
        w = get_workload(pt.model)
        row = self.row_head(pt)
        try:
            model = self.model_for(pt.model)
            need = _cache_bytes(w, pt.policy, pt.batch, pt.context, pt.kv_ratio)
            if pt.phase == "prefill":
                need += pt.batch * pt.context * (w.d_model * 8 + w.ffn_dim * 6 + w.n_heads * 512 * 4 * 4)
            free = torch.cuda.mem_get_info()[0]
            if need > 0.92 * free:
                return {**row, "status": "oom", "error": f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"}
            launch_us = timing.host_launch_us()
            with torch.inference_mode():
                result = (self._decode(model, w, pt, power) if pt.phase == "decode" else
                          self._prefill(model, w, pt, power))
            return {**row, **result, "status": "ok",
                    "host_launch_us": None if launch_us is None else round(launch_us, 3)}
        except torch.OutOfMemoryError as exc:
            return {**row, "status": "oom", "error": str(exc).splitlines()[0][:200]}
        except (KfsimError, OutOfResources) as exc:  # a shape the engine's kernels do not take (offsets, memory)
            return {**row, "status": "unsupported", "error": str(exc)[:200]}
        finally:
            torch.cuda.empty_cache()

    def _caches(self, w, pt, extra_slots=0):
        # the compiled engine's kernels add ALiBi themselves (fuse_caches): its full caches carry no position columns
        slopes = None if self.engine == "compiled" else slopes_of(w)
        return [make_cache(pt.policy, pt.batch, w.n_kv_heads, w.head_dim, pt.context, pt.kv_ratio, self.window,
                           torch.bfloat16, "cuda", extra_slots, w.sliding_window, slopes)
                for _ in range(w.n_layers)]

    def decode_step(self, model, w, pt, graph=None):
        """(step, caches): a callable running one steady-state decode step of point `pt` (a graph replay when the
        engine uses graphs and `graph` does not say otherwise), and the caches it reads."""
        caches = self._caches(w, pt)
        for c in caches:
            c.fill_random(attended(pt.context, w.sliding_window))
        tokens = torch.randint(0, w.vocab_size, (pt.batch,), device="cuda")
        pos = torch.tensor(pt.context, device="cuda")
        if self.engine == "compiled":
            from .compiled import fuse_caches
            caches = fuse_caches(caches, slopes=slopes_of(w))
            step = lambda: self.compiled.decode(tokens, pos, caches)  # noqa: E731
        else:
            step = lambda: model.decode(tokens, pos, caches)  # noqa: E731
        if self.graph if graph is None else graph:
            g = timing.capture_graph(step)
            step = g.replay
        return step, caches

    def profile_point(self, pt: Point) -> dict:
        """An eager step of decode point `pt` by operation group (measure.profile.profile_step)."""
        from .profile import profile_step

        w = get_workload(pt.model)
        model = self.model_for(pt.model)
        with torch.inference_mode():
            step, caches = self.decode_step(model, w, pt, graph=False)
            result = profile_step(model, step)
        del caches
        torch.cuda.empty_cache()
        return result

    def _decode(self, model, w, pt, power=True) -> dict:
        step, caches = self.decode_step(model, w, pt)
        t = timing.time_steps(step, self.steps, self.warmup)
        return {**self._timing_fields(t), **(self._energy(step, t.median_ms) if power else {}),
                "cached_tokens": caches[0].cached_tokens}

    def _prefill(self, model, w, pt, power=True) -> dict:
        tokens = torch.randint(0, w.vocab_size, (pt.batch, pt.context), device="cuda")
        caches = self._caches(w, pt)

        def step():
            for c in caches:  # each prefill starts from an empty cache
                if hasattr(c, "length"):
                    c.length = 0
            model.prefill(tokens, caches)

        return self._time_prefill(step, power, lambda: caches[0].cached_tokens)

    def _time_prefill(self, step, power, cached) -> dict:
        """A prefill point's row fields: `step` timed (fewer runs than a decode step's: each is a whole prompt),
        its power, and `cached()`, the tokens its cache keeps, read after the timed runs."""
        t = timing.time_steps(step, steps=max(5, self.steps // 10), warmup=2)
        return {**self._timing_fields(t), **(self._energy(step, t.median_ms) if power else {}),
                "cached_tokens": cached()}

    @staticmethod
    def _timing_fields(t: timing.Timing) -> dict:
        return {"step_ms": round(t.median_ms, 5), "step_ms_p10": round(t.p10_ms, 5), "step_ms_p90": round(t.p90_ms, 5),
                "step_ms_min": round(t.min_ms, 5), "n_steps": t.n, "warmup_s": round(t.warmup_s, 3)}

    def _energy(self, step, median_ms) -> dict:
        """Board power over seconds of back-to-back steps between two updates of NVML's energy counter
        (measure.energy), energy per step from it and the median step; clocks right after, while still at load."""
        repeats = max(1, math.ceil(energy.CHUNK_S * 1e3 / max(median_ms, 1e-3)))

        def chunk():
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()

        power = energy.board_power(self.nvml.energy_mj, chunk)
        state = self.nvml.state()
        out = {k: state.get(k) for k in ("sm_mhz", "mem_mhz", "temp_c", "mem_used_gb", "throttle")}
        out.update(idle_w=round(self.idle.watts, 1) if self.idle else None, power_limit_w=self.power_limit_w)
        if power is None:
            return {**out, "power_w": state.get("power_w")}
        out.update(power_w=round(power.watts, 1), energy_j=round(power.watts * median_ms / 1e3, 6),
                   energy_window_s=round(power.window_s, 3))
        if self.power_limit_w and power.watts > self.power_limit_w:
            out["energy_flag"] = f"{power.watts:.0f} W is above the board limit {self.power_limit_w:.0f} W"
        return out


def run(points: list[Point], out: str | Path, runner: Runner, resume: bool = True, echo=print,
        rounds: int = 1, seed: int = 0) -> list[dict]:
    """Measure `points` (skipping those already in `out` when resuming), appending each row as it finishes.

    With `rounds` > 1 each model's points are timed that many times, the first round in order (with power), the
    others in a shuffled order (`seed`), and each point's row, written once its model is done, keeps the fastest
    round's median: a host that slows for seconds at a time (other tenants, clocks) then slows one round of a
    point, not the point (eager steps are bound by the host; docs/measuring.md)."""
    done = measurements.done_keys(out) if resume else set()
    todo = []
    for i, pt in enumerate(points, 1):
        probe = {"gpu": runner.env["gpu"], "model": pt.model, "phase": pt.phase, "engine": runner.engine,
                 "kernel_options": runner.kernel_options, "batch": pt.batch,
                 "context": pt.context, "kv_ratio": pt.kv_ratio, "policy": pt.policy}
        if measurements.point_key(probe) in done:
            echo(f"[{i}/{len(points)}] {_label(pt)}: already measured, skipped")
        else:
            todo.append((i, pt))
    rows = []
    for model in dict.fromkeys(pt.model for _, pt in todo):
        group = [(i, pt) for i, pt in todo if pt.model == model]
        timed = {pt: [] for _, pt in group}
        for r in range(rounds):
            order = group if r == 0 else random.Random(seed * 1000 + r).sample(group, len(group))
            for i, pt in order:
                if r and timed[pt][0]["status"] != "ok":
                    continue
                row = runner.measure(pt, power=r == 0)
                timed[pt].append(row)
                if rounds == 1:
                    _write(out, runner, pt, row, rows, echo, f"[{i}/{len(points)}]")
                else:
                    echo(f"[round {r + 1}/{rounds}] [{i}/{len(points)}] {_label(pt)}: {_result(row)}")
        if rounds > 1:
            for i, pt in group:
                _write(out, runner, pt, fastest_round(timed[pt]), rows, echo, f"[{i}/{len(points)}]")
    return rows


def fastest_round(rounds: list[dict]) -> dict:
    """One row from a point's rounds: the first round's (power, energy and clocks, read in that round) with the
    fastest round's timing."""
    first = rounds[0]
    if first["status"] != "ok":  # later rounds skip a point the first could not measure
        return first
    ok = [r for r in rounds if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["step_ms"])
    timing_keys = ("step_ms", "step_ms_p10", "step_ms_p90", "step_ms_min", "n_steps", "host_launch_us")
    row = {**first, **{k: best.get(k) for k in timing_keys},
           "rounds": len(ok), "round_ms": ";".join(f"{r['step_ms']:.3f}" for r in ok)}
    return row


def _write(out, runner, pt, row, rows, echo, counter):
    measurements.append_row(out, row)
    rows.append(row)
    if runner.profile and row["status"] == "ok" and pt.phase == "decode":
        from .profile import append_profile, profile_path

        append_profile(profile_path(out), row, runner.profile_point(pt))
    echo(f"{counter} {_label(pt)}: {_result(row)}")


def _result(row: dict) -> str:
    result = f"{row['step_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']} ({row.get('error')})"
    if row.get("energy_flag"):
        result += f"; power flagged: {row['energy_flag']}"
    if row.get("rounds"):
        result += f" (fastest of {row['rounds']} rounds: {row['round_ms']})"
    return result


def _label(pt: Point) -> str:
    pol = "full" if pt.policy == "full" else f"{pt.policy} r={pt.kv_ratio:g}"
    return f"{pt.model} {pt.phase} B={pt.batch} C={pt.context} {pol}"
