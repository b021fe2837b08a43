"""The four inputs of a prediction (hardware, workload, engine, policy) plus dtypes, resolved from names or files."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .engine import Engine, get_engine
from .errors import KfsimError
from .hardware import Hardware, get_hardware
from .ops import Dtypes
from .policy import DEFAULT_WINDOW, Policy, make_policy
from .workload import Workload, get_workload

DEFAULT_MODEL = "gpt-j-6b"
DEFAULT_ENGINE = "default"  # engines/default.yaml: fitted on the project's H100 measurements


@dataclass(frozen=True)
class Setup:
    """Everything a prediction depends on besides batch and context, kept apart so each can change alone."""

    hw: Hardware
    workload: Workload  # the part of the model one GPU holds and runs (the whole model at tp 1)
    engine: Engine
    policy: Policy
    dtypes: Dtypes
    tp: int = 1  # tensor-parallel degree: GPUs that split every layer (kfsim.parallel)
    notes: tuple[str, ...] = ()  # choices kfsim made for the user, said beside the answer
    #: the host's microseconds to launch one tiny CUDA op: scales an eager engine's host terms from the host it was
    #: fitted on (Engine.host_launch_us); None: that host's speed
    host_launch_us: float | None = None

    def with_policy(self, policy: Policy) -> "Setup":
        return dataclasses.replace(self, policy=policy)

    def with_requests(self, prompt_len: int | None = None) -> "Setup":
        """The setup pricing whole requests (prefill too), noting an engine whose prefill terms are not measured,
        and its measured misses of the first token of a `prompt_len` prompt (the shortest where they vary)."""
        return dataclasses.replace(self, notes=self.notes + tuple(self.request_notes(prompt_len)))

    def request_notes(self, prompt_len: int | None) -> list[str]:
        """What an engine's prefill terms are known to miss for a `prompt_len` prompt (None: any prompt length)."""
        e = self.engine
        return unfitted_prefill(e) + [f"engine {e.name}: {note}" for note in e.caveats_for(
            self.workload, self.policy.kind, 1 if prompt_len is None else prompt_len)]

    @property
    def caveats(self) -> list[str]:
        """The engine's measured misses that cover this model and policy, as notes (Engine.caveats)."""
        e = self.engine
        return [f"engine {e.name}: {note}" for note in e.caveats_for(self.workload, self.policy.kind)]


def unfitted_prefill(e: Engine) -> list[str]:
    """A note where an engine fitted on measurements had no prefill rows: its prefill is then priced at the
    roofline's GPU terms, which no measured stack reaches (an eager stack's host dispatch is still priced)."""
    if "decode" not in e.fitted_phases or "prefill" in e.fitted_phases:  # not fitted by calibrate, or on prefill
        return []
    return [f"engine {e.name} was fitted on no prefill rows: its prefill runs at the datasheet's FLOP/s and bandwidth "
            f"with no fixed cost per kernel, so time to first token is a lower bound"]


def _one_of(name, file, flag_name, file_flag, default=None):
    for flag, value in ((flag_name, name), (file_flag, file)):
        if value is not None and not str(value).strip():
            what = "a file" if flag == file_flag else f"a name (see `kfsim list {flag_name}s`)"
            raise KfsimError(f"--{flag} is empty: give {what}")
    if name and file:
        raise KfsimError(f"give either --{flag_name} or --{file_flag}, not both")
    if not (name or file or default):
        raise KfsimError(f"give --{flag_name} NAME (see `kfsim list {flag_name}s`) or --{file_flag} FILE")
    return name or file or default


def make_setup(gpu=None, hw_file=None, model=None, workload_file=None, engine=DEFAULT_ENGINE, policy=None,
               kv_ratio=1.0, window=DEFAULT_WINDOW, weight_dtype=None, kv_dtype=None, tp=1) -> Setup:
    """Resolve names, files and flags into a Setup; every bad value is a one-line KfsimError."""
    from .parallel import shard

    hw = get_hardware(_one_of(gpu, hw_file, "gpu", "hw"))
    w = get_workload(_one_of(model, workload_file, "model", "workload", DEFAULT_MODEL))
    if engine is not None and not str(engine).strip():
        raise KfsimError("--engine is empty: give ideal, a shipped engine (see `kfsim list engines`) or a file")
    dtypes, notes = Dtypes.of(w, weight_dtype, kv_dtype), ()
    if weight_dtype is None and str(dtypes.compute) == "bf16" and hw.peak_dense_tflops.get("bf16") is None:
        # a GPU without bf16 (V100) runs the model in fp16: the same bytes, its own tensor rate
        dtypes = Dtypes.of(w, "fp16", kv_dtype or ("fp16" if str(dtypes.kv) == "bf16" else None))
        notes = (f"{hw.name} has no bf16 tensor rate: weights, activations and KV in fp16 (the same bytes)",)
    e, p = get_engine(engine or DEFAULT_ENGINE), make_policy(policy, kv_ratio, window)
    if e.fitted_policies and p.kind not in e.fitted_policies and p.kind != "full":
        notes += (f"engine {e.name} was fitted on no {p.kind} rows ({', '.join(e.fitted_policies)} only): the "
                  f"{p.kind} cache's extra work (scoring, eviction) is priced at the engine's starting terms, not "
                  f"measured ones",)
    s = Setup(hw, shard(w, tp), e, p, dtypes, tp, notes)
    return dataclasses.replace(s, notes=notes + tuple(s.caveats))
