"""The few-shot table's rows (``ralm.tuning.fewshot_table``, issue 14): each row computes what it claims (zero-shot
= the untrained p_model, kNN only = λ = 1 of the store, the prompt-FT baseline has β = λ = 0 and no demos, each
ablation drops exactly one component), one forward per example, the linear probe, mean ± std over seeds and the
comparison computed from the numbers. Tiny random Llama, generated texts."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import ralm.tuning.fewshot_table as ft
from fewshot_data import TEMPLATE, VERBALIZER, write_labelled
from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.methods.retroprompt.backbone import label_indices
from ralm.methods.retroprompt.knn import store_knn_probs
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.methods.retroprompt.vision import VisionBackbone, VisionConfig
from ralm.tuning.retroprompt import build_backbone
from ralm.tuning.retroprompt_config import RetroPromptConfig, draw

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_labelled(tmp_path_factory.mktemp("table-data") / "labelled.jsonl")


@pytest.fixture
def base(data, tiny_lm, tmp_path):
    cfg = RetroPromptConfig(data=str(data), out=str(tmp_path), template=TEMPLATE, verbalizer=VERBALIZER,
                            model=tiny_lm, steps=2, batch_size=4, lr=1e-2, warmup=0, eval_every=0, save_every=1,
                            bf16=False, test_limit=8, lmbda_grid=(0.0, 0.2, 1.0))
    return replace(cfg, knn=replace(cfg.knn, beta=1.0))


def record_accuracy(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (probabilities, targets) the table scores, in call order."""
    calls = []
    real = ft.accuracy

    def acc(p, t):
        calls.append((p.clone(), t.clone()))
        return real(p, t)

    monkeypatch.setattr(ft, "accuracy", acc)
    return calls


# ---- the untrained rows ----

def test_zero_shot_is_the_untrained_p_model_and_knn_only_is_lambda_one(base, monkeypatch):
    cfg = ft.cell_config(base, 4, 13, base.out)
    d = draw(cfg)
    bb, _ = build_backbone(replace(cfg, peft=replace(cfg.peft, method="full")), d)
    calls = record_accuracy(monkeypatch)
    cells = ft.untrained_cells(ft.Features(bb, 3), d, cfg.knn)
    # independently: the untrained model's p_model on the test split, and p_kNN from a store of train
    with torch.no_grad():
        p_test = bb.forward(d.test, None).class_logits.exp()
        store = KnowledgeStore(bb.represent(d.split.train), label_indices(bb, d.split.train).tolist(), 2)
        knn_test = store_knn_probs(store, bb.represent(d.test), cfg.knn)
    y = label_indices(bb, d.test)
    zero_p, zero_y = calls[-5]  # (the probe's dev choice,) zero-shot test, dev, kNN test, dev, the probe's test
    torch.testing.assert_close(zero_p, p_test, rtol=1e-5, atol=1e-6)
    assert torch.equal(zero_y, y)
    torch.testing.assert_close(calls[-3][0], knn_test, rtol=0, atol=1e-6)  # λ = 1: p_kNN exactly, p_model gone
    assert cells["zero-shot"]["test"] == float((p_test.argmax(-1) == y).float().mean())
    assert cells["knn"]["k"] == cfg.knn.k == 7  # 8 training examples, one left out
    assert cells["linear-probe"]["l2"] in ft.PROBE_L2
    assert {r: c["test_examples"] for r, c in cells.items()} == dict.fromkeys(ft.UNTRAINED, len(d.test))


def test_the_untrained_rows_pass_each_example_through_the_model_once(base, monkeypatch):
    made = []

    class Counting(ft.Features):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(ft, "Features", Counting)
    cells = [ft.Cell(base.data, s, seed, r) for s in (4, 2) for seed in (13, 21) for r in ft.UNTRAINED]
    done, left = ft.run_table({base.data: base}, cells, base.out)
    assert not left and len(done) == 12 and all(m["computed"] for m in done)
    seen, each = set(), 0
    for s in (4, 2):
        for seed in (13, 21):
            d = draw(ft.cell_config(base, s, seed, base.out))
            seen |= {e.id for e in d.split.train + d.split.dev + d.test}
            each += len(d.split.train) + len(d.split.dev) + len(d.test)
    assert len(made) == 1 and made[0].forwarded == len(seen)
    assert len(seen) < each - 3 * 8  # the draws overlap; the test split at least is shared


