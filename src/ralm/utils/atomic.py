"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename.

A reader never sees a half-written file: either the old file (or none) or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ralm.errors import RalmError

# writes stopped by the machine, not by the input: what to tell the user instead of a traceback
_DISK_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file is larger than the file system or the file-size limit allows",
}


def disk_error(exc: BaseException, dest: Path | str | None = None) -> RalmError | None:
    """A one-line error for a write stopped by a full disk, a quota or a read-only file system; else None.

    OSError carries the errno; FAISS raises RuntimeError with the strerror text in its message; numpy
    reports a short write ("N requested and M written") with no errno, so there the free space decides.
    """
    text = str(exc)
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS else None
    if code is None and isinstance(exc, OSError | RuntimeError):
        code = next((c for c in _DISK_ERRORS if os.strerror(c) in text), None)
    where = dest if dest is not None else getattr(exc, "filename", None)
    if code is None and isinstance(exc, OSError) and "requested and" in text and where is not None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(where).parent).free < 1 << 20:
                code = errno.ENOSPC
    if code is None:
        return None
    return RalmError(f"cannot write {where if where is not None else 'a file'}: {_DISK_ERRORS[code]}; "
                     "rerun the same command once there is room (a build resumes from its finished shards)")


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
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except (OSError, RuntimeError) as e:  # a full disk etc.: one line naming the file (the temp is removed below)
        err = disk_error(e, dest)
        if err is None:
            raise
        raise err from None
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
