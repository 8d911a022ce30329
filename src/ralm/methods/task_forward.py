"""Forward passes over ``task_inputs`` batches through a PEFT handle, for both archs: the target-token loss
(training, validation), per-row target log-likelihoods (multiple choice) and batched greedy generation (QA,
summaries). Shared by ``ralm tune`` and ``ralm eval-task`` so both compute a score the same way.

Greedy generation recomputes the whole window every step (no KV cache): RETRO-fit's CCA hooks read the
window's chunks, which a one-token cached step does not have. ``logits_to_keep=1`` keeps the LM head to
one position; prompts are short next to the cost of the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ralm.methods.peft import PeftHandle
from ralm.methods.task_inputs import IGNORE, Encoded, TaskEncoder


def device_of(handle: PeftHandle) -> torch.device:
    return next(handle.model.parameters()).device


def logits(handle: PeftHandle, batch: dict[str, Any], keep: int | None = None) -> torch.Tensor:
    """(B, L, V) logits of the batch's real positions (``keep``: only the last ``keep``)."""
    dev = device_of(handle)
    nb = batch["neighbours"]
    kw = handle.inputs(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                       neighbours=None if nb is None else nb.to(dev), offset=0)
    kw = {k: v for k, v in kw.items() if v is not None or k == "neighbours"}
    # positions count from each row's first real token, so left padding (and so the batch a row is in)
    # changes nothing (RETRO-fit's chunk grid is the window's, not these)
    kw["position_ids"] = (kw["attention_mask"].cumsum(1) - 1).clamp(min=0)
    if keep is not None:
        kw["logits_to_keep"] = keep
    out = handle.model(**kw).logits
    return out if keep is not None else handle.strip(out)


def target_nll(handle: PeftHandle, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed target NLL (B,) in nats (float32) and target token counts (B,)."""
    lg = logits(handle, batch)[:, :-1].float()  # (B, L-1, V) predicts positions 1..L-1
    labels = batch["labels"][:, 1:].to(lg.device)  # (B, L-1)
    nll = F.cross_entropy(lg.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape).sum(1)
    return nll, (labels != IGNORE).sum(1)


def target_loss(handle: PeftHandle, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """Mean target-token cross entropy of the batch and the tokens it averages over."""
    nll, n = target_nll(handle, batch)
    total = int(n.sum())
    return nll.sum() / max(total, 1), total


@torch.no_grad()
def greedy(handle: PeftHandle, enc: TaskEncoder, prompts: Sequence[Encoded], max_new: int) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (stopping at EOS), token ids without the EOS."""
    batch = enc.collate(prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool)
    out = torch.empty(B, 0, dtype=torch.long)
    for _ in range(max_new):
        step = {"input_ids": ids, "attention_mask": mask, "neighbours": enc.batch_neighbours(prompts, ids.shape[1])}
        nxt = logits(handle, step, keep=1)[:, -1].float().argmax(-1).cpu()  # (B,)
        if enc.eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, enc.eos), nxt)
            done |= nxt == enc.eos
        out = torch.cat([out, nxt[:, None]], 1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
        if bool(done.all()):
            break
    return [row if enc.eos is None else _until(row, enc.eos) for row in out.tolist()]


def _until(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop)] if stop in row else row
