"""How a software stack uses a GPU: achieved fractions of the datasheet, fixed cost per kernel, kernels per op.

Every parameter is relative to the hardware (fractions of peak, microseconds per kernel, kernels per op), so an
engine fitted on one GPU predicts another. `ideal` is the pure roofline: all fractions 1, no fixed cost.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import catalog
from .errors import KfsimError
from .loader import rng
from .policy import POLICIES

#: Op kinds whose kernel counts an engine scales (see ops.py for which op is which kind).
OP_KINDS = ("gemm", "attention", "norm", "elementwise", "keyformer", "positional")
#: paths of a model's counted KV traffic (Engine.kv_passes): the full cache, and a full sliding window, each at
#: batch > 1, and at batch 1 where one sequence's views are contiguous; and the evicting caches of the scored
#: policies (their kept tokens, with the scorer's own passes apart)
SCORED_PATHS = ("keyformer", "h2o")
KV_PATHS = ("full", "full_batch1", "window", "window_batch1") + SCORED_PATHS
#: paths of a model's counted prefill attention (Engine.prefill_attention): the full cache's, and the evicting
#: caches' whose scorers pass over every prompt query's logits
PREFILL_PATHS = ("full",) + SCORED_PATHS
#: what a prefill attention count gives per score (one sequence, query head, query and key of the prompt)
PREFILL_COUNTS = ("tensor_flops", "fp32_flops", "score_bytes")
#: a kind an engine is silent on counts as this one (rotary embeddings were elementwise kernels before they were a
#: kind of their own, so an older engine prices them as it always did)
FALLBACK = {"positional": "elementwise"}


#: the most passes per attended KV byte a kv_passes path may give: 12 is the most counted (Mistral-7B's window in
#: transformers 5.17, data/hf-kv-passes), so a hundred is a broken file, not a stack
MAX_KV_PASSES = 100.0
#: the most operations per layer or per step a host_ops count may give: transformers 5.17 dispatches 33-108 a layer
#: (data/hf-host-ops), so a hundred thousand is a broken file
MAX_HOST_OPS = 1e5
#: the most FLOPs or bytes per score a prefill_attention count may give: 1,024 FLOPs (4 x a head of 256 over the
#: whole square) and 133 bytes are the most counted (data/hf-prefill-counts), so ten thousand is a broken file
MAX_PREFILL_COUNT = 1e4


def _kv_passes_problem(counts: dict) -> str:
    """What is wrong with one model's kv_passes paths, or ''."""
    if bad := [k for k in counts if k not in KV_PATHS]:
        return f"has path {bad[0]!r}; allowed: {', '.join(KV_PATHS)}"
    if "full" not in counts:
        return "has no path full (the full cache every other path refines)"
    if any(not isinstance(v, dict) or not {"streamed", "strided"} <= set(v) <= {"streamed", "strided", "scorer"}
           or any(not isinstance(x, (int, float)) or not 0 <= x <= MAX_KV_PASSES for x in v.values())
           for v in counts.values()):
        return (f"must give each path as streamed and strided numbers (and scorer, on paths "
                f"{' and '.join(SCORED_PATHS)}) from 0 to {MAX_KV_PASSES:g}")
    if any("scorer" in v for k, v in counts.items() if k not in SCORED_PATHS):
        return f"gives scorer passes on a path that does not score; only {', '.join(SCORED_PATHS)} do"
    return ""


def _prefill_attention_problem(counts: dict) -> str:
    """What is wrong with one model's prefill_attention paths, or ''."""
    if bad := [k for k in counts if k not in PREFILL_PATHS]:
        return f"has path {bad[0]!r}; allowed: {', '.join(PREFILL_PATHS)}"
    if any(not isinstance(v, dict) or set(v) != set(PREFILL_COUNTS)
           or any(not isinstance(x, (int, float)) or not 0 <= x <= MAX_PREFILL_COUNT for x in v.values())
           for v in counts.values()):
        return f"must give each path as {', '.join(PREFILL_COUNTS)}, numbers from 0 to {MAX_PREFILL_COUNT:g}"
    return ""


