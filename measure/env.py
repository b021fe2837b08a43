"""Which GPU this is (as a kfsim profile name) and the software versions every measured row carries."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

from .nvml import Nvml


def profile_name(device_name: str, memory_gb: float) -> str:
    """Map torch's device name to kfsim's profile name (h100-sxm, h200, a100-80gb, ...); unknown -> lowercased."""
    n = device_name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100-pcie" if "pcie" in n else "h100-sxm"
    if "a100" in n:
        return "a100-80gb" if memory_gb > 50 else "a100-40gb"
    for key in ("b200", "l40s", "l4", "a10g", "v100", "mi300x"):
        if key in n.replace(" ", ""):
            return key
    return n.replace("nvidia ", "").replace(" ", "-")


def git_commit() -> str:
    """The commit of the kfsim checkout measuring ('+dirty' where files differ from it); '' outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


def version(package: str) -> str:
    """An installed package's version, '' where it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment(nvml: Nvml | None = None) -> dict:
    """Columns that describe where a row was measured."""
    props = torch.cuda.get_device_properties(0)
    nvml = nvml or Nvml()
    return {
        "gpu": profile_name(props.name, props.total_memory / 1e9),
        "gpu_name": props.name,
        "driver": nvml.driver(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "triton": version("triton"),
        "transformers": version("transformers"),
    }
