"""Cases that raised a traceback where one ``error:`` line and exit 2 are promised (issue 11, items 5 and 7).

A full disk is simulated by making the writers raise what they raise on a full disk (FAISS's RuntimeError
text, pyarrow's OSError with errno 28, numpy's errno-less short write); no file system is mounted.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from badinput import cli_build, fails, no_store, runner, write_jsonl
from conftest import write_corpus
from ralm.cli import app

FAISS_ENOSPC = ("Error in void faiss::write_index(const Index*, IOWriter*, int) at /project/faiss/impl/"
                "index_write.cpp:499: Error: 'ret == (size * 4)' failed: write error in {}: 4051 != 32000 "
                "(No space left on device)")


def part_mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for sub in ("chunks", "keys") for p in (out / sub).glob("part-*")}


def no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], sorted(out.rglob("*"))


@pytest.fixture
def corpus12(tmp_path) -> Path:
    return write_corpus(tmp_path / "c.jsonl", n_docs=12, words=60)


def test_full_disk_at_index_write_is_one_line_and_a_rerun_resumes(tmp_path, corpus12, build_args, monkeypatch):
    """Issue 11 item 5: FAISS "No space left on device" at the index write -> one line, exit 2, rerun resumes."""
    import faiss

    real = faiss.write_index

    def full(index, path):
        raise RuntimeError(FAISS_ENOSPC.format(path))

    out = tmp_path / "ds"
    monkeypatch.setattr(faiss, "write_index", full)
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4")
    fails(r, "dense-g0001.faiss", "disk is full", only=False)  # after the "indexing N chunks" progress line
    assert r.exit_code == 2
    assert not (out / "manifest.json").exists()
    no_temp_files(out)
    before = part_mtimes(out)
    assert len(before) == 6  # 3 shards x (chunks, keys): all finished and kept

    monkeypatch.setattr(faiss, "write_index", real)  # space freed
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr
    assert part_mtimes(out) == before  # no shard encoded again
    assert (out / "manifest.json").exists()


def test_full_disk_on_a_part_write_is_one_line_and_a_rerun_resumes(tmp_path, corpus12, build_args, monkeypatch):
    """Issue 11 item 5: OSError (errno 28) writing a chunks part -> one line naming the part; rerun resumes."""
    import pyarrow.parquet as pq

    real = pq.write_table
    calls = []

    def second_fails(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            Path(where).write_bytes(b"PAR1 half")  # what a full disk leaves: a truncated temp file
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(table, where, **kw)

    out = tmp_path / "ds"
    monkeypatch.setattr(pq, "write_table", second_fails)
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4")
    fails(r, "part-00001", "disk is full")
    assert r.exit_code == 2
    no_temp_files(out)
    assert not (out / "manifest.json").exists()
    before = part_mtimes(out)
    assert sorted(before) == ["part-00000.npy", "part-00000.parquet"]

    monkeypatch.setattr(pq, "write_table", real)
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4")
    assert r.exit_code == 0, r.output
    assert "resuming" in r.stderr
    after = part_mtimes(out)
    assert {k: after[k] for k in before} == before and len(after) == 6


def test_full_disk_on_a_keys_write_without_errno(tmp_path, corpus12, build_args, monkeypatch):
    """Issue 11 item 5: numpy's short write carries no errno; with no free space it is still the full disk."""
    def short(f, arr, *a, **kw):
        f.write(b"\x93NUMPY")
        raise OSError("100000 requested and 12484 written")

    out = tmp_path / "ds"
    monkeypatch.setattr(np, "save", short)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4")
    fails(r, "part-00000.npy", "disk is full")
    no_store(out)  # nothing finished: nothing kept


@pytest.mark.parametrize(("code", "needle"), [(errno.EDQUOT, "quota"), (errno.EROFS, "read-only")])
def test_quota_and_read_only_writes_are_one_line(tmp_path, code, needle):
    """Issue 11 item 5: a quota or a read-only file system at any atomic write is a RalmError naming the file."""
    from ralm.errors import RalmError
    from ralm.utils.atomic import atomic_path

    dest = tmp_path / "x.json"
    with pytest.raises(RalmError, match=needle) as e, atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise OSError(code, "stopped")
    assert str(dest) in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone


def test_cli_top_level_maps_disk_errors_and_keeps_bugs(monkeypatch, capsys):
    """Issue 11 item 5: a full disk outside the atomic writers still ends as one line and exit 2."""
    import ralm.cli as cli

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/retro.safetensors")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "retro.safetensors" in err[0] and "full" in err[0]

    def bug():
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not a disk error: the traceback stays
        cli.main()


