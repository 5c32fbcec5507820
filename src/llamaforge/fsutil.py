"""Atomic files and folders: the one place that writes-aside-then-renames.

A file is written to a temporary name beside its destination, fsynced and renamed over it; a folder
is filled in `.NAME.tmp-PID/` beside its destination, every file fsynced, then renamed into place.
A SIGKILL at any moment leaves either the old content or the new one, never a mixture; the
temporary folder it leaves behind is removed the next time the same destination is written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (deepest first)."""
    dirs = []
    for root, _, files in os.walk(folder):
        dirs.append(Path(root))
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale(out: Path) -> None:
    """Temporary folders left beside `out` by a killed writer."""
    for stale in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_replaceable(out: str | Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse (UserError) to replace an existing `out` unless it is missing, an empty folder, or a
    `what` that llamaforge wrote (`ours(out)` recognizes it). Nothing is touched either way."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or ours(out)):
        return
    kind = "a file" if out.is_file() else "a link" if out.is_symlink() else "a folder"
    raise UserError(f"{out} is {kind} that llamaforge did not write (not a {what}); it was left untouched: "
                    "pass another --out or move it away")


def check_replaceable_file(out: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse (UserError) to overwrite an existing file that is not a `what` llamaforge wrote, or a folder."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out} is a folder; it was left untouched: pass a file name (a {what}) to --out")
    if out.exists() and not ours(out):
        raise UserError(f"{out} is a file that llamaforge did not write (not a {what}); it was left untouched: "
                        "pass another --out or move it away")


@contextmanager
def atomic_folder(out: str | Path, ours: Callable[[Path], bool] | None = None, what: str = "") -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block ends without an exception its
    files are fsynced and it replaces `out` (an older `out` is removed only after the new one is in
    place). On an exception the temporary folder is removed and `out` is untouched. With `ours`, an
    existing `out` that llamaforge did not write is refused before anything is written."""
    out = Path(out)
    if ours is not None:
        check_replaceable(out, ours, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
