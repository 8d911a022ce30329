"""One training step's loss and the inference probabilities of RetroPrompt, over any ``Backbone``.

Training (``training_loss``): the batch's queries are the backbone's representations WITHOUT demonstrations
(what the store keys on); with demonstrations on, one extra no-grad forward gives them, since the forward
that trains carries the demonstrations. p_kNN leaves each example's own row out when
``KNNConfig.leave_self_out``; the demonstrations always do. Inference (``class_probs``): queries from outside
the store, so nothing is left out; p_model and p_kNN are returned apart, for ``interpolate`` at any λ.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.methods.retroprompt.backbone import Backbone
from ralm.methods.retroprompt.demos import neural_demos
from ralm.methods.retroprompt.knn import KNNConfig, interpolate, knn_guided_loss, store_knn_probs
from ralm.methods.retroprompt.store import KnowledgeStore


@dataclass
class StepLoss:
    loss: torch.Tensor  # () the kNN-guided loss, differentiable
    p_knn_gold: float  # mean p_kNN of the gold label over the batch (how trivial p_kNN is on training data)


def training_loss(backbone: Backbone, store: KnowledgeStore, examples: Sequence[LabelledExample],
                  rows: Sequence[int], targets: torch.Tensor, cfg: KNNConfig) -> StepLoss:
    """The loss of a batch of training examples (``rows``: their store rows; ``targets`` (B,) class indices)."""
    if cfg.demos:
        q = backbone.represent(examples, len(examples))  # (B, d) the current model's, no demonstrations
        out = backbone.forward(examples, neural_demos(store, q, cfg.demos, rows=rows))
    else:
        out = backbone.forward(examples, None)
        q = out.reps  # (B, d) the same representation, no extra forward
    p_knn = store_knn_probs(store, q, cfg, rows=rows)  # (B, C)
    gold = p_knn.gather(1, targets.cpu()[:, None])[:, 0]  # (B,)
    return StepLoss(knn_guided_loss(out.class_logits, targets.to(out.class_logits.device), p_knn, cfg.beta),
                    float(gold.mean()))


@torch.no_grad()
def class_probs(backbone: Backbone, store: KnowledgeStore, examples: Sequence[LabelledExample], cfg: KNNConfig,
                batch_size: int = 16, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_model (n, C), p_kNN (n, C)) float32 on the CPU for examples outside the store; call it with the
    backbone's module in eval mode."""
    if not examples:
        raise RalmError("scoring: no examples")
    pm, pk = [], []
    for b in tqdm(range(0, len(examples), batch_size), desc="scoring", unit="batch", disable=not progress,
                  file=sys.stderr):
        part = examples[b:b + batch_size]
        if cfg.demos:
            q = backbone.represent(part, batch_size)  # (B, d)
            out = backbone.forward(part, neural_demos(store, q, cfg.demos))
        else:
            out = backbone.forward(part, None)
            q = out.reps
        pm.append(out.class_logits.float().exp().cpu())
        pk.append(store_knn_probs(store, q, cfg))
    return torch.cat(pm), torch.cat(pk)


def accuracy(p: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of rows whose most probable class is the target ((n, C) probabilities, (n,) indices)."""
    return float((p.argmax(-1) == targets).float().mean())


def choose_lmbda(p_model: torch.Tensor, p_knn: torch.Tensor, targets: torch.Tensor,
                 grid: Sequence[float]) -> tuple[float, dict[str, float]]:
    """The λ of ``grid`` with the best accuracy of the interpolation (ties: the first in grid order) and the
    accuracy of each."""
    scores = {f"{lm:g}": accuracy(interpolate(p_model, p_knn, lm), targets) for lm in grid}
    best = max(grid, key=lambda lm: (scores[f"{lm:g}"], -list(grid).index(lm)))
    return float(best), scores
