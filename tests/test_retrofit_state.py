"""RETRO-fit resumption state (issue 11): no pickle is ever loaded, a malformed state is one line + exit 2,
a resumed run counts all its tokens, and every checkpoint file gets the permissions the umask gives."""

from __future__ import annotations

import json
import os
import shlex
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import test_retrofit
from badinput import fails
from ralm.cli import app
from ralm.methods.retro.checkpoint import load_retrofit
from ralm.tuning.retrofit import retrofit
from test_retrofit import edit_trainer_state, kill_after_step_2, small_retro, train_cfg

setup = test_retrofit.setup  # test_retrofit's tiny store and corpora (a module fixture, built once here too)
runner = CliRunner()
STATE = "trainer.safetensors"


def cli_args(setup, tiny_lm, out, *extra: str) -> list[str]:
    """The CLI form of test_retrofit's train_cfg (default heads: 4, which divide the widths of 16)."""
    root, corpus, held, ds = setup
    return ["retrofit", "--model", tiny_lm, "--datastore", str(ds), "--train", str(corpus), "--eval", str(held),
            "--out", str(out), "--chunk-size", "16", "--enc-dim", "16", "--enc-layers", "1", "--cca-dim", "16",
            "--seq-len", "64", "--batch-size", "2", "--warmup", "1", "--lr", "0.01", "--eval-every", "2",
            "--save-every", "2", "--no-bf16", "-q", "--json", *extra]


