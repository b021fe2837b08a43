"""`kfsim measure --profile`: a decode step's GPU time by operation group (kfsim.breakdown.GROUPS), from the
PyTorch profiler.

The decoder's modules (kfsim's plain decoder, or transformers' eager model) open a profiler range per group while
a step runs (forward hooks, only while profiling: the timed steps carry none), and the Keyformer/H2O scorer one of
its own; every kernel is charged to the innermost range around the op that launched it ("other" where none is: residual adds, casts). Steps run eagerly,
as the profiler attributes no kernel of a CUDA-graph replay to the op that launched it; `gaps` is the profiled
step (CUDA events) less every kernel's time: the host's dispatch and launch latency between kernels. On a machine
without CUDA (tests) the ops' own CPU times stand in for kernel times.
"""
from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path

import torch

from kfsim.breakdown import GROUPS, PROFILE_COLUMNS
from kfsim.measurements import append_whole

from . import kv_policies, timing

PREFIX = "kfsim:"


#: a module's own name -> the group its forward is, in kfsim's plain decoder and transformers' model classes
NAMED = {"lm_head": "lm_head", "rotary": "positional", "rotary_emb": "positional", "pos_embed": "positional",
         "wpe": "positional", "mlp": "ffn", "ffn": "ffn", "feed_forward": "ffn", "attn": "attention",
         "self_attn": "attention"}


def _module_groups(model) -> list[tuple[torch.nn.Module, str]]:
    """(module, group) whose forward is that group's work, by name: norms by their class (LayerNorm, RMSNorm),
    the layers with weights inside an attention module as its projections. Works on kfsim's plain decoder and on
    transformers' Llama, Mistral, GPT-J, MPT and GPT-2 classes; what no range covers is "other"."""
    out, attention = [], []
    for name, module in model.named_modules():
        own = name.rsplit(".", 1)[-1]
        if "norm" in type(module).__name__.lower():
            out.append((module, "norms"))
        elif own in NAMED:
            out.append((module, NAMED[own]))
            if NAMED[own] == "attention":
                attention.append(name + ".")
        elif (any(name.startswith(a) for a in attention) and not any(True for _ in module.children())
              and any(True for _ in module.parameters(recurse=False))):
            out.append((module, "projections"))
    return out


@contextlib.contextmanager
def annotated(model):
    """Profiler ranges around each group's modules (and the scorer's work) while the block runs."""
    handles, open_ranges = [], []

    def enter(name):
        def pre(module, args):
            rf = torch.profiler.record_function(PREFIX + name)
            rf.__enter__()
            open_ranges.append(rf)
        return pre

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for module, group in _module_groups(model):
        handles += [module.register_forward_pre_hook(enter(group)), module.register_forward_hook(leave)]
    scorer = kv_policies.scoring_range
    kv_policies.scoring_range = lambda: torch.profiler.record_function(PREFIX + "keyformer")
    try:
        yield
    finally:
        kv_policies.scoring_range = scorer
        for h in handles:
            h.remove()


def _group_of(event) -> str:
    """The innermost kfsim range around a profiler event ("other" outside every range)."""
    e = event
    while e is not None:
        if e.name.startswith(PREFIX):
            return e.name[len(PREFIX):]
        e = e.cpu_parent
    return "other"


def group_times(events, on_gpu: bool) -> dict[str, float]:
    """Microseconds per group over the profiled steps: each op's kernels (on the CPU, its own CPU time) charged to
    its innermost range."""
    out = {g: 0.0 for g in GROUPS}
    for e in events:
        if e.name.startswith(PREFIX) or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        own = sum(k.duration for k in e.kernels) if on_gpu else e.self_cpu_time_total
        out[_group_of(e)] += own
    return out


def profile_step(model, step, steps: int = 5, warmup: int = 3, after=None) -> dict:
    """Run `step` (an eager decode step of `model`) `steps` times under the profiler: {group: ms per step} and
    the profiled step's own time (CUDA events; wall clock without CUDA). `after` runs after each step outside its
    events, as in the timed steps (a cache put back); kernels it launches would count as "other"."""
    after = after or (lambda: None)
    on_gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
    with annotated(model):
        for _ in range(warmup):
            step()
            after()
        with torch.profiler.profile(activities=activities) as prof:
            t = timing.time_steps(step, steps, 0, after=after)
    us = group_times(prof.events(), on_gpu)
    ms = {g: us[g] / 1e3 / steps for g in GROUPS if g != "gaps"}
    ms["gaps"] = max(0.0, t.median_ms - sum(ms.values()))
    return {"groups": ms, "step_ms": t.median_ms, "steps": steps, "source": "cuda kernels" if on_gpu else "cpu ops"}


def profile_path(out: str | Path) -> Path:
    """Where `kfsim measure --profile` writes beside its measurement file: OUT-profile.csv."""
    out = Path(out)
    return out.with_name(out.stem + "-profile.csv")


def append_profile(path: str | Path, row: dict, result: dict) -> None:
    """One row per group of a profiled point (`row`: its measurement row's identifying columns), appended whole
    or not at all (kfsim.measurements' append)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=PROFILE_COLUMNS, extrasaction="ignore")
    if new:
        w.writeheader()
    for g in GROUPS:
        w.writerow({**row, "group": g, "ms": round(result["groups"][g], 5),
                    "profiled_step_ms": round(result["step_ms"], 5), "steps": result["steps"],
                    "source": result["source"]})
    append_whole(path, text.getvalue().encode("utf-8"))
