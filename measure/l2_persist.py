"""The L2 set-aside for persisting accesses (CUDA programming guide, "L2 Cache Control"): cache lines marked to
be kept (PTX createpolicy ... L2::evict_last, which the fused kernels' l2_hints put on Keyformer's z) keep their
priority only inside this portion of L2, and it is 0 bytes unless a process sets it. This sets it for the current
CUDA context through the driver API (libcuda, shipped with the driver; torch has no call for it); nothing on the
GPU changes beyond this process.
"""
from __future__ import annotations

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


def l2_sizes(device: int = 0) -> dict:
    """{'l2_bytes', 'max_persisting_bytes', 'persisting_bytes'} of `device` (the set-aside now, this context)."""
    import torch

    torch.cuda.init()
    torch.empty(1, device=f"cuda:{device}")  # the primary context current on this thread
    cu = _driver()
    out = {}
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
    """Set the set-aside to `nbytes` (None: the device's maximum; 0: none) and return what the driver now holds."""
    sizes = l2_sizes(device)
    want = sizes["max_persisting_bytes"] if nbytes is None else min(int(nbytes), sizes["max_persisting_bytes"])
    _check(_driver().cuCtxSetLimit(CU_LIMIT_PERSISTING_L2_CACHE_SIZE, ctypes.c_size_t(want)), "cuCtxSetLimit")
    return l2_sizes(device)["persisting_bytes"]
