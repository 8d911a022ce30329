"""What every method scores: a document's targets and the windows that cover them.

Every method scores the same *targets*: each token of a document is predicted from the tokens before it
(after the model's plain-text start token, ``ralm.core.start_token.start_token``: the BOS, or the document
separator where the BOS is a chat-turn token; where there is none, the first token is not scored). No model
code lives here: methods, the kNN-LM store builder, training and evaluation all import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ralm.core.start_token import start_token_id
from ralm.data.document import Document
from ralm.errors import RalmError


@dataclass
class Targets:
    """One document as the model sees it: ids (after the start token, if any) and the span of text scored."""

    doc_id: str
    ids: torch.Tensor  # (n,) input ids; targets are ids[first:], each predicted from ids[:t]
    first: int  # index of the first scored target (1: position 0 is the start token or an unscored first token)
    scored_bytes: int  # UTF-8 bytes of the text covered by the targets

    @property
    def n_targets(self) -> int:
        return len(self.ids) - self.first


def make_targets(doc: Document, tokenizer: Any) -> Targets:
    """Tokenize a document; raise when it has nothing to score."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    bos = start_token_id(tokenizer)
    if bos is not None:
        ids = [bos, *ids]
        scored_text = doc.text
    elif len(ids) >= 2:
        scored_text = doc.text[offsets[1][0]:]  # the first token has no context: not scored
    else:
        scored_text = ""
    if len(ids) < 2:
        raise RalmError(f"document {doc.id!r}: {len(ids)} token(s) after tokenization; nothing to score")
    return Targets(doc.id, torch.tensor(ids, dtype=torch.long), 1, len(scored_text.encode("utf-8")))


def window_plan(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_target)`` covering targets 1..n-1 exactly once.

    The first window scores everything it holds; each later one scores the next ``stride`` targets
    from the ``context`` tokens ending at them, so every target sees at least ``context - stride``
    tokens of context (all of them, up to ``context``, near the start). A stride of ``context`` acts as
    ``context - 1``: the logits predicting a window's first target come from the token before it.
    """
    stride = min(stride, context - 1)
    plan = []
    end = min(context, n)
    plan.append((0, end, 1))
    while end < n:
        first, end = end, min(end + stride, n)
        plan.append((max(0, end - context), end, first))
    return plan


def model_context(model: Any, requested: int | None, cap: int = 2048) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or cap
    ctx = requested or min(limit, cap)
    if ctx > limit:
        raise RalmError(f"--context {ctx}: the model handles at most {limit} positions")
    return ctx


def default_stride(context: int, requested: int | None) -> int:
    """New tokens scored per window: ``requested``, or half the context (the rest is context for them)."""
    return requested or max(1, context // 2)


def summarize(nll_sum: float, tokens: int, n_bytes: int, seconds: float, **extra: Any) -> dict:
    return {
        "ppl": math.exp(nll_sum / tokens), "bpb": nll_sum / math.log(2) / n_bytes, "nll": nll_sum / tokens,
        "tokens": tokens, "bytes": n_bytes, "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), **extra,
    }
