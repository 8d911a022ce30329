"""The plain LM, no retrieval: sliding-window NLL of every target (the baseline every method is compared with)."""

from __future__ import annotations

from typing import Any

import torch

from ralm.core.registry import Method, MethodContext, Session, register_method
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


def _open(ctx: MethodContext) -> Session:
    return Session()  # no scorer: the evaluator's own sliding windows


def _generate(model: Any, tokenizer: Any, cfg: Any, ds: Any, state: Any) -> Any:
    """``ralm generate`` step: the next-token logits from the last ``cfg.context`` tokens."""
    device = next(model.parameters()).device

    def step(ids: list[int], n_prompt: int, retrievals: list[dict[str, Any]]) -> torch.Tensor:
        inp = torch.tensor(ids[max(0, len(ids) - cfg.context):], dtype=torch.long)[None].to(device)
        return model(input_ids=inp, logits_to_keep=1).logits[0, -1]

    return step


register_method(Method(name="none", help="the plain LM on sliding windows (no retrieval)", store="none",
                       open=_open, generate=_generate))
