"""Generated Fashion-MNIST folders and a stand-in for EfficientNet-Lite0, for the RetroPrompt vision tests."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ralm.data.tasks.fashion_mnist import CLASSES
from ralm.lm import vision as lm_vision
from ralm.tuning.retroprompt_config import RetroPromptConfig

PROJ = np.random.default_rng(0).standard_normal((49, lm_vision.FEATURE_DIM)).astype(np.float32)


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def fashion(folder: Path, per_class: int = 6, n_test: int = 20, seed: int = 0,
            swap: Sequence[tuple[int, int]] = ()) -> Path:
    """A Fashion-MNIST folder: each class a fixed random 28x28 template plus noise (separable classes); ``swap``:
    pairs of training images (of two classes) whose labels are exchanged (mislabelled, class sizes kept)."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (len(CLASSES), 28, 28))
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class * len(CLASSES)), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % len(CLASSES)
        noise = rng.integers(0, 256, (n, 28, 28))
        imgs = (0.6 * templates[labels] + 0.4 * noise).astype(np.uint8)
        for i, j in swap if split == "train" else ():
            labels[i], labels[j] = labels[j], labels[i]
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return folder


class FakeNet:
    """EfficientNet-Lite0's place: 4x4-pooled pixels through a fixed projection to its 1280 features."""

    weights, dim = "fake-lite0.pth", lm_vision.FEATURE_DIM
    loads = 0

    @classmethod
    def install(cls, monkeypatch) -> None:
        """Put it where ``ralm.lm.vision.load_backbone`` is (for one test)."""
        cls.loads = 0
        monkeypatch.setattr(lm_vision, "load_backbone", cls)

    def __init__(self, cfg: lm_vision.VisionConfig) -> None:
        self.cfg = cfg
        FakeNet.loads += 1

    def features(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32).reshape(len(images), 7, 4, 7, 4).mean((2, 4)).reshape(len(images), 49)
        return (x / 255.0) @ PROJ


def config(folder, out, **kw) -> RetroPromptConfig:
    """A 2-shot run on ``folder`` (20 training examples): k 3, 1 demonstration, a small linear head."""
    vision = {"dim": 8, "hidden": 16, "dropout": 0.1, "feature_cache": str(Path(out).parent / "features"),
              **kw.pop("vision", {})}
    base = dict(data="fashion-mnist", data_file=str(folder), out=str(out), shots=2, steps=6, batch_size=4, lr=1e-2,
                warmup=0, eval_every=0, save_every=1, bf16=False, seed=13, lmbda_grid=(0.0, 0.2, 1.0))
    knn = {"k": 3, "demos": 1, **kw.pop("knn", {})}
    base.update(kw)
    cfg = RetroPromptConfig(**base)
    cfg.vision = type(cfg.vision)(**vision)
    cfg.knn = type(cfg.knn)(**knn)
    return cfg
