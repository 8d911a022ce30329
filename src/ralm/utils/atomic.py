"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename.

A reader never sees a half-written file: either the old file (or none) or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it onto ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(dest: Path | str, mode: str = "w", **kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest`` for writing; rename it onto ``dest`` when closed cleanly."""
    with atomic_path(dest) as tmp, open(tmp, mode, **kw) as f:
        yield f


def write_json(dest: Path | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_open(dest, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def sha256_file(path: Path | str, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks so memory stays flat."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