def test_the_linear_probe_separates_separable_features_and_picks_l2_on_dev():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(2, 16, generator=g) * 4

    def blobs(n):
        y = torch.arange(n) % 2
        return centre[y] + torch.randn(n, 16, generator=g), y

    (xt, yt), (xd, yd), (xs, ys) = blobs(16), blobs(16), blobs(40)
    predict, l2, dev = ft.linear_probe(xt, yt, xd, yd, 2)
    assert dev == 1.0 and l2 == ft.PROBE_L2[0]  # every l2 separates: the tie keeps the strongest
    p = predict(xs)
    assert p.shape == (40, 2) and torch.allclose(p.sum(-1), torch.ones(40))
    assert ft.accuracy(p, ys) == 1.0
    # labels on dev that only a weakly regularised probe fits better: the choice follows dev
    flip = yd.clone()
    flip[:3] = 1 - flip[:3]
    scores = {lm: ft.accuracy(ft.linear_probe(xt, yt, xd, flip, 2, grid=(lm,))[0](xd), flip) for lm in ft.PROBE_L2}
    _, chosen, acc = ft.linear_probe(xt, yt, xd, flip, 2)
    assert acc == max(scores.values()) and chosen == next(lm for lm in ft.PROBE_L2 if scores[lm] == acc)


def test_a_backbone_with_frozen_features_is_probed_on_them():
    """The vision backbone's untrained head is a random projection: kNN and the probe read its frozen features."""
    classes = ("shirt", "shoe", "bag")
    proj = torch.randn(64, 12, generator=torch.Generator().manual_seed(0)).numpy()

    def extract(images, name):  # a stand-in for EfficientNet-Lite0
        return images.reshape(len(images), 64).astype("float32") / 255.0 @ proj

    rng = np.random.default_rng(0)
    exs = [LabelledExample(f"i{i}", "", classes[i % 3], rng.integers(0, 255, (8, 8)).astype(np.uint8))
           for i in range(6)]
    bb = VisionBackbone(classes, VisionConfig(dim=8), extractor=extract, feature_dim=12)
    p, reps = ft.Features(bb, 4).get(exs)
    torch.testing.assert_close(reps, bb.features(exs).cpu())  # (6, 12) frozen, not the head's (6, 8)
    bb.head.eval()  # as Features reads it: no dropout
    torch.testing.assert_close(p, bb.forward(exs, None).class_logits.exp())


# ---- the trained rows' configs ----

def test_the_prompt_ft_baseline_has_no_retrieval_and_each_ablation_drops_one_component(base):
    def flat(cell_row):
        cfg = ft.row_config(base, ft.Cell(base.data, 16, 13, cell_row), "o")
        d = asdict(cfg)
        return {**{f"knn.{k}": v for k, v in d.pop("knn").items()}, **d}

    rp = flat("retroprompt")
    assert rp["knn.beta"] == 1.0 and rp["knn.demos"] == 8 and rp["knn.leave_self_out"] and rp["lmbda"] is None
    assert rp["refresh"] == "epoch" and rp["shots"] == 16 and rp["seed"] == 13
    ft_ = flat("prompt-ft")
    assert (ft_["knn.beta"], ft_["knn.demos"], ft_["lmbda"], ft_["refresh"]) == (0.0, 0, 0.0, "never")
    expect = {"no-loss-scaling": {"knn.beta": 0.0}, "no-interpolation": {"lmbda": 0.0}, "no-demos": {"knn.demos": 0},
              "no-refresh": {"refresh": "never"}, "kept-in": {"knn.leave_self_out": False}}
    for row, change in expect.items():
        got = flat(row)
        assert {k: v for k, v in got.items() if v != rp[k]} == change, row


def test_k_and_demonstrations_follow_the_size_of_the_store(base):
    for shots, k, m in ((16, 16, 8), (4, 7, 2), (1, 1, 0)):
        knn = ft.cell_config(base, shots, 13, "o").knn
        assert (knn.k, knn.demos) == (k, m), shots


def test_the_prompt_ft_cell_scores_p_model_alone_and_never_refreshes(base, tmp_path):
    cfg = ft.row_config(base, ft.Cell(base.data, 4, 13, "prompt-ft"), tmp_path / "ft")
    cell = ft.trained_cell(cfg)
    assert cell["lmbda"] == 0.0 and cell["test"] == cell["test_model"]  # λ = 0: p_model exactly
    assert cell["refreshes"] == 0 and cell["demos"] == 0 and cell["beta"] == 0.0
    assert cell["test_examples"] == 8 and cell["examples_per_second"] > 0 and 0 <= cell["store_share"] < 1
    rp = ft.trained_cell(ft.row_config(replace(base, steps=3), ft.Cell(base.data, 4, 13, "retroprompt"),
                                       tmp_path / "rp"))
    assert rp["refreshes"] == 1 and rp["demos"] == 2  # 8 examples / batch 4: an epoch is 2 steps


