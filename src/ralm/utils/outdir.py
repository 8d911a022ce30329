"""One state machine for every folder ralm writes (``build --out``, ``knnlm build --out``, ``retrofit --out``).

``open_out`` runs, in this order, before any model is loaded:

1. **Writable**: the folder (and missing parents) is created and a lock file opened in it; a path under a
   regular file, a read-only file system or a folder without write permission is one ``RalmError``.
2. **One writer**: ``fcntl.flock`` (non-blocking) on ``.ralm.lock`` for the whole write. The kernel drops the
   lock when its holder exits, however it exits, so a ``kill -9`` leaves no stale lock, only a file that
   names a process that is gone (reported, then taken over). A second writer is refused at once with the
   holder's pid, host, command and start time. Ray workers write parts while the driver holds the lock.
3. **Ownership**: a folder is ralm's when it holds the marker ``.ralm-owner.json`` of the same kind (written
   by ``claim`` when a build first writes), or, for stores made before markers existed, when it holds only
   file names of that kind. Anything else is refused; ``--force`` and the failed-start cleanup delete only
   entries the kind's name tree proves ralm wrote, never through a symbolic link, and refuse (deleting
   nothing) when the folder holds anything foreign.

Each kind (its name tree, its label, how a marker-less store of it is recognised) is declared next to
that kind's own file layout: ``datastore/layout.py``, ``methods/knnlm_store.py``, ``tuning/retrofit.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ralm.errors import RalmError
from ralm.utils.atomic import write_json

MARKER, LOCK = ".ralm-owner.json", ".ralm.lock"
MARKER_FORMAT, MARKER_VERSION = "ralm-folder", 1
ANY = "*"  # a folder ralm names whose inside a library lays out (bm25s): every regular file in it is ralm's
# atomic writes (utils/atomic.py) and bm25's folder swap leave ".NAME.tmp-PID" / ".NAME.tmp" when killed
TMP = re.compile(r"\..+\.tmp(-\d+)?")

Tree = Mapping[str, Any]  # regex on an entry name -> None (a file), a nested Tree (a folder) or ANY


@dataclass(frozen=True)
class Kind:
    """What one kind of ralm folder may hold."""

    name: str  # written into the marker: "datastore", "knnlm", "retrofit"
    label: str  # in messages: "ralm datastore"
    files: Tree
    legacy: Callable[[Path], bool]  # a marker-less folder this kind's earlier versions wrote


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing, a link or not JSON (for recognising, not for reading)."""
    try:
        if path.is_symlink():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _entry_kind(tree: Tree, name: str) -> tuple[bool, Any]:
    for pattern, sub in tree.items():
        if re.fullmatch(pattern, name):
            return True, sub
    if TMP.fullmatch(name):
        return True, ANY
    return False, None


def _problem(folder: Path, tree: Tree, prefix: str = "") -> tuple[str, str] | None:
    """The first entry under ``folder`` that ralm cannot prove it wrote: (relative path, why), or None."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = prefix + entry.name
        if entry.is_symlink():
            return rel, "link"
        known, sub = _entry_kind(tree, entry.name)
        is_dir = entry.is_dir(follow_symlinks=False)
        if not known or (sub is None and not entry.is_file(follow_symlinks=False)) or (sub is not None and not is_dir):
            return rel, "foreign"
        if sub is ANY:
            for base, dirs, files in os.walk(entry.path):  # os.walk does not descend into links
                for n in sorted(dirs + files):
                    p = Path(base) / n
                    if p.is_symlink() or not (p.is_dir() or p.is_file()):
                        return f"{rel}/{p.relative_to(entry.path).as_posix()}", "link" if p.is_symlink() else "foreign"
        elif sub is not None:
            found = _problem(Path(entry.path), sub, rel + "/")
            if found:
                return found
    return None


def _remove(path: Path, sub: Any) -> None:
    """Remove one entry ralm wrote; a link is unlinked itself, never followed; foreign names inside stay."""
    if path.is_symlink() or sub is None:
        path.unlink(missing_ok=True)
    elif sub is ANY:
        shutil.rmtree(path)  # fd-based on Linux: unlinks links inside, never follows them
    else:
        for entry in os.scandir(path):
            known, inner = _entry_kind(sub, entry.name)
            if known:
                _remove(Path(entry.path), inner)
        with contextlib.suppress(OSError):  # still holds something foreign: keep the folder
            path.rmdir()


def remove_owned(root: Path, rel: str, kind: Kind) -> bool:
    """Remove ``root/rel`` if the kind's names prove ralm wrote it and no link is on the way; True if removed."""
    tree: Any = kind.files
    path = Path(root)
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        if tree is None or tree is ANY:
            return False
        known, sub = _entry_kind(tree, part)
        path = path / part
        if not known or (i < len(parts) - 1 and (path.is_symlink() or not path.is_dir())):
            return False
        tree = sub
    if not (path.exists() or path.is_symlink()):
        return False
    _remove(path, tree)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _describe(holder: dict) -> str:
    cmd = " ".join(str(holder.get("command", "?")).split())[:200]
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}: `{cmd}`, since {holder.get('since', '?')}"


