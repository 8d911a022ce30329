"""``ralm diagnose --run RP`` over a RetroPrompt run (issue 15 on issue 14's method): what ralm.eval.diagnose
cannot build itself, as eval may not import tuning (the CLI hands it ``PromptTuner.retroprompt``).

``RetroPromptSubject(run, split, limit)`` re-loads the finished run (``load_run``: config, weights, the trained
model's store, λ) and scores the split's examples, 0 or 100 accuracy points each, under any retriever wrapper:
every search the knowledge store answers (p_kNN over all rows, each class's demonstrations) goes through the
wrapper (``KnowledgeStore.wrapped``), so the store ablations of ralm.core.ablations act on RetroPrompt as on
the LM methods, at equal context: "none" leaves every neighbour out (p_kNN uniform: the argmax is p_model's;
zero demonstration vectors in their slots), "random" draws random rows of the channel (a class's search: that
class's rows), "shuffled" hands each example another example's lists, "fixed" one row per channel for all,
"random-text" keeps the rows but sums the representations of random text (each training example's word count
of words drawn from the training texts) into the demonstrations.

- ``base``: the frozen base, zero-shot: p_model of the untrained LM with the run's template and verbalizer.
- ``baseline``: prompt tuning, ``--n-virtual`` virtual tokens on the same frozen LM, the same few-shot draw,
  steps and batch, without retrieval (β = 0, λ = 0, no demonstrations: LM-BFF-style training of the prompt
  alone), one run per learning rate under ``out``, the one of the best dev accuracy kept.

Image runs are refused: their frozen backbone takes no prompt, and they have no text to randomise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ralm.core.retriever import Retriever
from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.methods.peft import PeftConfig
from ralm.methods.retroprompt.backbone import Backbone, eval_mode, label_indices
from ralm.methods.retroprompt.knn import KNNConfig, interpolate
from ralm.methods.retroprompt.scoring import class_probs
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.tuning.retroprompt import build_backbone, counts, load_run, train_retroprompt

SPLITS = ("dev", "test")


def correct(bb: Backbone, store: KnowledgeStore, examples: Sequence[LabelledExample], knn: KNNConfig,
            lmbda: float, batch_size: int = 16) -> np.ndarray:
    """(n,) accuracy points per example, as the task runs' per-example metrics: 100 where (1 − λ)·p_model +
    λ·p_kNN puts the gold class first, else 0."""
    with eval_mode(bb.module()), torch.no_grad():
        p_model, p_knn = class_probs(bb, store, examples, knn, batch_size)
    hit = interpolate(p_model, p_knn, lmbda).argmax(-1) == label_indices(bb, examples)
    return 100.0 * hit.float().numpy().astype(np.float64)


def random_texts(examples: Sequence[LabelledExample], seed: int) -> list[LabelledExample]:
    """Each example with its text replaced by as many words drawn (seeded, with replacement) from all the
    examples' words: the same word-count distribution, no content."""
    words = [w for e in examples for w in e.text.split()] or ["the"]
    rng = np.random.default_rng(seed)
    return [replace(e, text=" ".join(words[i] for i in rng.integers(0, len(words), size=max(1, len(e.text.split())))))
            for e in examples]


class RetroPromptSubject:
    """A finished text RetroPrompt run as ralm.eval.diagnose's subject (module docstring)."""

    metric = "acc"

    def __init__(self, run: str | Path, split: str = "test", limit: int | None = None) -> None:
        if split not in SPLITS:
            raise RalmError(f"--split {split!r}: a RetroPrompt run scores {' or '.join(SPLITS)}")
        self.run = str(run)
        self.r = load_run(run)
        cfg = self.r.cfg
        if cfg.images:
            raise RalmError(f"--run {run}: an image run; ralm diagnose reads text RetroPrompt runs (the frozen "
                            "vision backbone takes no prompt to tune, and there is no text to randomise)")
        examples = self.r.draw.split.dev if split == "dev" else self.r.draw.test
        self.examples = list(examples[:limit] if limit else examples)
        if len(self.examples) < 2:
            raise RalmError(f"--run {run}: {len(self.examples)} {split} example(s); diagnose needs at least 2")
        self.split, self.lmbda = split, float(self.r.meta["lmbda"])
        train = self.r.draw.split.train
        bb = self.r.backbone
        self.r.store.random_payload = lambda seed: bb.represent(random_texts(train, seed), cfg.batch_size)
        self.trained_parameters = int(counts(bb)["trainable"])
        self.info = {"run": self.run, "method": "retroprompt", "data": cfg.data, "shots": cfg.shots,
                     "seed": cfg.seed, "model": cfg.model, "peft": cfg.peft.method, "split": split,
                     "lmbda": self.lmbda, "k": cfg.knn.k, "demos": cfg.knn.demos}

    @property
    def store(self) -> KnowledgeStore:
        return self.r.store

    def measure(self, wrap: Callable[[Retriever], Retriever] | None) -> np.ndarray:
        """(n,) correctness of the run on the split, every knowledge-store search through ``wrap``."""
        if wrap is None:
            return correct(self.r.backbone, self.store, self.examples, self.r.cfg.knn, self.lmbda,
                           self.r.cfg.batch_size)
        with self.store.wrapped(wrap):
            return correct(self.r.backbone, self.store, self.examples, self.r.cfg.knn, self.lmbda,
                           self.r.cfg.batch_size)

    def base(self) -> np.ndarray:
        """(n,) correctness of the frozen base zero-shot (p_model of the untrained LM, no store, no demos)."""
        cfg = replace(self.r.cfg, peft=PeftConfig(method="full"))
        bb, _ = build_backbone(cfg, self.r.draw)  # a fresh copy of the pretrained LM, nothing trained
        # λ = 0 and no demonstrations: the store is never read into the prediction (class_probs wants one)
        return correct(bb, self.store, self.examples, replace(cfg.knn, demos=0), 0.0, cfg.batch_size)

    def baseline(self, out: str | Path, n_virtual: int = 16, lrs: Sequence[float] = (3e-3, 3e-2, 3e-1),
                 steps: int | None = None, progress: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        """Prompt tuning without retrieval for each learning rate (module docstring); the best on dev, scored
        on the subject's examples: ((n,) correctness, what was trained)."""
        if not lrs:
            raise RalmError("--baseline-lrs: give at least one learning rate")
        cfg = self.r.cfg
        steps = steps or cfg.steps
        knn = replace(cfg.knn, beta=0.0, demos=0)
        sweep: dict[str, float] = {}
        best: tuple[float, float, str, int] | None = None
        for lr in lrs:
            pcfg = replace(cfg, out=str(Path(out) / f"lr-{lr:g}"), peft=PeftConfig(method="prompt", n_virtual=n_virtual),
                           knn=knn, lmbda=0.0, refresh="never", steps=steps, lr=lr, force=True, eval_every=0)
            s = train_retroprompt(pcfg, progress=progress)
            dev = float(s["dev"]["accuracy"])
            sweep[f"{lr:g}"] = dev
            if best is None or dev > best[0]:
                best = (dev, lr, s["run"], int(s["trainable"]))
        assert best is not None
        pt = load_run(best[2])
        values = correct(pt.backbone, pt.store, self.examples, pt.cfg.knn, 0.0, cfg.batch_size)
        return values, {"run": best[2], "lr": best[1], "sweep": sweep, "trainable": best[3], "steps": steps,
                        "validation": "dev accuracy of each run (p_model)"}
