"""The few-shot table of issue 14: every row as a function of (data, shots, seed) over the LM-BFF draw
(``retroprompt_config.draw``), test accuracy per cell, mean ± std over seeds per (data, shots, row).

Rows (``ROWS``). Untrained, read off the pretrained backbone (no training; ``--peft`` is ignored, nothing is
injected):

- ``zero-shot``: p_model of the untrained LM (template + verbalizer), no store;
- ``knn``: p_kNN over the untrained representations of the train split, λ = 1 (the store alone);
- ``linear-probe``: logistic regression on the frozen representations of train (standardised by train's mean
  and std), its L2 weight chosen on dev from ``PROBE_L2`` (ties: the strongest).

On images (a backbone with frozen ``features``) both read the frozen features (``Features``).

Trained (``ralm.tuning.retroprompt.train_retroprompt`` with the row's overrides, ``row_config``):

- ``prompt-ft``: prompt fine-tuning without retrieval (LM-BFF style): β = 0, λ = 0, no demonstrations, store
  never refreshed (it is still built: training reads p_kNN(gold) off it for the log, which changes nothing);
- ``retroprompt``: every component; ``no-loss-scaling`` (β = 0), ``no-interpolation`` (λ = 0), ``no-demos``,
  ``no-refresh``: RetroPrompt without that one; ``kept-in``: the example kept in its own neighbours in
  training (the reference code) instead of left out.

Per shots, k and m follow the store's size: k = min(--k, n − 1) (n = shots × classes, one left out) and
m = min(--demos, shots // 2) (the reference: 8 at 16 shots, 2 at 4); every row of a (data, shots) uses the
same k. The untrained rows pass each example through the model once per data set (``Features``, by example
id: train, dev and the test split are shared across shots and seeds).

This lives in ``tuning`` rather than ``eval`` because it trains (``eval`` may not import ``tuning``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.methods.retroprompt.backbone import Backbone, eval_mode, label_indices
from ralm.methods.retroprompt.knn import KNNConfig, interpolate, store_knn_probs
from ralm.methods.retroprompt.scoring import accuracy
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.tuning.retroprompt import build_backbone, finished_result, train_retroprompt
from ralm.tuning.retroprompt_config import Draw, RetroPromptConfig, draw

ROWS: dict[str, str] = {
    "zero-shot": "zero-shot prompt (p_model of the untrained LM, no store)",
    "knn": "kNN only (p_kNN over the pretrained representations of train, λ = 1)",
    "linear-probe": "linear probe on frozen features (logistic regression, L2 chosen on dev)",
    "prompt-ft": "prompt fine-tuning without retrieval (LM-BFF style: β = 0, λ = 0, no demos, no refresh)",
    "retroprompt": "RetroPrompt (all components)",
    "no-loss-scaling": "RetroPrompt without the kNN-guided loss (β = 0)",
    "no-interpolation": "RetroPrompt without the kNN interpolation (λ = 0)",
    "no-demos": "RetroPrompt without neural demonstrations",
    "no-refresh": "RetroPrompt without store refresh (never)",
    "kept-in": "RetroPrompt with the example kept in its own neighbours (the reference code)",
}
UNTRAINED = ("zero-shot", "knn", "linear-probe")
TRAINED = tuple(r for r in ROWS if r not in UNTRAINED)
PROBE_L2 = (10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4)  # strongest first: a tie on dev keeps the simpler probe


@dataclass(frozen=True)
class Cell:
    """One measurement of the table: a row on one few-shot draw."""

    data: str
    shots: int
    seed: int
    row: str

    def __post_init__(self) -> None:
        if self.row not in ROWS:
            raise RalmError(f"--rows {self.row!r}: unknown row (choose from {', '.join(ROWS)})")

    def name(self) -> str:
        return f"{Path(self.data).stem}-{self.shots}shot-seed{self.seed}-{self.row}"


def cell_config(base: RetroPromptConfig, shots: int, seed: int, out: str | Path) -> RetroPromptConfig:
    """``base`` at ``shots`` and ``seed`` with k and m fitted to the store's size (module docstring)."""
    n = shots * len(base.prompt_config().words)
    knn = replace(base.knn, k=max(1, min(base.knn.k, n - 1)), demos=min(base.knn.demos, shots // 2))
    return replace(base, shots=shots, seed=seed, out=str(out), knn=knn)


def row_config(base: RetroPromptConfig, cell: Cell, out: str | Path) -> RetroPromptConfig:
    """The training config of a trained row's cell (``base`` carries the shared settings: model, steps, ...)."""
    if cell.row not in TRAINED:
        raise RalmError(f"row {cell.row!r}: not a trained row ({', '.join(TRAINED)})")
    cfg = cell_config(base, cell.shots, cell.seed, out)
    knn, over = cfg.knn, {}
    if cell.row == "prompt-ft":
        knn, over = replace(knn, beta=0.0, demos=0), {"lmbda": 0.0, "refresh": "never"}
    elif cell.row == "no-loss-scaling":
        knn = replace(knn, beta=0.0)
    elif cell.row == "no-interpolation":
        over = {"lmbda": 0.0}
    elif cell.row == "no-demos":
        knn = replace(knn, demos=0)
    elif cell.row == "no-refresh":
        over = {"refresh": "never"}
    elif cell.row == "kept-in":
        knn = replace(knn, leave_self_out=False)
    return replace(cfg, knn=knn, **over)


def trained_cell(cfg: RetroPromptConfig) -> dict[str, Any]:
    """Train (or resume, or read back if already trained and scored) ``cfg`` and keep what the table reads:
    accuracies, λ, speed and the store's cost."""
    s = finished_result(cfg) or train_retroprompt(cfg, progress=False)
    if "test" not in s:
        raise RalmError(f"--data {cfg.data}: no test split to score")
    return {"test": s["test"]["accuracy"], "test_model": s["test"]["accuracy_model"],
            "test_knn": s["test"]["accuracy_knn"], "dev": s["dev"]["accuracy"], "lmbda": s["lmbda"],
            "test_examples": s["test"]["examples"], "examples_per_second": s["examples_per_second"],
            "store_share": s["store"]["share_of_training_time"], "refreshes": s["store"]["refreshes"],
            "refresh_seconds": s["store"]["refresh_seconds"], "train_seconds": s["seconds"],
            "train_p_knn_gold": s["store"]["train_p_knn_gold"], "trainable": s["trainable"],
            "k": cfg.knn.k, "demos": cfg.knn.demos, "beta": cfg.knn.beta, "refresh": cfg.refresh}


class Features:
    """p_model (C,) and the pretrained representation (d,) of each example under the untrained backbone, by
    example id: an example is passed through the model once however many draws it is in.

    The representation is the backbone's own (an LM's prompt-position state), except where the backbone
    has frozen features (``features(examples)``: the vision one), whose untrained head is a random
    projection: kNN and the probe then read the frozen features, and zero-shot is that random head (chance).
    """

    def __init__(self, backbone: Backbone, batch_size: int = 16):
        self.bb, self.batch_size = backbone, batch_size
        self.p: dict[str, torch.Tensor] = {}
        self.reps: dict[str, torch.Tensor] = {}
        self.forwarded = 0  # examples passed through the model so far

    def get(self, examples: Sequence[LabelledExample]) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_model (n, C), reps (n, d)) of ``examples``, computing only those not seen yet."""
        todo = list({e.id: e for e in examples if e.id not in self.p}.values())
        with eval_mode(self.bb.module()), torch.no_grad():
            for b in range(0, len(todo), self.batch_size):
                part = todo[b:b + self.batch_size]
                out = self.bb.forward(part, None)
                reps = self.bb.features(part) if hasattr(self.bb, "features") else out.reps  # (B, d)
                for e, lp, r in zip(part, out.class_logits.float().exp().cpu(), reps.float().cpu(), strict=True):
                    self.p[e.id], self.reps[e.id] = lp, r
        self.forwarded += len(todo)
        return torch.stack([self.p[e.id] for e in examples]), torch.stack([self.reps[e.id] for e in examples])


def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor,
                 n_classes: int, grid: Sequence[float] = PROBE_L2, iters: int = 200) -> tuple[Callable, float, float]:
    """Multinomial logistic regression on (n, d) features (standardised by train), full-batch L-BFGS from zero,
    loss = CE + l2/2·‖W‖²/n; the l2 of ``grid`` with the best dev accuracy (ties: the first). Returns
    (predict: (m, d) -> (m, C) probabilities, l2, dev accuracy)."""
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False).clamp(min=1e-6)

    def fit(l2: float) -> Callable[[torch.Tensor], torch.Tensor]:
        xt = (x_train - mu) / sd  # (n, d)
        w = torch.zeros(xt.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xt @ w + b, y_train) + 0.5 * l2 * (w * w).sum() / len(xt)
            loss.backward()
            return loss

        opt.step(closure)
        wd, bd = w.detach(), b.detach()
        return lambda x: torch.softmax(((x - mu) / sd) @ wd + bd, -1)

    best: tuple[float, float, Callable] | None = None
    for l2 in grid:
        predict = fit(l2)
        acc = accuracy(predict(x_dev), y_dev)
        if best is None or acc > best[0]:
            best = (acc, l2, predict)
    assert best is not None
    return best[2], best[1], best[0]


def untrained_cells(features: Features, d: Draw, knn: KNNConfig) -> dict[str, dict[str, Any]]:
    """The three untrained rows on one draw, from one set of features."""
    bb = features.bb
    tr, dev, test = d.split.train, d.split.dev, d.test
    if not test:
        raise RalmError("the few-shot table: no test split to score")
    (_, r_tr), (p_dev, r_dev), (p_test, r_test) = features.get(tr), features.get(dev), features.get(test)
    y_tr, y_dev, y_test = (label_indices(bb, x) for x in (tr, dev, test))
    store = KnowledgeStore(r_tr, y_tr.tolist(), bb.n_classes, bb.classes)
    k_dev, k_test = store_knn_probs(store, r_dev, knn), store_knn_probs(store, r_test, knn)
    predict, l2, probe_dev = linear_probe(r_tr, y_tr, r_dev, y_dev, bb.n_classes)
    n = {"test_examples": len(test)}
    return {"zero-shot": {"test": accuracy(p_test, y_test), "dev": accuracy(p_dev, y_dev), **n},
            "knn": {"test": accuracy(interpolate(p_test, k_test, 1.0), y_test),
                    "dev": accuracy(interpolate(p_dev, k_dev, 1.0), y_dev), "k": knn.k, **n},
            "linear-probe": {"test": accuracy(predict(r_test), y_test), "dev": probe_dev, "l2": l2, **n}}


Cache = Callable[[Cell, Callable[[], dict[str, Any]]], dict[str, Any]]


def run_table(bases: dict[str, RetroPromptConfig], cells: Iterable[Cell], root: str | Path,
              train: Callable[[RetroPromptConfig], dict[str, Any]] = trained_cell,
              cache: Cache = lambda cell, fn: fn(), stop: Callable[[], bool] = lambda: False,
              ) -> tuple[list[dict[str, Any]], list[Cell]]:
    """Measure ``cells`` in order (``bases``: each data set's shared settings; trained runs in
    ``root/<cell name>``). ``cache(cell, compute)`` may return a stored measurement instead of computing it;
    once ``stop()`` is true no further cell is computed (stored ones are still read). Returns (measured cells:
    the cell's fields + its numbers, the cells not measured)."""
    features: dict[str, Features] = {}
    groups: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
    done, left = [], []

    def untrained(cell: Cell) -> dict[str, Any]:
        key = (cell.data, cell.shots, cell.seed)
        if key not in groups:
            cfg = cell_config(bases[cell.data], cell.shots, cell.seed, root)
            d = draw(cfg)
            if cell.data not in features:  # peft "full" with nothing trained: the pretrained model as it is
                bb, _ = build_backbone(replace(cfg, peft=replace(cfg.peft, method="full")), d)
                features[cell.data] = Features(bb, cfg.batch_size)
            groups[key] = untrained_cells(features[cell.data], d, cfg.knn)
        return groups[key][cell.row]

    for cell in cells:
        computed = False

        def compute(cell: Cell = cell) -> dict[str, Any]:
            nonlocal computed
            if stop():
                raise _Stopped
            computed = True
            if cell.row in UNTRAINED:
                return untrained(cell)
            return train(row_config(bases[cell.data], cell, Path(root) / cell.name()))

        try:
            done.append({"data": cell.data, "shots": cell.shots, "seed": cell.seed, "row": cell.row,
                         **cache(cell, compute), "computed": computed})
        except _Stopped:
            left.append(cell)
    return done, left


class _Stopped(Exception):
    pass


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (LM-BFF's ``np.std``, ddof 0) of ``xs``."""
    if not xs:
        raise RalmError("mean over seeds: no values")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def aggregate(measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (data, shots, row), in first-seen order: test accuracy in points, mean ± std over its seeds, and the
    per-seed values; trained rows also average examples/s, the store's share of training time and p_kNN(gold)
    on the training batches (near 1 when the example is kept in its own neighbours: p_kNN is then trivial)."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for m in measured:
        groups.setdefault((m["data"], m["shots"], m["row"]), []).append(m)
    out = []
    for (data, shots, row), ms in groups.items():
        ms = sorted(ms, key=lambda m: m["seed"])
        mean, std = mean_std([100 * m["test"] for m in ms])
        r = {"data": data, "shots": shots, "row": row, "mean": round(mean, 2), "std": round(std, 2),
             "seeds": [m["seed"] for m in ms], "per_seed": [round(100 * m["test"], 2) for m in ms],
             "test_examples": ms[0].get("test_examples")}
        for key in ("examples_per_second", "store_share", "train_p_knn_gold"):
            if all(m.get(key) is not None for m in ms):
                r[key] = round(mean_std([m[key] for m in ms])[0], 4)
        out.append(r)
    return out


def comparison(measured: Sequence[dict[str, Any]], data: str, shots: int = 16, a: str = "retroprompt",
               b: str = "prompt-ft") -> dict[str, Any]:
    """Row ``a`` vs row ``b`` on ``data`` at ``shots``, paired by seed: the mean difference in points ± its
    std over seeds, and the seed spread (the larger of the two rows' stds over the same seeds)."""
    by = {(m["row"], m["seed"]): 100 * m["test"] for m in measured if (m["data"], m["shots"]) == (data, shots)}
    seeds = sorted(s for r, s in by if r == a and (b, s) in by)
    if len(seeds) < 2:
        return {"data": data, "shots": shots, "seeds": seeds, "sentence": f"{ROW_NAMES.get(a, a)} vs "
                f"{ROW_NAMES.get(b, b)} at {shots} shots on {data}: not measured (fewer than 2 seeds of both)",
                "difference": None, "std": None, "spread": None, "beats": None, "beyond_spread": None}
    diff, dstd = mean_std([by[(a, s)] - by[(b, s)] for s in seeds])
    spread = max(mean_std([by[(r, s)] for s in seeds])[1] for r in (a, b))
    sentence = (f"{ROW_NAMES.get(a, a)} vs {ROW_NAMES.get(b, b)} at {shots} shots: {diff:+.1f} ± {dstd:.1f} "
                f"(seed spread {spread:.1f}) on {data}, {len(seeds)} seeds")
    return {"data": data, "shots": shots, "seeds": seeds, "difference": round(diff, 2), "std": round(dstd, 2),
            "spread": round(spread, 2), "beats": diff > 0, "beyond_spread": abs(diff) > spread, "sentence": sentence}


ROW_NAMES = {"retroprompt": "RetroPrompt", "prompt-ft": "prompt FT", "kept-in": "RetroPrompt with the example kept in"}
