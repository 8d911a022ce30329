"""A store's manifest, read without trusting it: every path it names stays inside the store, and its
content matches the checksum written into it.

A manifest is input like any other: it may be edited by hand, damaged on disk or crafted. Before any file
it names is opened or stat'ed, ``check_paths`` refuses absolute paths, ``..`` and symlinks that lead out
of the store (for both store kinds); ``check_checksum`` refuses content that no longer matches the
sha256 the builder stored in ``manifest_sha256``. Manifests written before checksums existed still open.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ralm.errors import StoreError

CHECKSUM = "manifest_sha256"


def canonical_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII escapes) of everything but the checksum.

    ASCII escapes keep it defined for any string, including undecodable file names (lone surrogates).
    """
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(manifest: dict) -> dict:
    """``manifest`` with its checksum added: what a builder writes as the store's manifest."""
    body = json.loads(json.dumps(manifest))  # the values exactly as they will read back from the file
    return {**body, CHECKSUM: canonical_sha256(body)}


def check_checksum(path: Path, manifest: dict, command: str) -> bool:
    """Refuse a manifest whose content does not match its checksum; False when it has none (older stores)."""
    stored = manifest.get(CHECKSUM)
    if stored is None:
        return False
    if stored != canonical_sha256(manifest):
        raise StoreError(f"{path}: content does not match its {CHECKSUM} (the manifest was edited or is corrupt); "
                         f"restore it or rebuild the store with `{command} --force`")
    return True


class Confined:
    """Checks that paths named by a manifest stay inside its store, resolving each folder only once."""

    def __init__(self, root: Path, manifest_path: Path):
        self.root, self.manifest_path = root, manifest_path
        self.real_root = os.path.realpath(root)
        self._dirs: dict[str, str] = {}  # relative folder -> its real path

    def check(self, rel: Any, field: str) -> Path:
        """``root / rel`` after checking it stays in the store: relative, no ``..``, no symlink leading out.

        Absolute paths and ``..`` are refused from the text alone; only a clean relative path is resolved
        (which reads symlinks, never opens or stats what they point to).
        """
        where = self.manifest_path
        if not isinstance(rel, str) or not rel or "\x00" in rel:
            raise StoreError(f"{where}: {field} must be a relative path inside the store, not {rel!r}")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or PureWindowsPath(rel).drive or "\\" in rel or ".." in pure.parts:
            raise StoreError(f"{where}: {field} {rel!r} points outside the store (absolute or with '..'); "
                             "refusing to read it")
        head, name = pure.parent.as_posix(), pure.name
        if head not in self._dirs:
            self._dirs[head] = os.path.realpath(self.root / head)
        real = os.path.join(self._dirs[head], name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not (real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)):
            raise StoreError(f"{where}: {field} {rel!r} leads outside the store through a symlink; "
                             "refusing to read it")
        return self.root / rel


def inside(root: Path, rel: Any, manifest_path: Path, field: str) -> Path:
    """``root / rel``, refused in one line naming the manifest and ``field`` unless it stays in the store."""
    return Confined(root, manifest_path).check(rel, field)


def check_tree(root: Path, folder: Path, manifest_path: Path, field: str) -> None:
    """Nothing under ``folder`` (an index folder whose files a library opens by name) leads out of the store."""
    confined = Confined(root, manifest_path)
    for dirpath, dirnames, filenames in os.walk(folder):  # does not follow symlinked folders
        for name in dirnames + filenames:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            confined.check(rel, f"{field} (file {rel!r} in it)")


def _record(rec: Any, manifest_path: Path, field: str, with_path: bool) -> None:
    keys = {"bytes": int, "sha256": str, **({"path": str} if with_path else {})}
    if not isinstance(rec, dict) or any(not isinstance(rec.get(k), t) or isinstance(rec.get(k), bool)
                                        for k, t in keys.items()):
        raise StoreError(f"{manifest_path}: {field} must be a file record with {', '.join(keys)}; "
                         "the manifest is corrupt")


def _parts(manifest: dict, manifest_path: Path) -> list[dict]:
    parts = manifest.get("parts")
    if not isinstance(parts, list):
        raise StoreError(f"{manifest_path}: parts must be a list; the manifest is corrupt")
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or not isinstance(p.get("part"), int) or isinstance(p.get("part"), bool) \
                or not 0 <= p["part"] < 100_000:
            raise StoreError(f"{manifest_path}: parts[{i}].part must be a part number (0-99999); "
                             "the manifest is corrupt")
    return parts


def check_paths(root: Path, manifest: dict, manifest_path: Path, part_files: dict[str, Callable[[int], Path]],
                required: tuple[str, ...] = (), fixed: tuple[str, ...] = ()) -> None:
    """Every path the manifest names, or that its part numbers name, resolves inside ``root``.

    ``part_files`` maps a part record's file kind (``chunks_file``, ``keys``, ...) to the function that
    names its file (relative to the store) from the part number; the ``required`` kinds must be recorded
    in every part; ``fixed`` lists other files a reader opens (``documents.json``).
    """
    confined = Confined(root, manifest_path)
    index = manifest.get("index")
    if not isinstance(index, dict) or not isinstance(index.get("meta"), dict) \
            or not isinstance(index.get("files"), list):
        raise StoreError(f"{manifest_path}: index must hold path, meta and files; the manifest is corrupt")
    confined.check(index.get("path"), "index.path")
    for j, f in enumerate(index["files"]):
        _record(f, manifest_path, f"index.files[{j}]", with_path=True)
        confined.check(f["path"], f"index.files[{j}].path")
    listed = [f["path"] for f in index["files"]]
    if not any(f == index["path"] or f.startswith(index["path"].rstrip("/") + "/") for f in listed):
        raise StoreError(f"{manifest_path}: index.path {index['path']!r} is not among index.files, so its size "
                         "and checksum are unknown; the manifest is corrupt")
    for i, p in enumerate(_parts(manifest, manifest_path)):
        for kind, name in part_files.items():
            if kind in p:
                _record(p[kind], manifest_path, f"parts[{i}].{kind}",
                        with_path=isinstance(p[kind], dict) and "path" in p[kind])
                if "path" in p[kind]:
                    confined.check(p[kind]["path"], f"parts[{i}].{kind}.path")
            elif kind in required:
                raise StoreError(f"{manifest_path}: parts[{i}] has no {kind} record; the manifest is corrupt")
            confined.check(name(p["part"]).as_posix(), f"parts[{i}].part ({kind})")
    for rel in fixed:
        confined.check(rel, rel)
