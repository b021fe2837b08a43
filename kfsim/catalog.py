"""Find shipped profiles (package data) by name or alias, or load a user's YAML file by path."""
from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Any

from .errors import KfsimError
from .loader import closest, load

#: kind -> folder at the top of the repository, installed as the package `kfsim.<folder>`.
FOLDERS = {"gpu": "hw_profiles", "model": "workloads", "engine": "engines"}


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped YAML files of `kind`, installed or in a checkout."""
    folder = FOLDERS[kind]
    try:
        return Path(str(importlib.resources.files(f"kfsim.{folder}")))
    except ModuleNotFoundError:  # running from a checkout that was not installed (PYTHONPATH=.)
        return Path(__file__).resolve().parent.parent / folder


@functools.lru_cache(maxsize=None)
def shipped_files(kind: str) -> dict[str, Path]:
    """name -> path of every shipped YAML file of `kind`."""
    return {p.stem: p for p in sorted(shipped_dir(kind).glob("*.yaml"))}


@functools.lru_cache(maxsize=None)
def _alias_index(kind: str) -> dict[str, str]:
    """alias -> name, read from the `aliases:` line of each shipped file without building every profile."""
    import yaml

    index = {}
    for name, path in shipped_files(kind).items():
        index[name] = name
        for line in path.read_text().splitlines():
            if line.startswith("aliases:"):
                for alias in yaml.safe_load(line.split(":", 1)[1]) or []:
                    index[str(alias)] = name
                break
    return index


def names(kind: str) -> list[str]:
    return list(shipped_files(kind))


def resolve(kind: str, name_or_path: str, cls: type) -> Any:
    """Load a shipped profile by name or alias, or a YAML file when `name_or_path` ends in .yaml/.yml."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return load(cls, Path(text))
    index = _alias_index(kind)
    key = text.lower()
    if key not in index:
        raise KfsimError(
            f"unknown {kind} {text!r}{closest(key, index)}; known: {', '.join(shipped_files(kind))}"
        )
    return _load_shipped(kind, index[key], cls)


@functools.lru_cache(maxsize=None)
def _load_shipped(kind: str, name: str, cls: type) -> Any:
    return load(cls, shipped_files(kind)[name], shipped=True)
