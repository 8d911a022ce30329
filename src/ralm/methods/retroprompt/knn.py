"""p_kNN over the knowledge store, the kNN-guided loss and the interpolation at inference.

    p_kNN(y) = Σ_{top-k neighbours j with label y} softmax_j(sim_j / T)          sim = cosine (store.py)
    loss     = mean_i (1 + β · (−log p_kNN(y_i))) · CE_i                       p_kNN detached
    p        = (1 − λ) · p_model + λ · p_kNN

The reference (PromptKG RetroPrompt, GLUE tasks): softmax over the top-16 raw inner products, no temperature
(T = 1 here); its loss multiplies the batch means, CE_mean · (1 + β · mean(−log p_kNN)), with log p_kNN
clamped at −100 and p_kNN computed from FAISS outputs (so without gradient), β = 1e-4 in its script. Here the
weight is per example, as the paper writes it, with the same clamp. Its interpolation adds the
*probabilities* as if they were log-probabilities (``logsumexp(p + log coeff)``); here it is the mixture
written above, in probability space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ralm.errors import RalmError
from ralm.methods.retroprompt.store import KnowledgeStore

LOG_FLOOR = -100.0  # the reference's clamp: a label no neighbour has costs 100 nats, not infinity


@dataclass
class KNNConfig:
    k: int = field(default=16, metadata={"help": "neighbours read from the knowledge store for p_kNN"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature over the cosine similarities"})
    beta: float = field(default=1e-4, metadata={
        "help": "kNN-guided loss: CE is scaled by 1 + beta * (-log p_kNN(y)); 0 = plain cross-entropy"})
    lmbda: float = field(default=0.2, metadata={"help": "weight of p_kNN in the interpolation at inference, "
                                                        "in [0, 1]; 0 = the prompt model alone"})
    leave_self_out: bool = field(default=True, metadata={
        "help": "drop a training example's own row from its neighbours (the reference keeps it in)"})
    demos: int = field(default=8, metadata={
        "help": "neighbours per class summed into a neural demonstration (m; the reference: 8 at 16 shots, 2 at "
                "4); 0 = no demonstrations"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RalmError(f"--k {self.k}: must be >= 1")
        if not self.temperature > 0:
            raise RalmError(f"--temperature {self.temperature}: must be > 0")
        if not self.beta >= 0:
            raise RalmError(f"--beta {self.beta}: must be >= 0")
        if not 0 <= self.lmbda <= 1:
            raise RalmError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        if self.demos < 0:
            raise RalmError(f"--demos {self.demos}: must be >= 0 (0 = no demonstrations)")


def knn_probs(sims: torch.Tensor, labels: torch.Tensor, n_classes: int, temperature: float = 1.0) -> torch.Tensor:
    """(Q, k) similarities and (Q, k) neighbour labels -> (Q, C) float32 p_kNN."""
    w = torch.softmax(sims.float() / temperature, dim=-1)  # (Q, k)
    return w.new_zeros(w.shape[0], n_classes).scatter_add_(1, labels.long(), w)


def store_knn_probs(store: KnowledgeStore, queries: torch.Tensor, config: KNNConfig,
                    rows: Sequence[int] | None = None) -> torch.Tensor:
    """(Q, d) representations -> (Q, C) p_kNN from ``store``. ``rows``: the queries' own store rows (training
    examples), left out when ``config.leave_self_out``; None for queries from outside the store."""
    exclude = rows if rows is not None and config.leave_self_out else None
    sims, ids = store.search(queries, config.k, exclude=exclude)
    found = ids >= 0  # (Q, k) a store ablation (ralm diagnose) may leave neighbours out: id -1
    labels = torch.from_numpy(store.labels[ids.clamp(min=0).numpy()])  # (Q, k)
    if bool(found.all()):
        return knn_probs(sims, labels, store.n_classes, config.temperature)
    p = knn_probs(sims.masked_fill(~found, float("-inf")), labels, store.n_classes, config.temperature)
    none = ~found.any(dim=1)  # no neighbour at all: p_kNN says nothing (uniform), the argmax is p_model's
    return torch.where(none[:, None], torch.full_like(p, 1.0 / store.n_classes), p)


def knn_guided_loss(class_logits: torch.Tensor, targets: torch.Tensor, p_knn: torch.Tensor,
                    beta: float) -> torch.Tensor:
    """Mean over the batch of (1 + β·(−log p_kNN(y)))·CE; ``class_logits`` (B, C) log p_model (or any logits),
    ``targets`` (B,), ``p_knn`` (B, C) (detached here). β = 0 is exactly the mean cross-entropy."""
    if beta == 0:  # F's own mean: a sum of the weighted terms could round differently in the last bit
        return F.cross_entropy(class_logits.float(), targets)
    ce = F.cross_entropy(class_logits.float(), targets, reduction="none")  # (B,)
    nll = -p_knn.detach().float().gather(1, targets[:, None])[:, 0].log().clamp(min=LOG_FLOOR)  # (B,)
    return ((1 + beta * nll.to(ce.device)) * ce).mean()


def interpolate(p_model: torch.Tensor, p_knn: torch.Tensor, lmbda: float) -> torch.Tensor:
    """(1 − λ)·p_model + λ·p_kNN, both (B, C) probabilities; λ = 0 returns p_model, λ = 1 p_kNN, exactly
    (x·1 + 0 = x in floating point)."""
    if not 0 <= lmbda <= 1:
        raise RalmError(f"--lmbda {lmbda}: must be in [0, 1]")
    if p_model.shape != p_knn.shape:
        raise RalmError(f"kNN interpolation: p_model {tuple(p_model.shape)} and p_kNN {tuple(p_knn.shape)} differ")
    return (1 - lmbda) * p_model + lmbda * p_knn.to(device=p_model.device, dtype=p_model.dtype)
