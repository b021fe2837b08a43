"""The L2 set-aside for persisting accesses (CUDA programming guide, "L2 Cache Control"): cache lines marked to
be kept (PTX createpolicy ... L2::evict_last, which the fused kernels' l2_hints put on Keyformer's z) keep their
priority only inside this portion of L2, whose size is the driver's default (11.25 MiB on the H200 measured,
lab/data/l2/h200-l2-sweep-llama.csv) until a process sets it. This sets it for the device's primary CUDA context
through the driver API (libcuda, shipped with the driver; torch has no call for it); nothing on the GPU changes
beyond this process.
"""
from __future__ import annotations

import contextlib
import ctypes

# CUDA driver API enums (cuda.h, CUDA 12/13): CUlimit and CUdevice_attribute values
CU_LIMIT_PERSISTING_L2_CACHE_SIZE = 0x06
CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE = 38
CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE = 108


def _driver():
    return ctypes.CDLL("libcuda.so.1")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {status}")


@contextlib.contextmanager
def _current(device: int):
    """The driver API with `device`'s primary context current on this thread (torch's, made if need be)."""
    import torch

    with torch.cuda.device(device):
        torch.empty(1, device=f"cuda:{device}")  # torch makes the context current before its first allocation
        yield _driver()


def l2_sizes(device: int = 0) -> dict:
    """{'l2_bytes', 'max_persisting_bytes', 'persisting_bytes'} of `device` (the set-aside now, this context)."""
    out = {}
    with _current(device) as cu:
        for key, attr in (("l2_bytes", CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
                          ("max_persisting_bytes", CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE)):
            v = ctypes.c_int()
            _check(cu.cuDeviceGetAttribute(ctypes.byref(v), attr, device), "cuDeviceGetAttribute")
            out[key] = v.value
        size = ctypes.c_size_t()
        _check(cu.cuCtxGetLimit(ctypes.byref(size), CU_LIMIT_PERSISTING_L2_CACHE_SIZE), "cuCtxGetLimit")
    out["persisting_bytes"] = size.value
    return out


def set_persisting_l2(nbytes: int | None = None, device: int = 0) -> int:
    """Set the set-aside to `nbytes` (None: the device's maximum; 0: none; the driver rounds it up, in steps of
    3.75 MiB on the H200) and return what the driver now holds."""
    most = l2_sizes(device)["max_persisting_bytes"]
    want = most if nbytes is None else min(int(nbytes), most)
    with _current(device) as cu:
        _check(cu.cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(want)), "cuCtxSetLimit")
    return l2_sizes(device)["persisting_bytes"]