def test_malformed_memory_budget_names_the_flag_and_the_forms(tmp_path, corpus12, build_args):
    """Issue 11 item 5: ``--memory-budget 1.2.3GB`` -> one line naming the flag and the accepted forms."""
    from ralm.datastore.index import parse_bytes
    from ralm.errors import RalmError

    out = tmp_path / "ds"
    r = cli_build([corpus12], out, build_args, "--memory-budget", "1.2.3GB")
    fails(r, "--memory-budget", "1.2.3GB", "512MB", "4GB")
    no_store(out)
    for bad in ("1.2.3GB", "0GB", "GB", "4XB", "-1GB"):
        with pytest.raises(RalmError, match="--memory-budget"):
            parse_bytes(bad)
    assert parse_bytes("1.5GB") == int(1.5 * 1024**3) and parse_bytes(".5k") == 512 and parse_bytes("2GiB") == 2 << 30


def test_factory_faiss_cannot_build_is_refused_before_encoding(tmp_path, corpus12, build_args, monkeypatch):
    """Issue 11 item 5: a factory string is checked with FAISS on the encoder's dim before any shard is encoded."""
    import ralm.datastore.build as build

    encoded = []
    monkeypatch.setattr(build, "process_shard", lambda task: encoded.append(task) or 1 / 0)
    out = tmp_path / "ds"
    r = cli_build([corpus12], out, build_args, "--index", "IVF16,PQ7")  # the tiny encoder's dim 32 % 7 != 0
    fails(r, "--index IVF16,PQ7", "32-dim", "multiple of the number of subquantizers")
    assert encoded == []
    no_store(out)


def test_ivf_with_more_lists_than_chunks_then_a_corrected_rerun_reuses_the_shards(tmp_path, corpus12, build_args):
    """Issue 11 item 5: ``--index IVF99999999,Flat`` on a small store says why in one line; a rerun with a
    corrected ``--index`` reuses the finished shards instead of refusing "other parameters"."""
    out = tmp_path / "ds"
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4", "--index", "IVF99999999,Flat")
    line = fails(r, "--index IVF99999999,Flat", "nlist 99,999,999", "~3,899,999,961", "finished shards",
                 only=False)
    n_chunks = int(line.split("the store has ")[1].split()[0].replace(",", ""))
    assert 0 < n_chunks < 1000
    assert r.exit_code == 2 and not (out / "manifest.json").exists()
    no_temp_files(out)
    before = part_mtimes(out)
    assert len(before) == 6

    r = cli_build([corpus12], out, build_args, "--shard-docs", "4", "--index", "IVF4,Flat")
    assert r.exit_code == 0, r.output
    assert part_mtimes(out) == before  # not encoded again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["index"]["meta"]["factory"] == "IVF4,Flat"
    assert manifest["build"]["params"]["index"]["kind"] == "IVF4,Flat"
    assert manifest["counts"]["chunks"] == n_chunks
    r = cli_build([corpus12], out, build_args, "--shard-docs", "4", "--index", "IVF4,Flat")
    assert r.exit_code == 0 and "already complete" in r.stderr


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer, tiny_encoder) -> Path:
    base = tmp_path_factory.mktemp("tb-store")
    out = base / "ds"
    r = runner.invoke(app, ["build", str(write_corpus(base / "c.jsonl", n_docs=6)), "--out", str(out),
                            "--tokenizer", tiny_tokenizer, "--encoder", tiny_encoder, "--encoder-dtype", "fp32",
                            "--chunk-tokens", "16", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_empty_queries_are_refused_the_same_way(store, tmp_path):
    """Issue 11 item 7: an empty QUERY and a blank line of --queries-file are both refused, naming it."""
    fails(runner.invoke(app, ["search", str(store), ""]), "QUERY 1", "empty query")
    fails(runner.invoke(app, ["search", str(store), "alpha river", "   "]), "QUERY 2", "empty query")
    qf = tmp_path / "q.txt"
    qf.write_text("alpha river\n\nocean planet\n", encoding="utf-8")
    fails(runner.invoke(app, ["search", str(store), "--queries-file", str(qf)]), f"{qf}:2", "empty query")
    qf.write_text("alpha river\nocean planet\n", encoding="utf-8")
    r = runner.invoke(app, ["search", str(store), "--queries-file", str(qf), "--json"])
    assert r.exit_code == 0 and [q["query"] for q in json.loads(r.stdout)] == ["alpha river", "ocean planet"]


def test_eval_lm_empty_data_names_the_file(tmp_path):
    """Issue 11 item 7: eval-lm on a file with no documents names it (and says so before loading any model)."""
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   ", '{"id": "a", "text": "  "}'])
    r = runner.invoke(app, ["eval-lm", "--model", str(tmp_path / "no-such-model"), "--data", str(empty), "-q"])
    fails(r, "--data", str(empty), "no documents", "blank")


def test_chunks_longer_than_the_encoder_reads_warn(tmp_path, corpus12, build_args):
    """Issue 11 item 7: ``--chunk-tokens 8192 --no-continuation`` warns that the encoder truncates (at 256 here)."""
    out = tmp_path / "ds"
    r = cli_build([corpus12], out, build_args, "--chunk-tokens", "8192", "--no-continuation")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--chunk-tokens 8192" in warnings[0] and "256" in warnings[0], r.stderr
    r = cli_build([corpus12], tmp_path / "ds2", build_args)  # 16-token chunks fit: no warning
    assert r.exit_code == 0 and "warning" not in r.stderr
