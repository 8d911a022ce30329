"""The plain LM, no retrieval: sliding-window NLL of every target (the baseline every method is compared with)."""

from __future__ import annotations

from typing import Any

import torch

from ralm.core.targets import Targets, window_plan


@torch.inference_mode()
def token_nll(model: Any, t: Targets, context: int, stride: int) -> torch.Tensor:
    """(n_targets,) NLL in nats of every target of ``t`` under plain sliding-window evaluation."""
    device = next(model.parameters()).device
    out = []
    for begin, end, first in window_plan(len(t.ids), context, stride):
        inp = t.ids[begin:end].unsqueeze(0).to(device)  # (1, L)
        keep = end - first + 1  # logits of positions first-1 .. end-1; the last one predicts nothing scored
        logits = model(input_ids=inp, logits_to_keep=keep).logits[0, :-1].float()  # (end-first, V)
        targets = t.ids[first:end].to(device)
        out.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
    return torch.cat(out)
