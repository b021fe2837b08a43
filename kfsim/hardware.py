"""GPU profile: datasheet facts (memory, bandwidth, peak FLOP/s per dtype, L2, SMs, links, power), each with a source."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import catalog
from .dtypes import DType
from .errors import KfsimError
from .loader import rng

#: Compute formats a profile gives a dense peak for (null where the GPU has no such mode).
PEAK_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


@dataclass(frozen=True)
class Hardware:
    """One GPU. Units are in the field names; `source` maps every figure's field to where it comes from."""

    name: str
    description: str
    memory_gb: float = rng(above=0)
    hbm_bandwidth_gbps: float = rng(above=0)
    peak_dense_tflops: dict[str, float | None] = rng(above=0)
    l2_mb: float = rng(above=0)
    sm_count: int = rng(1)
    interconnect_gbps: float = rng(0)
    tdp_w: float = rng(above=0)
    source: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    vendor: str = rng(choices=("nvidia", "amd"), default="nvidia")
    memory_type: str = ""
    interconnect: str = ""
    usd_per_hour: float | None = rng(above=0, default=None)
    #: latency of one collective message between GPUs (an all-reduce's fixed cost), microseconds; None: unknown
    interconnect_latency_us: float | None = rng(0, default=None)
    #: board power model (kfsim.power): idle power, and energy per byte moved from HBM and per FLOP; None: not
    #: measured on this GPU (energy falls back to TDP x a constant)
    idle_w: float | None = rng(0, default=None)
    pj_per_byte: float | None = rng(0, default=None)
    pj_per_flop: float | None = rng(0, default=None)
    notes: str = ""

    def __post_init__(self):
        missing = [k for k in PEAK_DTYPES if k not in self.peak_dense_tflops]
        extra = [k for k in self.peak_dense_tflops if k not in PEAK_DTYPES]
        if missing or extra:
            raise KfsimError(
                f"hardware {self.name}: peak_dense_tflops must give exactly {', '.join(PEAK_DTYPES)} "
                f"(null where unsupported); missing {missing or 'none'}, unknown {extra or 'none'}"
            )
        if self.peak_dense_tflops.get("bf16") is None and self.peak_dense_tflops.get("fp16") is None:
            raise KfsimError(f"hardware {self.name}: needs a bf16 or fp16 tensor rate")
        if self.peak_dense_tflops.get("fp32") is None:  # the vector units' rate: norms, softmax, Keyformer scores
            raise KfsimError(f"hardware {self.name}: peak_dense_tflops.fp32 is null; allowed: a number > 0 "
                             f"(the vector rate that element-wise work runs at)")
        figures = [f.name for f in dataclasses.fields(self) if f.name in FIGURES and getattr(self, f.name) is not None]
        unsourced = [k for k in figures if not self.source.get(k)]
        if unsourced:
            raise KfsimError(f"hardware {self.name}: no source for {', '.join(unsourced)}; add them under `source:`")

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_gbps * 1e9

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    def peak_flops(self, dtype: DType) -> float:
        """Dense peak FLOP/s for computing in `dtype`; a user error where the GPU has no such mode."""
        tflops = self.peak_dense_tflops.get(dtype.label)
        if tflops is None:
            have = [k for k, v in self.peak_dense_tflops.items() if v is not None]
            raise KfsimError(
                f"GPU {self.name} has no {dtype.label} rate; choose another --dtype ({', '.join(have)})"
            )
        return tflops * 1e12

    def ridge_point(self, dtype: DType) -> float:
        """FLOPs per byte at which compute and memory time are equal (the roofline's knee)."""
        return self.peak_flops(dtype) / self.bandwidth_bytes_per_s


#: Fields that are facts about the GPU and so need a source.
FIGURES = ("memory_gb", "hbm_bandwidth_gbps", "peak_dense_tflops", "l2_mb", "sm_count", "interconnect_gbps", "tdp_w",
           "usd_per_hour", "interconnect_latency_us", "idle_w", "pj_per_byte", "pj_per_flop")


def get_hardware(name_or_path: str) -> Hardware:
    """A shipped GPU by name or alias (`a100`, `h100-sxm`), or a profile YAML file by path."""
    return catalog.resolve("gpu", name_or_path, Hardware)
