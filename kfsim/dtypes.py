"""Data types stored by their width in bits, so that int4 is 0.5 bytes (not 4 // 8 = 0)."""
from __future__ import annotations

import enum

from .errors import KfsimError


class DType(enum.Enum):
    """A numeric format; `value` is its width in bits."""

    FP32 = ("fp32", 32)
    TF32 = ("tf32", 32)
    BF16 = ("bf16", 16)
    FP16 = ("fp16", 16)
    FP8 = ("fp8", 8)
    INT8 = ("int8", 8)
    INT4 = ("int4", 4)

    def __init__(self, label: str, bits: int):
        self.label = label
        self.bits = bits

    @property
    def bytes(self) -> float:
        return self.bits / 8

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
STORAGE_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