@dataclass(frozen=True)
class Caveat:
    """Where an engine is known, by measurement, to miss: said beside every prediction it covers."""

    #: what the engine misses there and by how much, in words
    note: str
    #: the policy kinds it covers; empty: every policy
    policies: tuple[str, ...] = ()
    #: true: only workloads with a sliding window; false: only those without; None: either
    sliding_window: bool | None = None
    #: the model names it covers; empty: every model
    models: tuple[str, ...] = ()
    #: set: a miss of the time to first token alone, for prompts of at most this many tokens (said where whole
    #: requests are priced); None: a miss of the decode step
    max_prompt: int | None = None

    def __post_init__(self):
        if not self.note.strip():
            raise KfsimError("a caveat's note is empty: say what the engine misses")
        if bad := [p for p in self.policies if p not in POLICIES]:
            raise KfsimError(f"caveat policy {bad[0]!r} is not a policy; allowed: {', '.join(POLICIES)}")
        if self.max_prompt is not None and (isinstance(self.max_prompt, bool) or not isinstance(self.max_prompt, int)
                                            or self.max_prompt < 1):
            raise KfsimError(f"caveat max_prompt {self.max_prompt!r} is not a token count; allowed: an integer >= 1")

    def covers(self, workload, policy_kind: str, prompt_len: int | None = None) -> bool:
        """Whether the caveat covers a decode step (`prompt_len` None) or the first token of a `prompt_len` prompt
        of `workload` under a `policy_kind` cache."""
        if self.max_prompt is None:
            if prompt_len is not None:
                return False
        elif prompt_len is None or prompt_len > self.max_prompt:
            return False
        return ((not self.policies or policy_kind in self.policies)
                and (self.sliding_window is None or self.sliding_window == bool(workload.sliding_window))
                and (not self.models or workload.name in self.models))

    def to_dict(self) -> dict:
        """The YAML form: the note and the conditions that narrow it (defaults left out)."""
        out = {"note": self.note}
        out.update({k: list(v) for k, v in (("policies", self.policies), ("models", self.models)) if v})
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.max_prompt is not None:
            out["max_prompt"] = self.max_prompt
        return out


