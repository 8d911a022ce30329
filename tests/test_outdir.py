"""The output-folder state machine (``utils/outdir.py``) behind ``build``, ``knnlm build`` and ``retrofit``.

Issue 11 item 1: a second writer into a folder is refused at once, naming the holder; a lock left by a
``kill -9`` does not block. Item 2: ralm deletes only what it can prove it wrote, never through a link.
Item 5 (its unwritable ``--out`` case): one line and exit 2 before any model is loaded.

The first writer runs as a real ``python -m ralm.cli`` subprocess and is paused with SIGSTOP while it
holds the folder, so the second writer (in this process, through typer's runner) meets it every time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from badinput import cli_build, fails, good, runner, snapshot, summary_of, write_jsonl
from conftest import write_corpus
from ralm import Datastore
from ralm.cli import app

LOCK, MARKER = ".ralm.lock", ".ralm-owner.json"


def _env(tmp: Path) -> dict:
    return {**os.environ, "RALM_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _start(argv: list[str], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ralm.cli", *argv], env=_env(tmp),
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "first.err", "wb"))


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the first writer exited (rc {proc.returncode}) before holding the folder"
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the first writer never held the folder")
        time.sleep(0.005)


def _holds_lock(out: Path):
    def cond() -> bool:
        try:
            return '"pid"' in (out / LOCK).read_text()
        except OSError:
            return False
    return cond


def _finish(proc: subprocess.Popen, tmp: Path) -> None:
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=300) == 0, (tmp / "first.err").read_text()


def _no_models(monkeypatch) -> None:
    """Loading any model, tokenizer or encoder fails the test: a refusal must come before all of them."""
    import ralm.datastore.build as build_mod
    import ralm.lm.models as models
    import ralm.methods.knnlm_store as knnlm_store
    import ralm.tuning.retrofit as retrofit

    def boom(*a, **kw):
        raise AssertionError("a model was loaded before the output folder was checked")

    # `load` as the kNN-LM store builder and retrofit imported it at their tops, and at its source
    for mod, name in ((build_mod, "load_tokenizer"), (build_mod, "load_encoder"), (models, "load"),
                      (knnlm_store, "load"), (retrofit, "load")):
        monkeypatch.setattr(mod, name, boom)


def _refused_at_once(r, pid: int, t0: float) -> None:
    line = fails(r, "in use by another ralm process", f"pid {pid}", "since")
    assert "`" in line  # the holder's command line is named
    assert time.monotonic() - t0 < 5.0


# ---- item 1: one writer per folder ----------------------------------------------------------------
def test_two_concurrent_builds_second_refused_first_holds_only_its_input(tmp_path, build_args, monkeypatch):
    """Issue 11 item 1: the second build into one --out is refused at once naming the holder; the first's
    store holds exactly its own corpus (b165b45: both exit 0 and the store mixes the two corpora)."""
    a = write_corpus(tmp_path / "a.jsonl", n_docs=24, prefix="a")
    b = write_corpus(tmp_path / "b.jsonl", n_docs=10, seed=3, prefix="b")
    out = tmp_path / "conc"
    first = _start(["build", str(a), "--out", str(out), *build_args, "--shard-docs", "2"], tmp_path)
    _no_models(monkeypatch)
    # 1. while the first loads its models (the moment of the reproduction), 2. mid-build
    for moment in (_holds_lock(out), lambda: (out / ".build" / "state.json").exists()):
        _wait_for(moment, first)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            _refused_at_once(cli_build([b], out, build_args, "--shard-docs", "10"), first.pid, t0)
            # --force is no way around a live writer either
            _refused_at_once(cli_build([b], out, build_args, "--force"), first.pid, t0)
        finally:
            os.kill(first.pid, signal.SIGCONT)
    _finish(first, tmp_path)
    monkeypatch.undo()
    ds = Datastore.open(out, verify=True)
    assert ds.manifest["counts"]["documents"] == 24
    ids = {h.doc_id for hits in ds.search(["alpha river", "music ocean", "winter garden"], k=50) for h in hits}
    assert ids and all(i.startswith("a") for i in ids)
    assert not (out / LOCK).exists()  # released on exit


def test_a_lock_left_by_a_killed_build_does_not_block(tmp_path, build_args):
    """Issue 11 item 1: kill -9 leaves a lock file naming a pid that is gone; the rerun says so and resumes."""
    a = write_corpus(tmp_path / "a.jsonl", n_docs=24, prefix="a")
    out = tmp_path / "ds"
    argv = ["build", str(a), "--out", str(out), *build_args, "--shard-docs", "2"]
    first = _start(argv, tmp_path)
    _wait_for(lambda: (out / ".build" / "state.json").exists(), first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert json.loads((out / LOCK).read_text())["pid"] == first.pid  # the kernel dropped the lock, not the file
    r = runner.invoke(app, argv)
    assert r.exit_code == 0, r.output
    assert f"pid {first.pid}" in r.stderr and "gone" in r.stderr and "resuming" in r.stderr
    assert Datastore.open(out, verify=True).manifest["counts"]["documents"] == 24
    assert not (out / LOCK).exists()


def test_knnlm_build_second_writer_refused(tmp_path, tiny_lm, monkeypatch):
    """Issue 11 item 1 for ``ralm knnlm build``: refused at once, before the LM is loaded, naming the holder."""
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=6, words=60)
    out = tmp_path / "knn"
    args = ["--model", tiny_lm, "--context", "32", "--window-stride", "16", "--index", "flat", "-q"]
    first = _start(["knnlm", "build", str(corpus), "--out", str(out), *args], tmp_path)
    _wait_for(_holds_lock(out), first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        _no_models(monkeypatch)
        t0 = time.monotonic()
        _refused_at_once(runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(out), *args]), first.pid, t0)
    finally:
        _finish(first, tmp_path)
    assert (out / "manifest.json").exists() and not (out / LOCK).exists()


def test_retrofit_second_writer_refused(tmp_path, tiny_lm, build_config, monkeypatch):
    """Issue 11 item 1 for ``ralm retrofit --out``: refused at once, before the LM is loaded, naming the holder."""
    from ralm.datastore.build import build

    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=8, words=90)
    ds = tmp_path / "ds"
    build(build_config([corpus], ds), log=lambda m: None, progress=False)
    out = tmp_path / "run"
    argv = ["retrofit", "--datastore", str(ds), "--train", str(corpus), "--out", str(out), "--model", tiny_lm,
            "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--chunk-size", "16", "--cca-layers", "1",
            "--enc-dim", "16", "--enc-layers", "1", "--cca-dim", "16", "--eval-every", "0", "--no-bf16", "-q"]
    first = _start(argv, tmp_path)
    _wait_for(_holds_lock(out), first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        _no_models(monkeypatch)
        t0 = time.monotonic()
        _refused_at_once(runner.invoke(app, argv), first.pid, t0)
        _refused_at_once(runner.invoke(app, [*argv, "--force"]), first.pid, t0)
    finally:
        _finish(first, tmp_path)
    assert (out / "retro.json").exists() and not (out / LOCK).exists()


# ---- item 2: remove only what ralm wrote ----------------------------------------------------------
def _web_app(root: Path) -> Path:
    root.mkdir()
    (root / "manifest.json").write_text('{"name": "my web app", "start_url": "/"}')  # a PWA manifest
    (root / ".build").mkdir()
    (root / ".build" / "bundle.js").write_text("console.log(1)")
    (root / "src").mkdir()
    (root / "src" / "app.js").write_text("export default 42")
    (root / "package.json").write_text("{}")
    return root


def test_force_on_a_web_app_folder_deletes_nothing(tmp_path, corpus, build_args):
    """Issue 11 item 2: a folder with a manifest.json and a .build/ is not a store; --force deletes nothing
    and names what is not ralm's (b165b45 deleted the web app's src/)."""
    app_dir = _web_app(tmp_path / "webapp")
    before = snapshot(app_dir)
    fails(cli_build([corpus], app_dir, build_args, "--force"), str(app_dir), "not a ralm datastore", "--force",
          "is not a file ralm writes")
    assert snapshot(app_dir) == before
    fails(cli_build([corpus], app_dir, build_args), "not a ralm datastore")
    fails(runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(app_dir), "--force"]), "kNN-LM")
    assert snapshot(app_dir) == before


def test_force_on_a_store_holding_a_foreign_file_deletes_nothing(tmp_path, corpus, build_config, build_args):
    """Issue 11 item 2: even a real store is not emptied by --force when it holds a file ralm did not write."""
    from ralm.datastore.build import build

    out = tmp_path / "ds"
    build(build_config([corpus], out), log=lambda m: None, progress=False)
    (out / "notes.txt").write_text("my notes about this store")
    before = snapshot(out)
    fails(cli_build([corpus], out, build_args, "--force"), "notes.txt", "--force")
    assert snapshot(out) == before


def test_failed_first_build_into_a_folder_with_build_dir_keeps_thesis(tmp_path, build_args):
    """Issue 11 item 2: a failed first build into a folder holding .build/ and thesis.tex leaves both
    (b165b45 emptied the folder)."""
    bad = write_jsonl(tmp_path / "malformed.jsonl", [good(0), '{"id": "x", "text": "unterminated'])
    proj = tmp_path / "proj3"
    (proj / ".build").mkdir(parents=True)
    (proj / "thesis.tex").write_text("\\documentclass{article} years of work")
    before = snapshot(proj)
    fails(cli_build([bad], proj, build_args), str(proj), "thesis.tex")
    assert snapshot(proj) == before


def test_failed_start_in_a_claimed_folder_keeps_a_foreign_file(tmp_path, build_args):
    """Issue 11 item 2: the failed-start cleanup deletes nothing when the folder holds a foreign file, and its
    one error line says so."""
    bad = write_jsonl(tmp_path / "malformed.jsonl", [good(0), '{"id": "x", "text": "unterminated'])
    out = tmp_path / "ds"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": "ralm-folder", "version": 1, "kind": "datastore"}))
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    fails(cli_build([bad], out, build_args), f"{bad}:2", "left as it was", "notes.txt")
    after = snapshot(out)
    assert {k: after.get(k) for k in before} == before  # nothing deleted (its own .build/ stays too)


@pytest.mark.parametrize("linked", ["index", "keys"])
def test_add_or_force_on_a_store_with_a_symlinked_folder_deletes_nothing_in_the_target(
        tmp_path, corpus, build_config, build_args, linked):
    """Issue 11 item 2: ``build --add`` on a store whose index/ is a symlink deleted the files in the link's
    target at b165b45; now a link inside a store is refused before anything is written or removed."""
    from ralm.datastore.build import build

    out = tmp_path / "ds"
    build(build_config([corpus], out), log=lambda m: None, progress=False)
    target = tmp_path / "elsewhere"
    (out / linked).rename(target)
    (target / "precious.txt").write_text("not ralm's")
    (out / linked).symlink_to(target, target_is_directory=True)
    before = snapshot(target)
    more = write_corpus(tmp_path / "more.jsonl", n_docs=3, seed=9, prefix="m")
    fails(cli_build([more], out, build_args, "--add"), linked, "symbolic link")
    fails(cli_build([corpus], out, build_args, "--force"), linked, "symbolic link")
    assert snapshot(target) == before
    assert (out / linked).is_symlink()


def test_add_removes_only_the_old_index_generation(tmp_path, corpus, build_config, build_args):
    """Issue 11 item 2: the stale-generation cleanup after ``--add`` removes ralm's old index files only
    (b165b45 removed everything in index/ that was not the new generation)."""
    from ralm.datastore.build import build

    out = tmp_path / "ds"
    build(build_config([corpus], out), log=lambda m: None, progress=False)
    (out / "index" / "README.txt").write_text("what this index is")
    more = write_corpus(tmp_path / "more.jsonl", n_docs=3, seed=9, prefix="m")
    summary_of(cli_build([more], out, build_args, "--add", "--json"))
    assert sorted(p.name for p in (out / "index").iterdir()) == ["README.txt", "dense-g0002.faiss", "dense-g0002.json"]


def test_another_kinds_folder_is_refused(tmp_path, corpus, build_config, tiny_lm):
    """Issue 11 item 2: a datastore is no kNN-LM store or RETRO-fit run to --force away."""
    from ralm.datastore.build import build

    out = tmp_path / "ds"
    build(build_config([corpus], out), log=lambda m: None, progress=False)
    before = snapshot(out)
    fails(runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(out), "--model", tiny_lm, "--force"]),
          "ralm datastore", "not a ralm kNN-LM store")
    assert snapshot(out) == before


# ---- stores made before the marker: still ralm's ---------------------------------------------------
def test_store_without_marker_still_completes_and_forces(tmp_path, corpus, build_config, build_args):
    """Compatibility (issue 11 item 2): a store built before owner markers, holding only ralm's names, is
    still "already complete" and still --force-able; with a foreign file it is refused."""
    from ralm.datastore.build import build

    out = tmp_path / "ds"
    build(build_config([corpus], out), log=lambda m: None, progress=False)
    (out / MARKER).unlink()
    before = snapshot(out)
    r = cli_build([corpus], out, build_args)
    assert r.exit_code == 0 and "already complete" in r.stderr
    assert snapshot(out) == before
    assert summary_of(cli_build([corpus], out, build_args, "--force", "--json"))["documents"] == 30
    assert json.loads((out / MARKER).read_text())["kind"] == "datastore"
    (out / MARKER).unlink()
    (out / "thesis.tex").write_text("x")
    before = snapshot(out)
    fails(cli_build([corpus], out, build_args, "--force"), "thesis.tex", "not a ralm datastore")
    assert snapshot(out) == before


def test_unfinished_build_without_marker_resumes(tmp_path, corpus, build_config, monkeypatch):
    """Compatibility: an unfinished build from before owner markers resumes with the same command."""
    import ralm.datastore.build as build_mod

    out = tmp_path / "ds"
    real, calls = build_mod.process_shard, []

    def dying(task):
        if calls:
            raise KeyboardInterrupt
        calls.append(task.part)
        return real(task)

    monkeypatch.setattr(build_mod, "process_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_mod.build(build_config([corpus], out, shard_docs=7), log=lambda m: None, progress=False)
    monkeypatch.setattr(build_mod, "process_shard", real)
    (out / MARKER).unlink()
    logs: list[str] = []
    s = build_mod.build(build_config([corpus], out, shard_docs=7), log=logs.append, progress=False)
    assert s["documents"] == 30 and any("resuming" in m for m in logs)


# ---- item 5: unwritable --out is one line, before any model --------------------------------------
def _unwritable(tmp_path: Path, how: str) -> Path:
    if how == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "ds"
    sysfs = Path("/sys/fs")  # sysfs refuses new files even to root, which ignores chmod
    try:
        (sysfs / ".ralm-probe").touch()
    except OSError:
        return sysfs
    (sysfs / ".ralm-probe").unlink()
    pytest.skip("/sys/fs is writable here")


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
@pytest.mark.parametrize("command", ["build", "knnlm", "retrofit"])
def test_unwritable_out_is_one_line_before_any_model_load(tmp_path, corpus, build_args, monkeypatch, how, command):
    """Issue 11 item 5 (unwritable --out): one line and exit 2 before any model load (b165b45: a traceback
    after the models loaded)."""
    out = _unwritable(tmp_path, how)
    _no_models(monkeypatch)
    argv = {"build": ["build", str(corpus), "--out", str(out), *build_args],
            "knnlm": ["knnlm", "build", str(corpus), "--out", str(out), "-q"],
            "retrofit": ["retrofit", "--datastore", str(tmp_path), "--train", str(corpus), "--out", str(out), "-q"]}
    r = runner.invoke(app, argv[command])
    assert r.exit_code == 2
    fails(r, "--out", str(out), "not a directory" if how == "under-a-file" else "not writable")


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    """Issue 11 item 1, at the API: flock is per open file, so a second ``open_out`` is refused even here."""
    from ralm.datastore.layout import KIND
    from ralm.errors import RalmError
    from ralm.utils.outdir import open_out

    with open_out(tmp_path / "x", KIND, log=lambda m: None):
        with pytest.raises(RalmError, match=f"pid {os.getpid()}"):
            with open_out(tmp_path / "x", KIND, log=lambda m: None):
                pass
    assert not (tmp_path / "x").exists()  # made for the write, nothing written: gone again
