"""Neural demonstrations: per class, a similarity-weighted sum of that class's nearest stored representations.

For a query and each class c: the top-m rows of class c by cosine similarity (``store.search(label=c)``), their
similarities z-scored over the m, softmax weights, and the weighted sum of their raw representations::

    z_j = (s_j − mean(s)) / std(s)      w = softmax(z)      demo_c = Σ_j w_j · rep_j         (d,)

as the reference does (its GLUE datasets; std is torch's unbiased one). When the m similarities are all equal
(m = 1, or ties) z is taken as 0: uniform weights instead of the reference's NaN. In training the query's own
row is left out (``rows``). The (B, C, d) result enters the prompt at the class placeholders
(``PromptModel.forward(batch, demo_vectors)``); any other consumer (a vision head) takes it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ralm.errors import RalmError
from ralm.methods.retroprompt.store import KnowledgeStore


def zscore_weights(sims: torch.Tensor) -> torch.Tensor:
    """(Q, m) similarities -> (Q, m) softmax weights over their z-scores (uniform where they are all equal)."""
    s = sims.float()
    mean = s.mean(dim=-1, keepdim=True)
    std = s.std(dim=-1, keepdim=True) if s.shape[-1] > 1 else torch.zeros_like(mean)
    z = torch.where(std > 1e-12, (s - mean) / std.clamp(min=1e-12), torch.zeros_like(s))
    return torch.softmax(z, dim=-1)


def _found_weights(sims: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """``zscore_weights`` over each query's found neighbours only; 0 for the missing ones (none found: a zero
    demonstration, the slot kept: equal context length)."""
    w = torch.zeros_like(sims, dtype=torch.float32)
    for i in range(len(sims)):
        if bool(found[i].any()):
            w[i, found[i]] = zscore_weights(sims[i, found[i]][None])[0]
    return w


def neural_demos(store: KnowledgeStore, queries: torch.Tensor, m: int = 8,
                 rows: Sequence[int] | None = None) -> torch.Tensor:
    """(Q, d) representations -> (Q, C, d) one demonstration per class; ``rows``: the queries' own store rows
    (left out; None for queries from outside the store). A class with no examples, or fewer than ``m`` once the
    query is left out, is refused."""
    for c, members in enumerate(store.members):
        if len(members) == 0:
            raise RalmError(f"neural demonstrations: class {store.class_names[c]!r} has no examples in the "
                            "knowledge store")
    out = torch.empty(len(queries), store.n_classes, store.dim)
    for c in range(store.n_classes):
        sims, ids = store.search(queries, m, exclude=rows, label=c, flag="--demos")  # (Q, m)
        found = ids >= 0  # a store ablation (ralm diagnose) may leave neighbours out: id -1, weight 0
        w = zscore_weights(sims) if bool(found.all()) else _found_weights(sims, found)  # (Q, m)
        out[:, c] = torch.einsum("qm,qmd->qd", w, store.raw[ids.clamp(min=0)])
    return out