@dataclass(frozen=True)
class Engine:
    """Efficiency parameters of one software stack. All fractions are of the GPU profile's datasheet figures."""

    name: str
    description: str = ""
    #: achieved fraction of HBM bandwidth while GEMMs stream weights
    weight_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: achieved fraction of HBM bandwidth while attention reads the KV cache (with enough parallel work)
    kv_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: achieved fraction of HBM bandwidth of norms, elementwise ops and Keyformer scoring
    other_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: achieved fraction of the dense tensor peak in GEMMs (prefill, large batches)
    gemm_compute_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: achieved fraction of the dense tensor peak in attention
    attention_compute_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: fixed GPU time per kernel (launch, ramp-up and tail), microseconds
    kernel_overhead_us: float = rng(0, default=0.0)
    #: fixed time per decode step outside the layers (sampling, host sync, graph launch), microseconds
    step_overhead_us: float = rng(0, default=0.0)
    #: kernels launched per natural op of each kind (1 = one kernel per op; 0 = fused into a neighbour)
    kernels_per_op: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in OP_KINDS if k not in FALLBACK})
    #: parallel work items (batch x KV heads x cache splits) attention needs to reach its bandwidth; 0 = always
    attention_saturation_items: float = rng(0, default=0.0)
    #: cached tokens per split of the full cache's split-K (flash-decoding) attention kernel; 0 = no split
    attention_split_tokens: float = rng(0, default=0.0)
    #: the same for the attention kernel an evicting cache (Keyformer, H2O, window) uses; 0 = no split
    evicting_attention_split_tokens: float = rng(0, default=0.0)
    #: fixed GPU time per kernel during prefill, microseconds (prefill usually runs eagerly, not from a graph)
    prefill_kernel_overhead_us: float = rng(0, default=0.0)
    #: passes over fp32 logits (per query head and cached token) an unfused Keyformer/H2O scorer makes; 0 = fused
    keyformer_logit_passes: float = rng(0, default=0.0)
    #: the same for prefill's scoring over the prompt (logits of every prompt query); 0 = fused
    keyformer_prefill_logit_passes: float = rng(0, default=0.0)
    #: a scorer fused into the attention kernel: its arithmetic per KV byte that kernel reads, in fp32 vector
    #: FLOPs. The kernel then takes max(KV read time, this work at the vector peak): it stops speeding up with
    #: memory bandwidth once its arithmetic and latency bind (decode only). 0 = not fused (the scorer's own ops)
    keyformer_flops_per_kv_byte: float = rng(0, default=0.0)
    #: fixed time per layer per decode step beyond the ops' kernels (cache writes, casts, copies, the pieces of
    #: rotary), microseconds
    layer_overhead_us: float = rng(0, default=0.0)
    #: largest batch at which the stack multiplies weights by activations with matrix-vector kernels (GEMV)
    #: instead of GEMMs: one token per weight read, so they can stream weights faster, and their prologues and
    #: epilogues can take in norms, biases, activations and residuals. 0 = never (GEMMs at every batch)
    matvec_max_batch: float = rng(0, default=0.0)
    #: achieved fraction of HBM bandwidth while those matrix-vector kernels stream weights (at least
    #: weight_bandwidth_fraction: a stack switches to them because they are faster; see matvec_problem)
    matvec_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: kernels per natural op of each kind at those batches (as kernels_per_op, and at most that; a kind not named
    #: keeps its kernels_per_op value): 0 for ops fused into a matrix-vector kernel
    matvec_kernels_per_op: dict[str, float] = field(default_factory=dict)
    #: host (CPU) time to dispatch one kernel in an eager framework (Python, the framework's op dispatch, the
    #: launch), microseconds; a step then takes the longer of its host dispatch and its GPU work. 0 = graphs
    host_us_per_kernel: float = rng(0, default=0.0)
    #: host time per decode step outside the kernels' dispatch (sampling, cache bookkeeping), microseconds
    host_step_us: float = rng(0, default=0.0)
    #: host microseconds to launch one tiny CUDA op on the machine whose rows fitted the host terms (the median of
    #: their host_launch_us, measure.timing.host_launch_us): an eager step runs at the speed of its host, so a host
    #: measured at another launch cost scales host_us_per_kernel and host_step_us by the ratio. None: no scaling
    host_launch_us: float | None = rng(above=0, default=None)
    #: operations the stack dispatches per decode step, counted for each model it was counted on
    #: (measure.host_ops, on a CPU): model -> {"family", "layer": per layer, "step": outside the layers,
    #: "scorer_layer": more per layer where the policy scores}. Where a model (or, failing that, one of its family)
    #: is counted, the host dispatches these at host_us_per_kernel each instead of the kernels kfsim counts
    host_ops: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: bytes of memory traffic per byte of KV the step attends (1: read once; a cache appended by copying, or
    #: grouped heads expanded before attention, move it more than once)
    kv_traffic_factor: float = rng(1.0, hi=20.0, default=1.0)
    #: the same for the attention an evicting cache (Keyformer, H2O, window) uses, where that is another code path
    #: (transformers' full cache copies on append and attends through the library, a Keyformer cache writes in
    #: place and attends through its own kernel); None = kv_traffic_factor
    evicting_kv_traffic_factor: float | None = rng(1.0, hi=20.0, default=None)
    #: how far attention fails to share a KV head among its group of query heads (G = heads / KV heads): it reads
    #: the cache 1 + grouped_kv_expansion x (G - 1) times (0: grouped heads read once, as SDPA's GQA path does;
    #: 1: every query head gets its own copy, as transformers' repeat_kv before attention does); the full cache's
    #: path only: an evicting cache attends through its own (evicting_kv_traffic_factor)
    grouped_kv_expansion: float = rng(0.0, hi=1.0, default=0.0)
    #: bytes a decode step moves per attended KV byte, counted for each model it was counted on (measure.kv_passes,
    #: on a CPU): model -> {"family", path: {"streamed": passes at kv_bandwidth_fraction, "strided": passes at
    #: strided_copy_gbps_per_sm, "scorer" (scored paths): the scorer's passes}}, paths KV_PATHS. Where a
    #: model (or one of its family with the path) is counted, its full cache is priced by these instead of
    #: kv_traffic_factor and grouped_kv_expansion, and its Keyformer or H2O cache instead of
    #: evicting_kv_traffic_factor and keyformer_logit_passes
    kv_passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: prefill's attention as a stack's code runs it, counted per score (one sequence, query head, query and key
    #: of the prompt's square) for each model it was counted on (measure.prefill_counts, on a CPU): model ->
    #: {"family", path: {"tensor_flops": 16-bit matrix FLOPs, at attention_compute_fraction of the tensor peak;
    #: "fp32_flops": fp32 matrix FLOPs, at the vector peak; "score_bytes": bytes of materialised scores, masks
    #: and softmax, at score_bandwidth_fraction}}, paths PREFILL_PATHS (a scored path holds its scorer's work).
    #: Where a model (or one of its family with the path) is counted, prefill's attention and scorer are priced
    #: by these instead of the roofline's causal half and keyformer_prefill_logit_passes
    prefill_attention: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: achieved fraction of HBM bandwidth while prefill passes over materialised attention scores (counted in
    #: prefill_attention: an eager softmax, mask and casts over scores it wrote out)
    score_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: achieved GB/s per SM of a concatenation with a strided input (PyTorch's generic per-element copy: a sliding
    #: window's cache view, or a new token cut from a fused QKV output at batch > 1). It runs at the SMs' pace, not
    #: HBM's: `kfsim microbench` cat_strided took 686-708 GB/s on the H100 SXM and 661-667 on the H200 (both 132
    #: SMs at 1,980 MHz; 3.35 and 4.8 TB/s of HBM). None: at the kv_bandwidth_fraction of HBM like other passes
    strided_copy_gbps_per_sm: float | None = rng(above=0, hi=100.0, default=None)
    #: one all-reduce's fixed time between tensor-parallel GPUs (the collective library's launch and handshake
    #: plus the link's latency), microseconds; None: the GPU profile's interconnect_latency_us
    allreduce_latency_us: float | None = rng(0, default=None)
    #: achieved fraction of the interconnect's one-way datasheet bandwidth in a large all-reduce
    interconnect_bandwidth_fraction: float = rng(above=0, hi=1.5, default=1.0)
    #: GPU memory held besides weights and KV (CUDA context, allocator, activations), GB
    workspace_gb: float = rng(0, default=0.0)
    #: mean board power while decoding, as a fraction of the profile's TDP (for energy per token)
    power_fraction_of_tdp: float = rng(above=0, hi=1.0, default=1.0)
    #: what `kfsim calibrate` fitted it on: "GPU, GPU (measured engine): N rows (...)" (fitted_on_text)
    fitted_on: str = ""
    #: the KV policies of the decode rows `kfsim calibrate` fitted it on; empty: not fitted on rows (ideal,
    #: hand-written), or fitted before this was recorded
    fitted_policies: tuple[str, ...] = ()
    source: dict[str, str] = field(default_factory=dict)
    #: cases measured where this engine misses (a stack's path that its terms do not describe), said beside the
    #: predictions they cover; `kfsim calibrate` writes none (reports/make_validation.py adds the measured ones)
    caveats: tuple[Caveat, ...] = ()

    @property
    def fitted_gpus(self) -> set[str]:
        """The GPU profiles `fitted_on` names (empty: not fitted on measurements)."""
        return {gpu.strip() for gpu in self.fitted_on.split(" (", 1)[0].split(",")} - {""}

    @property
    def fitted_phases(self) -> set[str]:
        """The phases (decode, prefill) of the rows `fitted_on` counts (empty: not fitted on measurements, or a
        fitted_on written by hand in another form)."""
        counted = self.fitted_on.rsplit("(", 1)[-1].rstrip(")") if self.fitted_on else ""
        return {part.split()[-1] for part in counted.split(",") if part.strip()} & {"decode", "prefill"}

    def caveats_for(self, workload, policy_kind: str, prompt_len: int | None = None) -> list[str]:
        """The notes of the caveats that cover `workload` under a `policy_kind` cache: its decode step, or with
        `prompt_len` the first token of a prompt that long."""
        return [c.note for c in self.caveats if c.covers(workload, policy_kind, prompt_len)]

    def __post_init__(self):
        for name in ("kernels_per_op", "matvec_kernels_per_op"):
            counts = getattr(self, name) or {}
            unknown = [k for k in counts if k not in OP_KINDS]
            if unknown:
                raise KfsimError(f"engine {self.name}: unknown op kind {unknown[0]!r} in {name}; "
                                 f"allowed: {', '.join(OP_KINDS)}")
            bad = {k: v for k, v in counts.items() if v < 0}
            if bad:
                raise KfsimError(f"engine {self.name}: {name} must be >= 0, got {bad}")
        for model, counts in (self.host_ops or {}).items():
            numbers = {k: v for k, v in counts.items() if k != "family"}
            if (missing := {"layer", "step"} - set(numbers)) or any(
                    not isinstance(v, (int, float)) or not 0 <= v <= MAX_HOST_OPS for v in numbers.values()):
                raise KfsimError(f"engine {self.name}: host_ops of {model} must give layer and step (and optionally "
                                 f"scorer_layer) as numbers from 0 to {MAX_HOST_OPS:g}, got {counts}"
                                 + (f" (no {sorted(missing)[0]})" if missing else ""))
        object.__setattr__(self, "host_ops", dict(self.host_ops or {}))
        for model, paths in (self.kv_passes or {}).items():
            if problem := _kv_passes_problem({k: v for k, v in paths.items() if k != "family"}):
                raise KfsimError(f"engine {self.name}: kv_passes of {model} {problem}, got {paths}")
        object.__setattr__(self, "kv_passes", dict(self.kv_passes or {}))
        for model, paths in (self.prefill_attention or {}).items():
            if problem := _prefill_attention_problem({k: v for k, v in paths.items() if k != "family"}):
                raise KfsimError(f"engine {self.name}: prefill_attention of {model} {problem}, got {paths}")
        object.__setattr__(self, "prefill_attention", dict(self.prefill_attention or {}))
        full = {k: 1.0 for k in OP_KINDS if k not in FALLBACK}
        full.update(self.kernels_per_op)
        object.__setattr__(self, "kernels_per_op", full)
        object.__setattr__(self, "matvec_kernels_per_op", dict(self.matvec_kernels_per_op or {}))

    def dispatched_ops(self, workload, scored: bool) -> float | None:
        """Operations the host dispatches per decode step of `workload` (host_ops: the model's count, else the
        first counted model of its family, at this model's layers), or None where neither was counted."""
        counts = self.host_ops.get(workload.name) or next(
            (c for c in self.host_ops.values() if c.get("family") == workload.family), None)
        if counts is None:
            return None
        per_layer = counts["layer"] + (counts.get("scorer_layer", 0.0) if scored else 0.0)
        return float(counts["step"] + workload.n_layers * per_layer)

    def _counted_paths(self, workload, needed: set) -> dict | None:
        """kv_passes of `workload`: the model's count, else the first of its family that has every `needed` path;
        None where neither has them."""
        paths = self.kv_passes.get(workload.name) or next(
            (c for c in self.kv_passes.values() if c.get("family") == workload.family and needed <= set(c)), None)
        return paths if paths is not None and needed <= set(paths) else None

    def counted_prefill(self, workload, kind: str) -> dict[str, float] | None:
        """`workload`'s prefill attention per score under a `kind` cache (a path of PREFILL_PATHS) from
        prefill_attention: the model's count, else the first of its family with that path; None where neither was
        counted, or for another policy."""
        if kind not in PREFILL_PATHS:
            return None
        counts = self.prefill_attention.get(workload.name)
        if counts is None or kind not in counts:
            counts = next((c for c in self.prefill_attention.values()
                           if c.get("family") == workload.family and kind in c), None)
        return None if counts is None else counts[kind]

    def counted_scored_passes(self, workload, kind: str) -> tuple[float, float] | None:
        """(attention, scorer) passes per kept KV byte of `workload`'s evicting cache of policy `kind` (keyformer or
        h2o) from kv_passes, or None where it was not counted: the cache's attention streams its kept tokens, the
        scorer's work (noise, softmax, accumulation, eviction) moves `scorer` more."""
        paths = self._counted_paths(workload, {kind}) if kind in SCORED_PATHS else None
        return None if paths is None else (paths[kind]["streamed"], paths[kind].get("scorer", 0.0))

    def counted_kv_passes(self, workload, batch, cached):
        """(streamed, strided) passes per attended KV byte of `workload`'s full cache at `batch` sequences attending
        `cached` tokens (arrays), from kv_passes: the model's count, else the first of its family that has every
        path the model needs; None where neither was counted."""
        windowed = bool(workload.sliding_window)
        paths = self._counted_paths(workload, {"full"} | ({"window"} if windowed else set()))
        if paths is None:
            return None
        one = np.asarray(batch, dtype=float) == 1
        past = np.asarray(cached, dtype=float) >= workload.sliding_window if windowed else np.zeros_like(one)

        def of(path, part):
            return np.where(one, paths.get(path + "_batch1", paths[path])[part], paths[path][part])

        return tuple(np.where(past, of("window", part), of("full", part)) if windowed else of("full", part)
                     for part in ("streamed", "strided"))

    def kernels(self, kind: str) -> float:
        """Kernels per op of `kind` (FALLBACK's kind where kernels_per_op is silent)."""
        return self.kernels_per_op[kind] if kind in self.kernels_per_op else self.kernels(FALLBACK[kind])

    def matvec_kernels(self, kind: str) -> float:
        """Kernels per op of `kind` at matrix-vector batches (kernels_per_op where matvec_kernels_per_op is silent;
        FALLBACK's kind where both are)."""
        if kind in self.matvec_kernels_per_op:
            return self.matvec_kernels_per_op[kind]
        if kind in FALLBACK and kind not in self.kernels_per_op:
            return self.matvec_kernels(FALLBACK[kind])
        return self.kernels(kind)

    def matvec_problem(self) -> str:
        """Why this engine's matrix-vector kernels are not faster than its GEMM path, or ''. A stack switches to
        them because they are faster; slower ones would make a batch of 1 take longer than a batch of 2."""
        if self.matvec_max_batch <= 0:
            return ""
        if self.matvec_bandwidth_fraction < self.weight_bandwidth_fraction:
            return (f"matvec_bandwidth_fraction {self.matvec_bandwidth_fraction:g} is below "
                    f"weight_bandwidth_fraction {self.weight_bandwidth_fraction:g}")
        more = [k for k in OP_KINDS if self.matvec_kernels(k) > self.kernels(k)]
        if more:
            return (f"matvec_kernels_per_op.{more[0]} {self.matvec_kernels(more[0]):g} is above "
                    f"kernels_per_op.{more[0]} {self.kernels(more[0]):g}")
        return ""

    def to_yaml(self) -> str:
        data = dataclasses.asdict(self)
        data["fitted_policies"] = list(self.fitted_policies)  # YAML's safe form of a tuple
        data["caveats"] = [c.to_dict() for c in self.caveats]
        if not self.caveats:
            del data["caveats"]
        return yaml.safe_dump(data, sort_keys=False, width=120)

    def write(self, path: str | Path) -> None:
        from .files import write_text_atomic

        write_text_atomic(path, self.to_yaml())


IDEAL = Engine(name="ideal", description="pure roofline: datasheet bandwidth and FLOP/s, no fixed cost")


def fitted_on_text(gpus: list[str], measured_engine: str | None, n_rows: int, described: str) -> str:
    """Engine.fitted_on as `kfsim calibrate` writes it (Engine.fitted_gpus reads its GPUs back)."""
    return f"{', '.join(gpus)} ({measured_engine or 'all engines'}): {n_rows} rows ({described})"


def get_engine(name_or_path: str) -> Engine:
    """`ideal`, a shipped engine by name, or an engine YAML file (for instance one `kfsim calibrate` wrote)."""
    if str(name_or_path) == "ideal":
        return IDEAL
    engine = catalog.resolve("engine", name_or_path, Engine)
    problem = engine.matvec_problem()
    if problem:
        raise KfsimError(f"engine {name_or_path}: {problem}; matrix-vector kernels must be at least as fast as "
                         f"the GEMMs they replace (or set matvec_max_batch: 0)")
    return engine


def engine_names() -> list[str]:
    return ["ideal"] + [n for n in catalog.names("engine") if n != "ideal"]