class OutDir:
    """A locked output folder of one kind; made by ``open_out``."""

    def __init__(self, root: Path, kind: Kind, flag: str, log: Callable[[str], None]):
        self.root, self.kind, self.flag, self.log = root, kind, flag, log
        self.created: list[Path] = []  # folders this run made, deepest last (removed again if left empty)
        self.claimed_now = False  # this run wrote the marker
        self._fd: int | None = None

    # -- 1. writable -------------------------------------------------------------------------------
    def _make_folder(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise RalmError(f"{self.flag} {root}: exists and is not a directory")
        missing = []
        p = root
        while not p.exists() and not p.is_symlink():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:  # made by another process just now: not ours to remove
                continue
            except NotADirectoryError:
                raise RalmError(f"{self.flag} {root}: cannot be created: {p.parent} is not a directory") from None
            except OSError as e:
                raise RalmError(f"{self.flag} {root}: cannot create {p} ({e.strerror})") from None
            self.created.append(p)

    # -- 2. one writer -----------------------------------------------------------------------------
    def _lock(self) -> None:
        path = self.root / LOCK
        for _ in range(20):  # only repeats while another holder unlinks its lock file under us
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise RalmError(f"{self.flag} {self.root}: {LOCK} is a symbolic link; remove it") from None
                if e.errno == errno.ENOENT:  # the folder was removed by a holder that left: make it again
                    self._make_folder()
                    continue
                raise RalmError(f"{self.flag} {self.root}: not writable ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                who = _describe(holder) if holder else "details not written yet"
                raise RalmError(f"{self.flag} {self.root}: in use by another ralm process ({who}); wait for it "
                                "to finish or choose another folder") from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder had just unlinked: lock the new one
                os.close(fd)
                continue
            self._fd = fd
            self._take_over(self._holder(fd, wait=False))
            return
        raise RalmError(f"{self.flag} {self.root}: could not lock {LOCK} (it keeps being replaced)")

    @staticmethod
    def _holder(fd: int, wait: bool = True) -> dict | None:
        """What the lock file says about its writer (it writes it right after locking: give it a moment)."""
        for _ in range(20 if wait else 1):
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
                if isinstance(info, dict):
                    return info
            except (OSError, ValueError):
                pass
            if wait:
                time.sleep(0.025)
        return None

    def _take_over(self, previous: dict | None) -> None:
        if previous and previous.get("pid") != os.getpid():
            pid, host = previous.get("pid"), previous.get("host")
            gone = host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
            self.log(f"{self.root}: a lock left by {_describe(previous)} is stale "
                     f"({'that process is gone' if gone else 'it no longer holds it'}; killed?); taking over")
        cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "?"
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": cmd[:500],
                "since": time.strftime("%Y-%m-%d %H:%M:%S %z"), "kind": self.kind.name}
        data = json.dumps(info).encode("utf-8")
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if self.claimed_now and set(os.listdir(self.root)) <= {MARKER, LOCK}:
                    (self.root / MARKER).unlink()  # nothing was written after the claim: leave no trace
            # unlink before unlocking: a waiter that opened this file re-checks the inode and retries
            with contextlib.suppress(OSError):
                (self.root / LOCK).unlink()
            os.close(self._fd)
            self._fd = None
        for p in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty: something worth keeping is in it
                p.rmdir()

    # -- 3. ownership ------------------------------------------------------------------------------
    def _tree(self) -> Tree:
        return {re.escape(MARKER): None, re.escape(LOCK): None, **self.kind.files}

    def problem(self) -> tuple[str, str] | None:
        """The first entry ralm cannot prove it wrote (relative path, 'link' or 'foreign'), or None."""
        return _problem(self.root, self._tree())

    def entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root) if n != LOCK)

    def _marker(self) -> dict | None:
        m = read_json(self.root / MARKER)
        return m if isinstance(m, dict) and m.get("format") == MARKER_FORMAT else None

    def _check_owner(self, force: bool) -> None:
        """Refuse a folder this kind did not write; with ``force``, empty it of everything ralm wrote."""
        if not self.entries():
            return
        found = self.problem()
        if found and found[1] == "link":
            raise RalmError(f"{self.flag} {self.root}: {found[0]} is a symbolic link; ralm neither writes nor "
                            "deletes through links in its folders (replace it with a real folder or file)")
        marker = self._marker()
        if (self.root / MARKER).exists() and marker is None:
            found = (MARKER, "foreign")  # unreadable or not ours: proves nothing
        elif marker is not None and marker.get("kind") != self.kind.name:
            raise RalmError(f"{self.flag} {self.root}: is a ralm {marker.get('kind')} folder, not a "
                            f"{self.kind.label}; choose another folder")
        if marker is None and (found or not self.kind.legacy(self.root)):
            what = (f"its {MARKER} is unreadable or not ralm's" if found and found[0] == MARKER
                    else f"{found[0]} is not a file ralm writes" if found else f"no {self.kind.label} in it")
            raise RalmError(f"{self.flag} {self.root}: not empty and not a {self.kind.label} ({what}); "
                            + ("refusing to delete it with --force" if force else "choose another path"))
        if force:
            if found:
                raise RalmError(f"{self.flag} {self.root}: holds {found[0]}, which ralm did not write; refusing "
                                "to delete anything with --force (move it out first)")
            self.clear()

    def clear(self) -> None:
        """Remove every entry ralm wrote (the marker too), keeping the lock; the caller checked ``problem``."""
        tree = self._tree()
        for name in self.entries():
            known, sub = _entry_kind(tree, name)
            if known:
                _remove(self.root / name, sub)

    def claim(self) -> None:
        """Write the marker that proves this folder is ralm's (before the first write of a build)."""
        if self._marker() is not None:
            return

        try:
            write_json(self.root / MARKER, {"format": MARKER_FORMAT, "version": MARKER_VERSION,
                                            "kind": self.kind.name, "created": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        except OSError as e:
            raise RalmError(f"{self.flag} {self.root}: cannot write {MARKER} ({e.strerror})") from None
        self.claimed_now = True

    def remove(self, rel: str) -> bool:
        return remove_owned(self.root, rel, self.kind)

    def discard(self, err: RalmError, keep_store: bool = False) -> None:
        """After a fatal error in a build that finished nothing: remove what it wrote (no half store left).

        ``keep_store``: the folder held a finished store before (``--add``): only the build state goes.
        A folder that holds anything foreign keeps everything, and ``err`` says so.
        """
        if keep_store:
            self.remove(".build")
            if self.claimed_now:
                (self.root / MARKER).unlink(missing_ok=True)
            return
        found = self.problem()
        if found:
            raise type(err)(f"{err}; {self.root} was left as it was: it holds {found[0]}, which ralm did not "
                            "write") from None
        self.clear()


@contextlib.contextmanager
def open_out(path: str | Path, kind: Kind, *, force: bool = False, flag: str = "--out",
             log: Callable[[str], None] | None = None) -> Iterator[OutDir]:
    """Make, lock and check the output folder; hold the lock until the block ends (see the module doc)."""
    out = OutDir(Path(path), kind, flag, log or (lambda m: print(m, file=sys.stderr)))
    try:
        out._make_folder()
        out._lock()
        out._check_owner(force)
        yield out
    finally:
        out._release()
