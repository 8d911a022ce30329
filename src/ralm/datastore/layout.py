"""Names of the files inside a datastore directory, in one place."""

from __future__ import annotations

import re
from pathlib import Path

from ralm.utils.outdir import LOCK, MARKER, Kind, read_json

FORMAT = "ralm-datastore"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"  # in-progress state; removed when the manifest is written
PART = r"part-\d{5}"
STORESET = "storeset.json"  # a store set's record (datastore/store_set.py)
SHARD = "shard-{:05d}"  # one store of a `build --shards N`; their folder holds the store set over them


def _legacy(root: Path) -> bool:
    """A store built before folders had an owner marker: its manifest, or an unfinished build's state."""
    manifest, state = read_json(root / MANIFEST), read_json(root / BUILD_DIR / "state.json")
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT) or \
        (isinstance(state, dict) and "base_part" in state)


# every name a build writes: --force and the failed-start cleanup remove these and nothing else
_STORE = {
    r"manifest\.json": None,
    "chunks": {PART + r"\.parquet": None},
    "keys": {PART + r"\.npy": None},
    "index": {r"dense-g\d{4}\.(faiss|json)": None, r"bm25-g\d{4}": "*"},
    r"\.build": {r"state\.json": None, r"near_dup\.json": None, "done": {PART + r"\.json": None}},
}
# a `--shards N` build: its shards (each a store with its own marker and lock) and the set over them
KIND = Kind("datastore", "ralm datastore", {
    **_STORE, re.escape(STORESET): None,
    r"shard-\d{5}": {re.escape(MARKER): None, re.escape(LOCK): None, **_STORE},
}, _legacy)


def shard_path(root: Path, shard: int) -> Path:
    return root / SHARD.format(shard)


def shard_paths(root: Path) -> list[Path]:
    """The shard folders of a `--shards N` build under ``root`` (none for a single store), in order."""
    return sorted(p for p in root.glob("shard-[0-9][0-9][0-9][0-9][0-9]") if p.is_dir())


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def chunks_path(root: Path, part: int) -> Path:
    return root / "chunks" / f"{part_name(part)}.parquet"


def keys_path(root: Path, part: int) -> Path:
    return root / "keys" / f"{part_name(part)}.npy"


def done_path(root: Path, part: int) -> Path:
    return root / BUILD_DIR / "done" / f"{part_name(part)}.json"


def chunk_id(part: int, row: int) -> int:
    """Stable chunk id, known when the part is written: part number in the high 32 bits, row in the low."""
    return (part << 32) | row
