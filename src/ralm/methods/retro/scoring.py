"""Score a document with a RETRO-fit model on the plain LM's sliding windows, retrieval on or off.

The windows are ``ralm.core.targets.window_plan``'s, so the targets and their contexts are exactly those of
``--method none``; with retrieval off no hook runs and the NLLs are the frozen model's, bit for bit.
A target at position p is predicted from position p − 1, which reads the neighbours of chunk
u = p // m − 1 when that chunk lies wholly inside the window.
"""

from __future__ import annotations

import torch

from ralm.core.neighbours import NeighbourLog
from ralm.core.targets import Targets, window_plan
from ralm.methods.retro.model import PAD, RetroFit, window_chunks
from ralm.methods.retro.neighbours import window_neighbours


@torch.inference_mode()
def retro_nll(model: RetroFit, t: Targets, context: int, stride: int, neighbours: torch.Tensor | None,
              log: NeighbourLog | None = None) -> torch.Tensor:
    """(n_targets,) NLL in nats. ``neighbours``: the document's (n_whole_chunks, K, R), or None (retrieval off)."""
    device = next(model.base.parameters()).device
    m = model.cfg.chunk_size
    out = []
    for begin, end, first in window_plan(len(t.ids), context, stride):
        inp = t.ids[begin:end].unsqueeze(0).to(device)  # (1, L)
        nb = None if neighbours is None else window_neighbours(neighbours, begin, end - begin, m).unsqueeze(0)
        keep = end - first + 1
        logits = model(inp, neighbours=nb, offset=begin, logits_to_keep=keep).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, t.ids[first:end].to(device), reduction="none").cpu())
        if log is not None:
            _log_window(log, neighbours, begin, end, first, m)
    return torch.cat(out)


def _log_window(log: NeighbourLog, neighbours: torch.Tensor | None, begin: int, end: int, first: int,
                m: int) -> None:
    """Record, per run of targets that read the same chunk, the neighbours they read (none outside CCA)."""
    _, c0, U = window_chunks(begin, end - begin, m)
    p = first
    while p < end:
        u = p // m - 1  # the chunk whose neighbours position p - 1 reads
        stop = min(end, (u + 2) * m)  # targets up to here read chunk u
        used = []
        if neighbours is not None and c0 <= u < c0 + U and u < len(neighbours):
            used = [row[row != PAD].tolist() for row in neighbours[u] if (row != PAD).any()]
        log.add(p, stop, used)
        p = stop
