"""Forward passes over ``task_inputs`` batches through a PEFT handle, for both archs: the target-token loss
(training, validation), per-row target log-likelihoods (multiple choice) and batched greedy generation (QA,
summaries). Shared by ``ralm tune`` and ``ralm eval-task`` so both compute a score the same way.

Greedy generation keeps the KV cache: one full pass over the prompt, then one token per step (the virtual
tokens of prompt methods are in the cache after the first pass). On RETRO-fit the model's ``RetroCache`` goes
with it: the first CCA layer's activations, and each chunk's encoding once its last token is in, so a step
costs one position instead of the window (``cache=False`` recomputes the window every step: the reference
the tests compare with).
``logits_to_keep=1`` keeps the LM head to one position. ``stop_at_newline`` (QA, whose answer is the first
line) ends a row at the first newline after some text: the answer it scores is the same, the tokens after it
are never computed.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ralm.methods.peft import PeftHandle
from ralm.methods.retro.model import RetroCache, window_chunks
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
def greedy(handle: PeftHandle, enc: TaskEncoder, prompts: Sequence[Encoded], max_new: int,
           stop_at_newline: bool = False, cache: bool | None = None) -> list[list[int]]:
    """Greedy continuations of a batch of prompts (stopping at EOS, and with ``stop_at_newline`` at the first
    newline after some text), token ids without the EOS. ``cache``: keep the KV cache (default) or recompute
    the window every step."""
    steps = _window_steps(handle, enc, prompts) if cache is False else _cached_steps(handle, enc, prompts)
    B = len(prompts)
    done = torch.zeros(B, dtype=torch.bool)
    rows: list[list[int]] = [[] for _ in range(B)]
    nxt = next(steps)  # (B,) the first token of every row
    for i in range(max_new):
        if i:  # a done row's token only feeds its own (discarded) continuation
            nxt = steps.send(nxt)
        for b in range(B):
            if not done[b]:
                rows[b].append(int(nxt[b]))
                done[b] = (enc.eos is not None and nxt[b] == enc.eos) or (
                    stop_at_newline and "\n" in enc.tok.decode(rows[b], skip_special_tokens=True).lstrip())
        if bool(done.all()):
            break
    steps.close()
    return [row if enc.eos is None else _until(row, enc.eos) for row in rows]


def _window_steps(handle: PeftHandle, enc: TaskEncoder, prompts: Sequence[Encoded]
                  ) -> Generator[torch.Tensor, torch.Tensor, None]:
    """Generator of next tokens (B,), recomputing the whole window every step; send it the tokens chosen."""
    batch = enc.collate(prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    while True:
        step = {"input_ids": ids, "attention_mask": mask, "neighbours": enc.batch_neighbours(prompts, ids.shape[1])}
        nxt = yield logits(handle, step, keep=1)[:, -1].float().argmax(-1).cpu()
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)


def _cached_steps(handle: PeftHandle, enc: TaskEncoder, prompts: Sequence[Encoded]
                  ) -> Generator[torch.Tensor, torch.Tensor, None]:
    """Generator of next tokens (B,) with the KV cache: the prompt (and any virtual tokens) once, then the
    chosen token alone at the next position of each row. RETRO-fit: every chunk after the prompt's reads the
    row's k chunks, as ``batch_neighbours`` gives them to a window."""
    dev = device_of(handle)
    batch = enc.collate(prompts)
    ids = batch["input_ids"]
    nb = enc.batch_neighbours(prompts, ids.shape[1])
    kw = handle.inputs(ids.to(dev), batch["attention_mask"].to(dev), neighbours=None if nb is None else nb.to(dev))
    kw = {k: v for k, v in kw.items() if v is not None}
    retro = {}
    if "neighbours" in kw:  # (B, U, K, R) for the prompt's whole chunks (virtual ones in front: PAD)
        retro = {"neighbours": kw["neighbours"], "offset": kw["offset"], "retro_cache": RetroCache()}
        row = enc.batch_neighbours(prompts, enc.m)[:, 0].to(dev)  # (B, K, R) what each later chunk reads
        kw.update(retro)
    mask = kw["attention_mask"]  # (B, N + P): virtual positions included
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -1:]  # (B, 1) position of each row's last token
    out = handle.model(**kw, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1)
    while True:
        nxt = yield out.logits[:, -1].float().argmax(-1).cpu()
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=dev)], 1)
        pos = pos + 1
        if retro:
            U = window_chunks(retro["offset"], mask.shape[1], enc.m)[2]
            have = retro["neighbours"]
            if U > have.shape[1]:
                retro["neighbours"] = torch.cat([have, row[:, None].expand(-1, U - have.shape[1], -1, -1)], 1)
        out = handle.model(input_ids=nxt[:, None].to(dev), attention_mask=mask, position_ids=pos,
                           past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1, **retro)


def _until(row: list[int], stop: int) -> list[int]:
    return row[: row.index(stop)] if stop in row else row
