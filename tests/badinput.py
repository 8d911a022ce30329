"""Helpers for the bad-input tests: assert one-line CLI errors and that no half-written store is left."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from ralm.cli import app

runner = CliRunner()


def fails(r, *needles: str, only: bool = True) -> str:
    """Assert a non-zero exit with exactly one ``error:`` line (the last one) that contains ``needles``."""
    assert r.exit_code != 0, r.output
    lines = r.stderr.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    if only:  # nothing else was printed: the whole report is that one line
        assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def no_store(out: Path) -> None:
    """Nothing store-like is left behind: no folder at all (the build created it) or an empty one."""
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def good(i: int) -> dict:
    return {"id": f"g{i}", "text": f"Alpha beta gamma river {i}. Mountain city forest music ocean planet."}


def cli_build(inputs, out, build_args, *extra) -> object:
    return runner.invoke(app, ["build", *map(str, inputs), "--out", str(out), *build_args, *extra])


def summary_of(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def all_chunks(out: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted((out / "chunks").glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}
