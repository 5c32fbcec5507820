"""Atomic files and folders: the one place that writes-aside-then-renames.

A file is written to a temporary name beside its destination, fsynced and renamed over it; a folder
is filled in `.NAME.tmp-PID/` beside its destination, every file fsynced, then put in place: swapped
with the old folder in one atomic step where the OS has one (Linux renameat2 RENAME_EXCHANGE), else
by two renames (old -> `.NAME.old-PID`, new -> NAME). A SIGKILL at any moment leaves the old folder
or the new one, never a mixture and never neither: a kill between the two renames is repaired at the
next start (`recover`: the old folder back in place). Leftover temporary folders are removed the next
time the same destination is written. `_step` marks each step, for the fault-injection tests.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def check_path(path: Path) -> None:
    """A destination whose name is not valid UTF-8 (bytes a file manager or an archive left) cannot be
    written into JSON, YAML or the tokenizer's files: refused before any work, not after it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{os.fsencode(path)!r} is not a valid UTF-8 path; rename it or pass another --out") from None


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
    check_path(path)
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


def _step(name: str) -> None:
    """A point in a folder replacement (filled, exchanged, old_moved, new_moved, done): tests replace
    this to kill the process there."""


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    OS or filesystem has no such call (the caller then renames twice)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover(out: Path) -> None:
    """A folder replacement killed between its two renames left `out` missing and the old folder as
    `.NAME.old-PID`: put it back (the new one, possibly incomplete, is discarded by remove_stale).
    Only an old folder whose writer is gone: a live writer between its renames is left alone."""
    out = Path(out)
    olds = sorted((p for p in out.parent.glob(f".{out.name}.old-*") if not _alive(p.name.rsplit("-", 1)[-1])),
                  key=lambda p: p.stat().st_mtime)
    if olds and not out.exists() and not out.is_symlink():
        os.replace(olds[-1], out)


def _alive(pid: str) -> bool:
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # this process is not in the middle of a replacement when it recovers
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Temporary folders left beside `out` by a killed writer (after `recover`)."""
    recover(out)
    for pattern in (f".{Path(out).name}.tmp-*", f".{Path(out).name}.old-*"):
        for stale in Path(out).parent.glob(pattern):
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
    check_path(out)
    if out.parent.exists():
        recover(out)  # a replacement killed between its renames: the old folder first, then the checks
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
        _step("filled")
        _put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmp: Path, out: Path) -> None:
    if out.exists() and exchange(tmp, out):  # one atomic step; tmp now holds the old folder
        _step("exchanged")
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
    elif out.exists():  # two renames; a kill between them is repaired by `recover`
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        _step("old_moved")
        os.replace(tmp, out)
        _step("new_moved")
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
        fsync_dir(out.parent)
    _step("done")
