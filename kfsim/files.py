"""Output paths checked before work starts, and files written whole or not at all."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import KfsimError


def output_path(out: str, flag: str, inputs=(), folder: bool = False, writes=()) -> Path:
    """`out` as a path to write, refused where it is empty, where a file stands for a folder or the reverse, or
    where writing it (or, for a folder, its files `writes`) would replace one of `inputs`; parent folders are made
    (the output folder itself is not: staged_folder makes it once its files are complete)."""
    if out is None or not str(out).strip():
        raise KfsimError(f"--{flag} is empty: give a {'folder' if folder else 'file'} name")
    p = Path(out)
    if folder and p.exists() and not p.is_dir():
        raise KfsimError(f"--{flag} {out}: a file of that name exists; give a folder")
    if not folder and p.is_dir():
        raise KfsimError(f"--{flag} {out}: is a folder; give a file name")
    targets = [p / w for w in writes] if folder else [p]
    for given in inputs:
        src = Path(given).resolve()
        if any(src == t.resolve() for t in targets):
            raise KfsimError(f"--{flag} {out} would overwrite the input {given}; write somewhere else")
    try:  # a folder itself is made when its files are written whole (staged_folder): a failed run leaves none
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KfsimError(f"--{flag} {out}: cannot make its folder ({exc.strerror})") from None
    return p


def write_atomic(path: str | Path, write) -> None:
    """Call `write(tmp_path)` for a temporary file beside `path`, then rename it over `path`: a failed or
    interrupted write leaves no half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def staged_folder(out: str | Path):
    """A temporary folder beside `out` to write a report into; on success its files are moved into `out` (made
    if missing), on failure it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
