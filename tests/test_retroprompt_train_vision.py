"""``ralm retroprompt train --data fashion-mnist`` (issue 14): the RetroPrompt trainer over the vision backbone.
Generated idx files in the Fashion-MNIST layout; a fake network stands in for EfficientNet-Lite0 behind the
real feature cache (nothing is downloaded). The store, loss, demonstrations, refresh and λ are the text
trainer's (tests/test_retroprompt_train.py); here: that they run on images, resume, reproduce, and that a flag
of the other kind of data is refused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file

import ralm.tuning.retroprompt as rp
from badinput import fails, write_jsonl
from ralm.data.tasks.fashion_mnist import CLASSES
from ralm.errors import RalmError
from ralm.tuning.retroprompt_config import RUN, WEIGHTS, draw
from rp_vision_data import FakeNet, config, fashion


@pytest.fixture(autouse=True)
def fake_net(monkeypatch):
    FakeNet.install(monkeypatch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fashion(tmp_path_factory.mktemp("fm") / "fashion_mnist")



def test_a_vision_run_learns_and_reproduces_its_accuracy(folder, tmp_path):
    cfg = config(folder, tmp_path / "run", steps=30)
    s = rp.train_retroprompt(cfg, progress=False)
    assert s["steps"] == 30 and s["trained_examples"] == 120 and s["test"]["examples"] == 20
    assert s["store"]["refreshes"] == 5  # 20 examples, batch 4: an epoch is 5 steps (refreshed at 5, ..., 25)
    assert s["test"]["accuracy_model"] >= 0.4 and s["test"]["accuracy_knn"] >= 0.6  # chance: 0.1
    assert FakeNet.loads == 1  # the frozen network once per run
    # each split's features: one cache file (train, dev, test)
    assert sorted(p.name.split("-112px")[0] for p in (tmp_path / "features").glob("*.npy")) == [
        "fashion-mnist-dev-2shot-seed13", "fashion-mnist-test", "fashion-mnist-train-2shot-seed13"]
    assert set(load_file(str(tmp_path / "run" / WEIGHTS))) == {n for n, _ in rp.VisionBackbone(
        CLASSES, cfg.vision).module().named_parameters()}  # the head, nothing else
    meta = json.loads((tmp_path / "run" / RUN).read_text())
    assert meta["model_fingerprint"] == "efficientnet-lite0@112px" and meta["classes"] == list(CLASSES)
    for split in ("dev", "test"):
        again = rp.evaluate_retroprompt(tmp_path / "run", split)
        assert again["accuracy"] == s[split]["accuracy"] and again["lmbda"] == s["lmbda"]
    with pytest.raises(RalmError, match="efficientnet-lite0@224px"):  # the features would differ
        meta["config"]["vision"]["resolution"] = 224
        (tmp_path / "run" / RUN).write_text(json.dumps(meta))
        rp.evaluate_retroprompt(tmp_path / "run")


def interrupted(fn, at_call: int):
    """``fn`` that raises KeyboardInterrupt (a kill) on its ``at_call``-th call."""
    calls = itertools.count(1)

    def wrapped(*a, **kw):
        if next(calls) == at_call:
            raise KeyboardInterrupt
        return fn(*a, **kw)

    return wrapped


def test_a_killed_vision_run_resumes_to_the_uninterrupted_weights(folder, tmp_path, monkeypatch):
    """Dropout on: the resumed run must continue the global RNG where the uninterrupted one was."""
    whole = rp.train_retroprompt(config(folder, tmp_path / "whole", refresh="2"), progress=False)
    cfg = config(folder, tmp_path / "run", refresh="2")
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(rp, "training_loss", interrupted(rp.training_loss, at_call=4))
        rp.train_retroprompt(cfg, progress=False)
    again = rp.train_retroprompt(cfg, progress=False)
    assert again["resumed_at_step"] == 3
    a, b = load_file(str(tmp_path / "run" / WEIGHTS)), load_file(str(tmp_path / "whole" / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again["test"] == whole["test"] and again["dev"] == whole["dev"]
    # dropout draws on the RNG the resumption restores: without it the weights differ (the check can fail)
    rp.train_retroprompt(config(folder, tmp_path / "plain", refresh="2", vision={"dropout": 0.0}), progress=False)
    c = load_file(str(tmp_path / "plain" / WEIGHTS))
    assert not torch.equal(c["classifier.weight"], b["classifier.weight"])


def test_the_draw_reads_the_image_set(folder, tmp_path):
    d = draw(config(folder, tmp_path / "run"))
    assert d.classes == CLASSES and len(d.split.train) == len(d.split.dev) == 20 and len(d.test) == 20
    assert all(e.image.shape == (28, 28) for e in d.split.train)


def cli(args: list[str]):
    from typer.testing import CliRunner

    from ralm.cli import app

    return CliRunner().invoke(app, args)


def test_the_cli_trains_and_evaluates_images(folder, tmp_path):
    args = ["retroprompt", "train", "--data", "fashion-mnist", "--data-file", str(folder), "--out",
            str(tmp_path / "run"), "--shots", "2", "--k", "3", "--demos", "1", "--steps", "3", "--batch-size", "4",
            "--head", "mlp", "--dim", "8", "--hidden", "16", "--feature-cache", str(tmp_path / "f"), "--quiet",
            "--json"]
    r = cli(args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    r = cli(["retroprompt", "eval", "--run", str(tmp_path / "run"), "--json", "--quiet"])
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == s["test"]["accuracy"], r.output
    assert "body.4.weight" in load_file(str(tmp_path / "run" / WEIGHTS))  # the mlp head's last layer


def test_a_flag_of_the_other_kind_of_data_is_a_one_line_error(folder, tmp_path):
    images = ["retroprompt", "train", "--data", "fashion-mnist", "--data-file", str(folder), "--out",
              str(tmp_path / "run")]
    fails(cli([*images, "--template", "{text} It was"]), "--template is for text data, not --data fashion-mnist")
    fails(cli([*images, "--model", "gpt2"]), "--model is for text data")
    fails(cli([*images, "--peft", "lora"]), "--peft is for text data")
    fails(cli([*images, "--max-tokens", "9"]), "--max-tokens is for text data")
    fails(cli([*images, "--resolution", "8"]), "--resolution 8: must be an integer from 32 to 1024")
    fails(cli([*images, "--head", "conv"]), "--head 'conv': choose linear or mlp")
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": f"t {i}", "label": "ab"[i % 2]} for i in range(20)])
    text = ["retroprompt", "train", "--data", str(texts), "--template", "{text} It was", "--verbalizer", "a=x",
            "--verbalizer", "b=y", "--out", str(tmp_path / "run")]
    for flag, value in (("--head", "mlp"), ("--dim", "4"), ("--resolution", "64"), ("--device", "cuda")):
        fails(cli([*text, flag, value]), f"{flag} is for image data (--data fashion-mnist), not {texts}")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