@pytest.fixture(scope="module")
def run(setup, tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("state") / "run"
    r = runner.invoke(app, cli_args(setup, tiny_lm, out, "--steps", "4"))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


class _RunsCode:
    """Unpickling this runs a shell command (here: it creates a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("name", ["trainer.pt", STATE])
def test_a_crafted_pickle_state_is_refused_unread(setup, tiny_lm, copy, tmp_path, name):
    """Issue 11 item 3: a crafted pickle in the run folder is never unpickled; one line says what to do."""
    marker = tmp_path / "pwned"
    (copy / STATE).unlink(missing_ok=True)  # as an older ralm left it (or an attacker)
    torch.save(_RunsCode(marker), copy / name)
    r = runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6"))
    assert r.exit_code == 2
    fails(r, name, "--force")
    assert not marker.exists(), "the pickle ran"
    # the user checkpoint beside it still loads for eval-lm
    load_retrofit(copy, AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm))
    if name == "trainer.pt":  # --force starts over, still without reading it, and removes it
        r = runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "1", "--force"))
        assert r.exit_code == 0, r.output
        assert not marker.exists() and not (copy / name).exists() and (copy / STATE).exists()


def test_an_old_trainer_pt_missing_a_key_is_one_line(setup, tiny_lm, copy):
    """Issue 11 item 5: "a trainer.pt missing a key" was a KeyError traceback; now no trainer.pt is read."""
    torch.save({"step": 2}, copy / "trainer.pt")
    r = runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6"))
    assert r.exit_code == 2
    fails(r, "trainer.pt", "never loaded", "--force")


@pytest.mark.parametrize(("changes", "needle"), [
    ({"step": None}, "no 'step'"), ({"optimizer": None}, "no 'optimizer'"), ({"rng": None}, "no 'rng'"),
    ({"resume_key": None}, "no 'resume_key'"), ({"step": "2"}, "'step' is str"),
    ({"trained_tokens": 1.5}, "'trained_tokens' is float"), ({"resume_key": []}, "'resume_key' is list"),
    ({"step": -1}, "out of range"), ({"rng": {"cpu": [1, 2], "cuda": []}}, "'rng'"),
    ({"optimizer": {"param_groups": []}}, "'optimizer'"), ({"version": 1}, "trainer state format 1"),
    ({"format": "other"}, "not a RETRO-fit trainer state"),
    ({"format": "ralm-retrofit-trainer", "version": 2}, "trainer state format 2"),  # before the shared loop
    ({"scheduler": {"last_epoch": 2}}, "scheduler is missing or of the wrong type"),
])
def test_a_state_with_a_missing_or_ill_typed_key_is_one_line(setup, tiny_lm, copy, changes, needle):
    """Issue 11 item 5: a trainer state missing a key (or holding one of the wrong type) is one line + exit 2."""
    edit_trainer_state(copy / STATE, **changes)
    r = runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6"))
    assert r.exit_code == 2
    fails(r, STATE, needle)


def test_ill_typed_optimizer_values_are_one_line(setup, tiny_lm, copy):
    """Issue 11 item 5: values deep in the optimiser's JSON are checked too (here a learning rate as text)."""
    from safetensors import safe_open

    with safe_open(str(copy / STATE), "pt") as f:
        opt = json.loads(f.metadata()["ralm"])["optimizer"]
    opt["param_groups"][1]["lr"] = "0.01"
    edit_trainer_state(copy / STATE, optimizer=opt)
    fails(runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6")), STATE,
          "optimizer.param_groups[1].lr is missing or of the wrong type")


def _rewrite_tensors(path, edit) -> None:
    """Apply ``edit`` to a state's tensors and write them back with a matching checksum."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ralm.tuning.state import digest as _digest

    with safe_open(str(path), "pt") as f:
        head, tensors = json.loads(f.metadata()["ralm"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    head["sha256"] = _digest(tensors)
    save_file(tensors, str(path), metadata={"ralm": json.dumps(head)})


def _first(tensors, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix) and tensors[k].ndim == 2)


def _flip_last_data_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), "unreadable RETRO-fit trainer state"),
    (lambda p: p.write_bytes(b"\x00" * 7), "unreadable RETRO-fit trainer state"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not a state at all " * 20), "unreadable RETRO-fit trainer state"),
    (_flip_last_data_byte, "checksum"),
    (lambda p: _rewrite_tensors(p, lambda t: t.update({(k := _first(t, "weights.")): t[k].T.contiguous()})),
     "has shape"),
    (lambda p: _rewrite_tensors(p, lambda t: t.update({(k := _first(t, "optimizer.")): t[k][:1].contiguous()})),
     "optimizer tensor"),
    (lambda p: _rewrite_tensors(p, lambda t: t.pop(next(k for k in t if k.endswith(".exp_avg_sq")))),
     "optimizer state of parameter"),
    (lambda p: _rewrite_tensors(p, lambda t: t.update({"optimizer.999.step": torch.tensor(1.0)})),
     "parameter '999'"),
    (lambda p: _rewrite_tensors(p, lambda t: t.update({"extra": torch.zeros(2)})), "unknown tensors"),
    (lambda p: _rewrite_tensors(p, lambda t: t.pop(_first(t, "weights."))), "does not fit"),
])
def test_a_corrupt_state_file_is_one_line(setup, tiny_lm, copy, damage, needle):
    """Issue 11 items 3 and 5: a truncated, foreign, bit-flipped or ill-shaped state: one line + exit 2."""
    damage(copy / STATE)
    r = runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6"))
    assert r.exit_code == 2
    fails(r, STATE, needle)


def test_a_corrupt_training_log_is_one_line(setup, tiny_lm, copy):
    """Issue 11 item 5: the log truncated on resume holding a line that is no log row: one line + exit 2."""
    with open(copy / "train_log.jsonl", "a") as f:
        f.write("{not json\n")
    fails(runner.invoke(app, cli_args(setup, tiny_lm, copy, "--steps", "6")), "train_log.jsonl", "line 5")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_resumed_run_counts_every_token_and_logs_what_an_uninterrupted_one_does(setup, tiny_lm, tmp_path,
                                                                                  monkeypatch, dropout):
    """Issue 11 item 7: trained_tokens after a resume counts the whole run (summary and log); with dropout
    the restored RNG states keep the resumed run exact."""
    cfg = {"retro": small_retro(dropout=dropout)}
    whole = retrofit(train_cfg(setup, tiny_lm, tmp_path / "whole", **cfg), progress=False)
    kill_after_step_2(monkeypatch, train_cfg(setup, tiny_lm, tmp_path / "resumed", **cfg))
    resumed = retrofit(train_cfg(setup, tiny_lm, tmp_path / "resumed", **cfg), progress=False)
    assert resumed["trained_tokens"] == whole["trained_tokens"] > 0
    assert resumed["resumed_at_step"] == 2 and whole["resumed_at_step"] == 0

    def log(name):
        rows = [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "elapsed_s")} for r in rows]

    a, b = log("whole"), log("resumed")
    assert [r["trained_tokens"] for r in a] == [r["trained_tokens"] for r in b]
    assert a[-1]["trained_tokens"] == whole["trained_tokens"]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x == pytest.approx(y, rel=1e-4, abs=1e-5), (x, y)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_checkpoint_file_gets_the_umask_mode(setup, tiny_lm, tmp_path, umask):
    """Issue 11 item 7: retro.safetensors (and the trainer state) were 0600 (safetensors' own temporary
    file); every file of a run gets 0666 & ~umask like any other file the user writes."""
    old = os.umask(umask)
    try:
        retrofit(train_cfg(setup, tiny_lm, tmp_path / "run", steps=2), progress=False)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert {p.name for p in files} >= {"retro.safetensors", "retro.json", STATE, "train_log.jsonl"}
