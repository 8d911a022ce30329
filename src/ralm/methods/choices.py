"""Log-likelihood of continuations given a prompt under a Hugging Face causal LM: how multiple-choice answers
are scored (the model half of ``eval/task_metrics.choice_accuracy``; eval and tuning can both use it).

One forward pass per (prompt + continuation), right-padded in batches: with causal attention the padding
after a row never reaches its tokens, so a batched score equals the row scored alone (up to float rounding).
Log-softmax in float32. The prompt is recomputed for every choice (no shared KV cache): TruthfulQA's prompts
are short and it has at most 5 MC1 choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ralm.errors import RalmError


@torch.inference_mode()
def continuation_logliks(model: Any, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]],
                         batch_size: int = 8) -> list[float]:
    """For each continuation c: sum over its tokens of log p(c_j | prompt, c_<j) in nats. ``prompt_ids``
    must be non-empty (it supplies the position that predicts c_0: start the prompt with the start token)."""
    if not prompt_ids:
        raise RalmError("choice scoring: empty prompt (it needs at least the start token)")
    if batch_size < 1:
        raise RalmError(f"choice scoring: batch size {batch_size} must be >= 1")
    if any(len(c) == 0 for c in continuations):
        raise RalmError("choice scoring: an empty continuation (a choice must have at least one token)")
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = len(prompt_ids) + max((len(c) for c in continuations), default=0)
    if limit and longest > limit:
        raise RalmError(f"choice scoring: prompt + choice is {longest} tokens, the model handles {limit}")
    device = next(model.parameters()).device
    rows = [list(prompt_ids) + list(c) for c in continuations]
    start = len(prompt_ids) - 1  # position whose logits predict the continuation's first token
    out: list[float] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, L); pad id 0 is never attended to
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, start:-1].float()  # (B, L-1-start, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, start + 1:, None])[..., 0]  # (B, L-1-start)
        for i, r in enumerate(batch):
            out.append(float(logp[i, :len(r) - len(prompt_ids)].sum()))
    return out
