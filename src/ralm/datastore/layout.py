"""Names of the files inside a datastore directory, in one place."""

from __future__ import annotations

from pathlib import Path

FORMAT = "ralm-datastore"
VERSION = 1
MANIFEST = "manifest.json"
BUILD_DIR = ".build"  # in-progress state; removed when the manifest is written


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
