"""``ralm retroprompt train --data fashion-mnist`` (issue 14): the RetroPrompt trainer over the vision backbone.
Generated idx files in the Fashion-MNIST layout; a fake network stands in for EfficientNet-Lite0 behind the
real feature cache (nothing is downloaded). The store, loss, demonstrations, refresh and λ are the text
trainer's (tests/test_retroprompt_train.py); here: that they run on images, resume, reproduce, and that a flag
of the other kind of data is refused."""

from __future__ import annotations

import gzip
import itertools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ralm.tuning.retroprompt as rp
from badinput import fails, write_jsonl
from ralm.data.tasks.fashion_mnist import CLASSES
from ralm.errors import RalmError
from ralm.lm import vision as lm_vision
from ralm.tuning.retroprompt_config import RUN, WEIGHTS, RetroPromptConfig, draw

PROJ = np.random.default_rng(0).standard_normal((49, lm_vision.FEATURE_DIM)).astype(np.float32)


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def fashion(folder: Path, per_class: int = 6, n_test: int = 20, seed: int = 0) -> Path:
    """A Fashion-MNIST folder: each class a fixed random 28x28 template plus noise (separable classes)."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (len(CLASSES), 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class * len(CLASSES)), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % len(CLASSES)
        noise = rng.integers(0, 256, (n, 28, 28))
        imgs = (0.6 * templates[labels] + 0.4 * noise).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return folder


class FakeNet:
    """EfficientNet-Lite0's place: 4x4-pooled pixels through a fixed projection to its 1280 features."""

    weights, dim = "fake-lite0.pth", lm_vision.FEATURE_DIM
    loads = 0

    def __init__(self, cfg: lm_vision.VisionConfig) -> None:
        self.cfg = cfg
        FakeNet.loads += 1

    def features(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32).reshape(len(images), 7, 4, 7, 4).mean((2, 4)).reshape(len(images), 49)
        return (x / 255.0) @ PROJ


@pytest.fixture(autouse=True)
def fake_net(monkeypatch):
    FakeNet.loads = 0
    monkeypatch.setattr(lm_vision, "load_backbone", FakeNet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fashion(tmp_path_factory.mktemp("fm") / "fashion_mnist")


def config(folder, out, **kw) -> RetroPromptConfig:
    vision = {"dim": 8, "hidden": 16, "dropout": 0.1, "feature_cache": str(Path(out).parent / "features"),
              **kw.pop("vision", {})}
    base = dict(data="fashion-mnist", data_file=str(folder), out=str(out), shots=2, steps=6, batch_size=4, lr=1e-2,
                warmup=0, eval_every=0, save_every=1, bf16=False, seed=13, lmbda_grid=(0.0, 0.2, 1.0))
    base.update(kw)
    cfg = RetroPromptConfig(**base)
    cfg.vision = type(cfg.vision)(**vision)
    cfg.knn = type(cfg.knn)(k=3, demos=1)
    return cfg


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
