"""Crash safety: ``kill -9`` a build at any moment, rerun the same command, and it continues from the
finished shards and ends with a store identical to an uninterrupted build. A rerun on a finished store
says so and changes nothing; ``--force`` starts over.

The builds to be killed run as ``python -m ralm.cli build ...`` subprocesses; reruns run the very same
command line (in this process, through typer's runner, to keep the file fast).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_corpus
from ralm import Datastore
from ralm.cli import app
from ralm.errors import StoreError

runner = CliRunner()
N_DOCS, SHARD_DOCS = 40, 4
N_SHARDS = N_DOCS // SHARD_DOCS
QUERIES = ["alpha beta river", "football election market", "ocean planet garden winter"]


class Setup:
    def __init__(self, base: Path, tokenizer: str, encoder: str):
        self.base = base
        self.corpus = write_corpus(base / "corpus.jsonl", n_docs=N_DOCS, words=100)
        self.args = ["--tokenizer", tokenizer, "--encoder", encoder, "--encoder-dtype", "fp32",
                     "--chunk-tokens", "16", "--shard-docs", str(SHARD_DOCS), "--quiet"]
        self.env = {**os.environ, "RALM_CACHE_DIR": str(base / "cache"), "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
        self.reference = base / "reference"
        self._reference_results: list | None = None

    def reference_results(self) -> list:
        if self._reference_results is None:
            self._reference_results = search_results(self.reference)
        return self._reference_results

    def argv(self, out: Path, *extra: str) -> list[str]:
        return ["build", str(self.corpus), "--out", str(out), *self.args, *extra]

    def start(self, out: Path, log: Path) -> subprocess.Popen:
        with open(log, "wb") as err:
            return subprocess.Popen([sys.executable, "-m", "ralm.cli", *self.argv(out)], env=self.env,
                                    stdout=subprocess.DEVNULL, stderr=err)

    def rerun(self, out: Path, *extra: str):
        """The same command again, to completion."""
        r = runner.invoke(app, self.argv(out, *extra))
        assert r.exit_code == 0, r.output
        return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, tiny_encoder) -> Setup:
    """The corpus and an uninterrupted reference build, made by the CLI in a subprocess."""
    s = Setup(tmp_path_factory.mktemp("resume"), tiny_tokenizer, tiny_encoder)
    proc = subprocess.run([sys.executable, "-m", "ralm.cli", *s.argv(s.reference), "--json"], env=s.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["documents"] == N_DOCS and len(list((s.reference / "chunks").glob("*.parquet"))) == N_SHARDS
    return s


# ---- helpers ---------------------------------------------------------------------------------------
def n_done(out: Path) -> int:
    done = out / ".build" / "done"
    return sum(1 for p in done.glob("part-*.json")) if done.exists() else 0


def wait_until(cond, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the build exited (rc {proc.returncode}) before the moment to kill it")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("the build took too long to reach the moment to kill it")
        time.sleep(0.003)


def kill9(proc: subprocess.Popen) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it already finished
        pass
    proc.wait(timeout=60)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def search_results(root: Path) -> list[list[tuple]]:
    ds = Datastore.open(root, verify=True)
    return [[(h.row, h.chunk_id, h.doc_id, h.text, h.continuation, round(h.score, 5)) for h in hits]
            for hits in ds.search(QUERIES, k=8)]


def assert_same_store(out: Path, setup: Setup) -> None:
    """``out`` is finished, clean, and identical in content to the uninterrupted reference build."""
    ref = setup.reference
    assert (out / "manifest.json").exists()
    assert not (out / ".build").exists()
    assert temp_files(out) == []
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ref).as_posix() for p in ref.rglob("*") if p.is_file())
    for part in sorted((ref / "chunks").glob("*.parquet")):
        assert pq.read_table(out / "chunks" / part.name).equals(pq.read_table(part)), part.name
    for part in sorted((ref / "keys").glob("*.npy")):
        a, b = np.load(out / "keys" / part.name), np.load(part)
        assert a.dtype == b.dtype and np.array_equal(a, b), part.name
    m, r = (json.loads((root / "manifest.json").read_text()) for root in (out, ref))
    for key in ("generation", "counts", "domains", "parts", "tokenizer", "encoder", "chunking", "build"):
        assert m[key] == r[key], key
    assert m["index"]["path"] == r["index"]["path"]
    assert {k: v for k, v in m["summary"].items() if k != "recall_at_10"} == \
        {k: v for k, v in r["summary"].items() if k != "recall_at_10"}
    assert search_results(out) == setup.reference_results()


# ---- tests -----------------------------------------------------------------------------------------
def test_kill_after_some_shards_then_resume(setup, tmp_path):
    out = tmp_path / "ds"
    proc = setup.start(out, tmp_path / "stderr.txt")
    wait_until(lambda: n_done(out) >= 1, proc)
    kill9(proc)
    finished = n_done(out)
    assert 1 <= finished < N_SHARDS
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="unfinished"):
        Datastore.open(out)
    # what a kill in the middle of a write leaves behind: temporary files beside the parts
    (out / "chunks" / ".part-00007.parquet.tmp-99999").write_bytes(b"half a parquet file")
    (out / "keys").mkdir(exist_ok=True)
    (out / "keys" / ".part-00007.npy.tmp-99999").write_bytes(b"\x93NUMPY")
    done_before = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("part-*.parquet")
                   if (out / ".build" / "done" / p.with_suffix(".json").name).exists()}
    r = setup.rerun(out)
    assert "resuming" in r.stderr
    # the finished shards were kept, not redone
    assert {n: (out / "chunks" / n).stat().st_mtime_ns for n in done_before} == done_before
    assert_same_store(out, setup)


@pytest.mark.parametrize("seed", [2, 5])  # killed in the first shard; near the end
def test_kill_at_a_random_moment_then_resume(setup, tmp_path, seed):
    rng = random.Random(seed)
    after_shards, jitter = rng.randint(0, N_SHARDS), rng.uniform(0, 0.25)
    out = tmp_path / "ds"
    proc = setup.start(out, tmp_path / "stderr.txt")
    if after_shards == 0:  # somewhere in the first shard (the build state is written before any shard)
        wait_until(lambda: (out / ".build" / "state.json").exists(), proc)
    else:
        wait_until(lambda: n_done(out) >= after_shards or (out / "manifest.json").exists(), proc)
    time.sleep(jitter)
    kill9(proc)
    had_manifest, had_state = (out / "manifest.json").exists(), (out / ".build" / "state.json").exists()
    if not had_manifest:
        with pytest.raises(StoreError, match="unfinished"):
            Datastore.open(out)
    r = setup.rerun(out)
    if had_manifest:
        assert "already complete" in r.stderr
    elif had_state:
        assert "resuming" in r.stderr
    assert_same_store(out, setup)


def test_killed_between_manifest_and_cleanup(setup, tmp_path, monkeypatch):
    """Dying after the manifest is written but before ``.build`` is removed must not append the parts twice."""
    import ralm.datastore.build as build_mod

    class Killed(BaseException):
        pass

    class DiesRemovingBuildState:
        @staticmethod
        def rmtree(path, *a, **kw):
            if Path(path).name == ".build":
                raise Killed
            return shutil.rmtree(path, *a, **kw)

    out = tmp_path / "ds"
    monkeypatch.setattr(build_mod, "shutil", DiesRemovingBuildState)
    with pytest.raises(Killed):
        runner.invoke(app, setup.argv(out), catch_exceptions=False)
    monkeypatch.setattr(build_mod, "shutil", shutil)
    assert (out / "manifest.json").exists() and (out / ".build" / "state.json").exists()
    r = setup.rerun(out)
    assert "already complete" in r.stderr
    assert_same_store(out, setup)
    before = mtimes(out)
    assert "already complete" in setup.rerun(out).stderr
    assert mtimes(out) == before


def test_rerun_on_a_finished_store_says_so_and_changes_nothing(setup, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(setup.reference, out)
    before = mtimes(out)
    proc = subprocess.run([sys.executable, "-m", "ralm.cli", *setup.argv(out)], env=setup.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "already complete" in proc.stderr
    assert mtimes(out) == before
    assert_same_store(out, setup)


def test_force_starts_over(setup, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(setup.reference, out)
    before = mtimes(out)
    time.sleep(0.01)
    r = setup.rerun(out, "--force")
    assert "already complete" not in r.stderr
    after = mtimes(out)
    files = [p for p in after if (out / p).is_file()]
    assert all(after[p] != before[p] for p in files)  # every file rewritten
    assert_same_store(out, setup)


def test_resume_refuses_changed_inputs(tmp_path, build_config):
    from ralm.datastore import layout
    from ralm.datastore.build import _resolve_state, build
    from ralm.errors import RalmError

    src = write_corpus(tmp_path / "c.jsonl", n_docs=6)
    cfg = build_config([src], tmp_path / "ds")
    (tmp_path / "ds").mkdir()
    _resolve_state(cfg, tmp_path / "ds", None, log=lambda m: None)  # an unfinished build's state
    assert (tmp_path / "ds" / layout.BUILD_DIR / "state.json").exists()
    with open(src, "a") as f:
        f.write('{"id": "new", "text": "one more document"}\n')
    os.utime(src)
    with pytest.raises(RalmError, match="input files changed"):
        build(cfg, progress=False)
