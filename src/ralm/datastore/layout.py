"""Names of the files inside a datastore directory, in one place."""

from __future__ import annotations

from pathlib import Path

from ralm.utils.outdir import Kind, read_json

FORMAT = "ralm-datastore"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"  # in-progress state; removed when the manifest is written
PART = r"part-\d{5}"


def _legacy(root: Path) -> bool:
    """A store built before folders had an owner marker: its manifest, or an unfinished build's state."""
    manifest, state = read_json(root / MANIFEST), read_json(root / BUILD_DIR / "state.json")
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT) or \
        (isinstance(state, dict) and "base_part" in state)


# every name a build writes: --force and the failed-start cleanup remove these and nothing else
KIND = Kind("datastore", "ralm datastore", {
    r"manifest\.json": None,
    "chunks": {PART + r"\.parquet": None},
    "keys": {PART + r"\.npy": None},
    "index": {r"dense-g\d{4}\.(faiss|json)": None, r"bm25-g\d{4}": "*"},
    r"\.build": {r"state\.json": None, r"near_dup\.json": None, "done": {PART + r"\.json": None}},
}, _legacy)


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
