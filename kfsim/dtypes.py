"""Data types stored by their width in bits, so that int4 is 0.5 bytes (not 4 // 8 = 0), plus what a grouped
integer format stores beside its values (a scale and a zero point per group of values)."""
from __future__ import annotations

import enum

from .errors import KfsimError


class DType(enum.Enum):
    """A numeric format: its values' width in bits, and for grouped integer formats the values per group and the
    bits each group stores besides them."""

    FP32 = ("fp32", 32)
    TF32 = ("tf32", 32)
    BF16 = ("bf16", 16)
    FP16 = ("fp16", 16)
    FP8 = ("fp8", 8)
    INT8 = ("int8", 8)  # per-channel scales: one per row of thousands of values, under 0.01 bit each
    # 4-bit values in groups of 32 sharing an fp16 scale and an fp16 zero point (llama.cpp's Q4_1 blocks, the group
    # size of the round-to-nearest baselines in the AWQ and GPTQ papers' tables): 4 + 32 / 32 = 5 bits a value
    INT4 = ("int4", 4, 32, 32)
    # the same in groups of 128 (AWQ's and GPTQ's usual setting): 4 + 32 / 128 = 4.25 bits a value
    INT4_G128 = ("int4-g128", 4, 128, 32)

    def __init__(self, label: str, bits: int, group: int = 0, group_bits: int = 0):
        self.label = label
        self.bits = bits
        self.group, self.group_bits = group, group_bits

    @property
    def bytes(self) -> float:
        """Bytes stored per value, its group's scale and zero point included."""
        return (self.bits + (self.group_bits / self.group if self.group else 0)) / 8

    @property
    def is_float(self) -> bool:
        return not self.label.startswith("int")

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str, allowed: tuple[str, ...] | None = None, what: str = "dtype") -> "DType":
        """Look a dtype up by its label; a bad label is a user error naming the allowed ones."""
        names = allowed or tuple(d.label for d in cls)
        for d in cls:
            if d.label == str(text).lower() and d.label in names:
                return d
        raise KfsimError(f"unknown {what} {text!r}; allowed: {', '.join(names)}")


#: Formats a weight or KV cache may be stored in (tf32 is a compute mode only).
STORAGE_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "int4-g128")
