"""kNN-LM (Khandelwal et al. 2020): a next-token distribution from the nearest stored LM states.

    p_kNN(w) ∝ Σ_{neighbours j with value w} exp(-d_j / T)
    p(w)     = λ · p_kNN(w) + (1 - λ) · p_LM(w)        computed in log space (logaddexp)

Keys are the LM's final hidden states at every corpus position, values the next token. Paper defaults:
k = 1024, λ = 0.25, T = 1, d = squared L2 distance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ralm.errors import RalmError


@dataclass
class KNNLMConfig:
    k: int = field(default=1024, metadata={"help": "neighbours per position"})
    lmbda: float = field(default=0.25, metadata={"help": "weight of p_kNN in the interpolation, in [0, 1]"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature over -distance"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RalmError(f"--k {self.k}: must be >= 1")
        if not 0.0 <= self.lmbda <= 1.0:
            raise RalmError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        if not self.temperature > 0:
            raise RalmError(f"--temperature {self.temperature}: must be > 0")


def knn_log_probs(distances: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """log p_kNN of shape (B, V) from neighbour distances (B, k) and their next-token values (B, k).

    ``valid`` (B, k) masks out padding neighbours (e.g. -1 ids from an index with fewer than k hits);
    a row with no valid neighbour gets -inf everywhere (the interpolation then falls back to the LM).
    """
    scores = -distances.float() / temperature  # (B, k)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, k); all -inf rows -> nan -> 0
    probs = torch.zeros(scores.shape[0], vocab_size, dtype=torch.float32, device=scores.device)
    probs.scatter_add_(1, values.clamp(min=0).long(), weights)  # sum weights of neighbours sharing a token
    return probs.log()


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs_: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(λ·p_kNN + (1-λ)·p_LM), exactly the LM's log-probs when λ = 0 and exactly p_kNN when λ = 1."""
    if lmbda == 0.0:
        return lm_log_probs
    if lmbda == 1.0:
        return knn_log_probs_
    return torch.logaddexp(knn_log_probs_ + math.log(lmbda), lm_log_probs.float() + math.log1p(-lmbda))