# ---- the runner, the aggregate, the comparison ----

def test_stored_cells_are_read_and_stop_leaves_the_rest(base):
    cells = [ft.Cell(base.data, 4, 13, "zero-shot"), ft.Cell(base.data, 4, 13, "retroprompt")]
    stored = {"test": 0.5, "test_examples": 8}

    def fail(_):
        raise AssertionError("a stored cell was trained")

    done, left = ft.run_table({base.data: base}, cells, base.out, train=fail, cache=lambda c, fn: stored,
                              stop=lambda: True)
    assert [m["test"] for m in done] == [0.5, 0.5] and not left and not any(m["computed"] for m in done)
    done, left = ft.run_table({base.data: base}, cells, base.out, train=fail, stop=lambda: True)
    assert done == [] and left == cells


def cells_of(values: dict[str, list[float]], seeds=(13, 21, 42), data="d", shots=16) -> list[dict]:
    return [{"data": data, "shots": shots, "seed": s, "row": row, "test": v, "test_examples": 10}
            for row, vs in values.items() for s, v in zip(seeds, vs, strict=True)]


def test_mean_and_std_over_seeds():
    measured = cells_of({"retroprompt": [0.5, 0.7, 0.6], "prompt-ft": [0.9, 0.8, 0.4]})
    table = ft.aggregate(measured[::-1])  # any order in, seeds sorted out
    rp = next(r for r in table if r["row"] == "retroprompt")
    assert rp["seeds"] == [13, 21, 42] and rp["per_seed"] == [50.0, 70.0, 60.0]
    assert rp["mean"] == pytest.approx(60.0) and rp["std"] == pytest.approx(np.std([50, 70, 60]), abs=0.01)
    f = next(r for r in table if r["row"] == "prompt-ft")
    assert f["mean"] == pytest.approx(70.0) and f["std"] == pytest.approx(np.std([90, 80, 40]), abs=0.01)
    assert "examples_per_second" not in rp  # not measured in these cells: not made up


def test_the_comparison_sentence_is_computed_from_the_numbers():
    measured = cells_of({"retroprompt": [0.8, 0.7, 0.9], "prompt-ft": [0.7, 0.7, 0.6]})
    c = ft.comparison(measured, "d", 16)
    diffs = [10.0, 0.0, 30.0]
    assert c["difference"] == pytest.approx(np.mean(diffs), abs=0.01)
    assert c["std"] == pytest.approx(np.std(diffs), abs=0.01)
    assert c["spread"] == pytest.approx(max(np.std([80, 70, 90]), np.std([70, 70, 60])), abs=0.01)
    assert c["sentence"].startswith("RetroPrompt vs prompt FT at 16 shots: +13.3 ± 12.5 (seed spread 8.2)")
    assert c["beats"] and c["beyond_spread"]
    worse = ft.comparison(cells_of({"retroprompt": [0.6, 0.7, 0.6], "prompt-ft": [0.7, 0.7, 0.6]}), "d", 16)
    assert worse["sentence"].startswith("RetroPrompt vs prompt FT at 16 shots: -3.3") and not worse["beats"]
    assert not worse["beyond_spread"]  # 3.3 behind, spread 4.7
    far = ft.comparison(cells_of({"retroprompt": [0.5, 0.5, 0.4], "prompt-ft": [0.7, 0.7, 0.6]}), "d", 16)
    assert not far["beats"] and far["beyond_spread"]  # behind by more than the spread is said too
    one = ft.comparison(cells_of({"retroprompt": [0.6], "prompt-ft": [0.7]}, seeds=(13,)), "d", 16)
    assert one["difference"] is None and "not measured" in one["sentence"]


def test_bad_input():
    with pytest.raises(RalmError, match="--rows 'lora': unknown row"):
        ft.Cell("d", 16, 13, "lora")
    with pytest.raises(RalmError, match="not a trained row"):
        ft.row_config(None, ft.Cell("d", 16, 13, "knn"), "o")
    with pytest.raises(RalmError, match="no values"):
        ft.mean_std([])
