"""RetroPrompt's vision backbone (issue 14): frozen features kept by example id, a trained head, demonstrations
as a gated cosine-prototype term. A small deterministic feature extractor stands in for EfficientNet-Lite0
(nothing is downloaded); one test runs the real ``ralm.lm.vision`` cache code around a fake network."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.lm import vision as lm_vision
from ralm.methods.retroprompt.demos import neural_demos
from ralm.methods.retroprompt.knn import KNNConfig, interpolate, knn_guided_loss, store_knn_probs
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.methods.retroprompt.vision import VisionBackbone, VisionConfig, read_image

CLASSES = ("shirt", "shoe", "bag")
FDIM = 12  # feature size of the stand-in extractor
PROJ = np.random.default_rng(0).standard_normal((64, FDIM)).astype(np.float32)


class Extractor:
    """Deterministic (n, 8, 8[, 3]) uint8 -> (n, FDIM) features; records the size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray, name: str) -> np.ndarray:
        self.calls.append(len(images))
        x = images.astype(np.float32).reshape(len(images), 8, 8, -1).mean(-1).reshape(len(images), 64)
        return (x / 255.0) @ PROJ


def examples(n: int, seed: int = 0, prefix: str = "x") -> list[LabelledExample]:
    """Images whose class sets their brightness pattern (so classes are separable), plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = i % len(CLASSES)
        img = rng.integers(0, 60, (8, 8)).astype(np.uint8)
        img[c * 2:c * 2 + 3] += 180
        out.append(LabelledExample(f"{prefix}{i}", "", CLASSES[c], img))
    return out


def backbone(head: str = "linear", dropout: float = 0.0, seed: int = 0, **kw) -> tuple[VisionBackbone, Extractor]:
    ex = Extractor()
    cfg = VisionConfig(head=head, hidden=16, dim=8, dropout=dropout, **kw)
    return VisionBackbone(CLASSES, cfg, extractor=ex, feature_dim=FDIM, seed=seed), ex


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_forward_gives_class_log_probs_and_detached_reps(head: str) -> None:
    bb, _ = backbone(head)
    demos = torch.randn(6, 3, 8)
    for d in (None, demos):
        out = bb.forward(examples(6), d)
        assert out.class_logits.shape == (6, 3) and out.reps.shape == (6, 8)
        assert out.class_logits.dtype == torch.float32 and out.reps.dtype == torch.float32
        torch.testing.assert_close(out.class_logits.logsumexp(-1), torch.zeros(6), atol=1e-6, rtol=0)
        assert out.class_logits.requires_grad and not out.reps.requires_grad
    assert bb.n_classes == 3 and bb.classes == CLASSES and bb.label_index("bag") == 2


def test_features_are_computed_once_per_example_never_per_step() -> None:
    bb, ex = backbone()
    train = examples(9)
    bb.prepare(train + train[:3])  # a repeated example is computed once
    assert ex.calls == [9]
    for _ in range(3):
        bb.forward(train[:4], None)
        bb.represent(train)
    assert ex.calls == [9]
    bb.forward(train[:2] + examples(1, seed=5, prefix="new"), None)  # only the unseen example
    assert ex.calls == [9, 1]
    rgb = LabelledExample("rgb", "", "bag", np.zeros((8, 8, 3), np.uint8))  # another shape: its own call
    bb.prepare([rgb] + examples(2, seed=6, prefix="more"))
    assert sorted(ex.calls[2:]) == [1, 2]


def test_gradients_reach_only_the_head() -> None:
    bb, _ = backbone("mlp")
    train = examples(6)
    bb.prepare(train)
    frozen = bb.features(train).clone()
    with torch.no_grad():
        bb.head.gate.fill_(0.5)
    out = bb.forward(train, torch.randn(6, 3, 8))
    torch.nn.functional.nll_loss(out.class_logits, torch.tensor([0, 1, 2] * 2)).backward()
    params = dict(bb.module().named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), \
        [n for n, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    feats = bb.features(train)
    assert not feats.requires_grad and torch.equal(feats, frozen)  # the features are data, not parameters


def test_zero_gate_demos_give_the_no_demo_logits_bit_for_bit() -> None:
    bb, _ = backbone("mlp")
    bb.head.eval()
    x = examples(5)
    demos = torch.randn(5, 3, 8) * 10
    plain = bb.forward(x, None)
    with_demos = bb.forward(x, demos)
    assert bb.head.gate.item() == 0.0
    assert torch.equal(with_demos.class_logits, plain.class_logits)
    assert torch.equal(with_demos.reps, plain.reps)
    with_demos.class_logits[:, 0].sum().backward()
    assert bb.head.gate.grad is not None and bb.head.gate.grad != 0  # the gate can leave 0
    with torch.no_grad():
        bb.head.gate.fill_(0.1)
    rep = plain.reps
    cos = torch.nn.functional.cosine_similarity(rep[:, None], demos, dim=-1)  # (5, 3)
    expected = torch.log_softmax(bb.head.classifier(rep) + 0.1 * bb.config.demo_scale * cos, -1)
    torch.testing.assert_close(bb.forward(x, demos).class_logits, expected.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, plain.class_logits)


def test_represent_is_deterministic_no_grad_and_in_eval_mode() -> None:
    bb, _ = backbone("mlp", dropout=0.5)
    x = examples(7)
    bb.head.train()
    a, b = bb.represent(x), bb.represent(x, batch_size=2)
    assert a.shape == (7, 8) and a.dtype == torch.float32 and not a.requires_grad
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert bb.head.training  # the caller's mode is restored
    train_reps = bb.forward(x, None).reps  # dropout on: differs from the store's keys
    assert not torch.allclose(train_reps, a)
    bb.head.eval()
    torch.testing.assert_close(bb.forward(x, None).reps, a, atol=1e-6, rtol=1e-5)
    assert bb.represent([]).shape == (0, 8)


def test_the_same_seed_gives_the_same_head() -> None:
    a, _ = backbone(seed=3)
    b, _ = backbone(seed=3)
    c, _ = backbone(seed=4)
    x = examples(4)
    assert torch.equal(a.represent(x), b.represent(x)) and not torch.equal(a.represent(x), c.represent(x))


def test_store_knn_and_demonstrations_run_over_its_reps_and_training_improves() -> None:
    bb, _ = backbone("linear", dropout=0.1)
    train = examples(24)
    y = torch.tensor([bb.label_index(e.label) for e in train])
    store = KnowledgeStore(bb.represent(train), y.tolist(), bb.n_classes, bb.classes)
    cfg = KNNConfig(k=4, beta=1.0, demos=3)
    opt = torch.optim.Adam(bb.module().parameters(), lr=0.05)
    losses = []
    for step in range(30):
        rows = list(range(step % 3 * 8, step % 3 * 8 + 8))
        q = store.raw[rows]
        p_knn = store_knn_probs(store, q, cfg, rows=rows)
        demos = neural_demos(store, q, cfg.demos, rows=rows)  # (8, 3, 8)
        bb.head.train()
        out = bb.forward([train[r] for r in rows], demos)
        loss = knn_guided_loss(out.class_logits, y[rows], p_knn, cfg.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 3 == 2:
            store.refresh(bb.represent(train))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert bb.head.gate.item() != 0.0  # the demonstration term was trained
    test = examples(9, seed=1, prefix="t")
    q = bb.represent(test)
    bb.head.eval()
    out = bb.forward(test, neural_demos(store, q, cfg.demos))
    p = interpolate(out.class_logits.exp(), store_knn_probs(store, q, cfg), 0.2)
    torch.testing.assert_close(p.sum(-1), torch.ones(9))
    assert (p.argmax(-1) == torch.tensor([0, 1, 2] * 3)).float().mean() >= 0.8


def _one_line_error(bb: VisionBackbone, ex: LabelledExample, match: str) -> None:
    with pytest.raises(RalmError, match=match) as e:
        bb.forward([ex], None)
    assert "\n" not in str(e.value)


def test_bad_images_are_one_line_errors_naming_the_example(tmp_path: Path) -> None:
    bb, _ = backbone()
    for img, what in [(None, "has no image"), (np.zeros((8, 8), np.float32), r"got shape \(8, 8\) float32"),
                      (np.zeros((8, 8, 4), np.uint8), r"\(h, w\) or \(h, w, 3\) uint8"),
                      (np.zeros((0, 8), np.uint8), r"got shape \(0, 8\)"),
                      ([[0, 1], [2, 3]], "got list")]:
        _one_line_error(bb, LabelledExample("bad-1", "", "bag", img), f"example 'bad-1': .*{what}")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    _one_line_error(bb, LabelledExample("bad-2", "", "bag", str(junk)),
                    f"example 'bad-2': image file {re.escape(str(junk))}: cannot decode")
    _one_line_error(bb, LabelledExample("bad-3", "", "bag", tmp_path / "gone.png"), "gone.png: no such file")
    # a good file decodes: grayscale as (h, w), colour as (h, w, 3)
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(tmp_path / "c.png")
    assert read_image(tmp_path / "g.png").shape == (8, 8) and read_image(tmp_path / "c.png").shape == (8, 8, 3)
    out = bb.forward([LabelledExample("ok", "", "bag", tmp_path / "g.png")], None)
    assert out.class_logits.shape == (1, 3)


def test_bad_config_and_inputs_are_one_line() -> None:
    for kw, match in [({"head": "conv"}, "--head 'conv': choose linear or mlp"), ({"dim": 0}, "--dim 0: must be >= 1"),
                      ({"hidden": 0}, "--hidden 0"), ({"dropout": 1.0}, r"--dropout 1.0: must be in \[0, 1\)"),
                      ({"demo_scale": 0.0}, "--demo-scale 0.0: must be > 0"),
                      ({"resolution": 8}, "--resolution 8: must be an integer from 32 to 1024")]:
        with pytest.raises(RalmError, match=match):
            VisionConfig(**kw)
    bb, _ = backbone()
    with pytest.raises(RalmError, match=r"expected \(2, 3, 8\) vectors, got \(2, 3, 5\)"):
        bb.forward(examples(2), torch.zeros(2, 3, 5))
    with pytest.raises(RalmError, match=r"vision features: expected \(2, 12\), got \(2, 11\)"):
        bb.add_features(["a", "b"], np.zeros((2, 11), np.float32))
    with pytest.raises(RalmError, match="not all finite"):
        bb.add_features(["a"], np.full((1, FDIM), np.nan, np.float32))
    with pytest.raises(RalmError, match="at least two distinct classes"):
        VisionBackbone(["only"], extractor=Extractor(), feature_dim=FDIM)
    with pytest.raises(RalmError, match="label 'hat' is not a class"):
        bb.label_index("hat")
    with pytest.raises(RalmError, match="no examples"):
        bb.forward([], None)


def test_precomputed_features_need_no_extractor() -> None:
    bb = VisionBackbone(CLASSES, VisionConfig(dim=8), feature_dim=FDIM,
                        extractor=lambda imgs, name: pytest.fail("the extractor must not run"))
    x = examples(4)
    feats = np.random.default_rng(2).standard_normal((4, FDIM)).astype(np.float32)
    bb.add_features([e.id for e in x], feats)
    bb.head.eval()
    torch.testing.assert_close(bb.represent(x), bb.head.body(torch.from_numpy(feats)).detach())


def test_default_extractor_goes_through_the_feature_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real ``ralm.lm.vision.cached_features`` around a fake network (no EfficientNet download)."""
    loaded: list[lm_vision.VisionConfig] = []

    class FakeNet:
        weights, dim = "fake.pth", FDIM

        def __init__(self, cfg: lm_vision.VisionConfig) -> None:
            self.cfg, self.n = cfg, 0

        def features(self, images: np.ndarray) -> np.ndarray:
            self.n += len(images)
            return Extractor()(images, "")

    monkeypatch.setattr(lm_vision, "load_backbone", lambda cfg: loaded.append(cfg) or FakeNet(cfg))
    cfg = VisionConfig(dim=8, resolution=64, feature_cache=str(tmp_path), feature_batch=5)
    x = examples(6)
    a = VisionBackbone(CLASSES, cfg, feature_dim=FDIM)
    a.prepare(x, "fm-train")
    assert [(c.resolution, c.batch_size) for c in loaded] == [(64, 5)]
    assert len(list(tmp_path.glob("fm-train-64px-*.npy"))) == 1
    b = VisionBackbone(CLASSES, cfg, feature_dim=FDIM)  # a second run reads the file
    b.prepare(x, "fm-train")
    assert b._frozen is not None and b._frozen.n == 0
    torch.testing.assert_close(a.features(x), b.features(x))
