"""Language-model evaluation: sliding-window perplexity and true bits per byte.

Every method scores the same *targets*: each token of a document is predicted from the tokens before it
(after the model's plain-text start token, ``ralm.lm.presets.start_token``: the BOS, or the document
separator where the BOS is a chat-turn token; where there is none, the first token is not scored). Perplexity is
exp(mean NLL) over those targets; bits per byte is their total NLL in bits over the UTF-8 bytes of the
text they cover — not log2(ppl)/8, which would depend on the tokenizer.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.lm.presets import start_token, start_token_id


@dataclass
class LMEvalConfig:
    context: int | None = field(default=None, metadata={"help": "tokens per window (default: model max, capped at 2048)"})
    window_stride: int | None = field(
        default=None, metadata={"help": "new tokens scored per window; the rest is context (default context/2)"}
    )
    max_docs: int | None = field(default=None, metadata={"help": "evaluate at most this many documents"})

    def __post_init__(self) -> None:
        if self.context is not None and self.context < 2:
            raise RalmError(f"--context {self.context}: must be >= 2")
        if self.window_stride is not None and self.window_stride < 1:
            raise RalmError(f"--window-stride {self.window_stride}: must be >= 1")
        if self.context and self.window_stride and self.window_stride > self.context:
            raise RalmError(f"--window-stride {self.window_stride} exceeds --context {self.context}")
        if self.max_docs is not None and self.max_docs < 1:
            raise RalmError(f"--max-docs {self.max_docs}: must be >= 1")


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


def model_context(model: Any, requested: int | None, cap: int = 2048) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or cap
    ctx = requested or min(limit, cap)
    if ctx > limit:
        raise RalmError(f"--context {ctx}: the model handles at most {limit} positions")
    return ctx


def summarize(nll_sum: float, tokens: int, n_bytes: int, seconds: float, **extra: Any) -> dict:
    return {
        "ppl": math.exp(nll_sum / tokens), "bpb": nll_sum / math.log(2) / n_bytes, "nll": nll_sum / tokens,
        "tokens": tokens, "bytes": n_bytes, "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), **extra,
    }


# A method's scorer: (targets, context) -> (NLL per target, seconds spent retrieving)
Scorer = Callable[[Targets, int], tuple[torch.Tensor, float]]


def evaluate_lm(model: Any, tokenizer: Any, docs: list[Document], cfg: LMEvalConfig | None = None,
                scorer: Scorer | None = None, method: str = "none", progress: bool = True,
                per_target: dict[str, torch.Tensor] | None = None) -> dict:
    """Perplexity and bits per byte of ``model`` on ``docs``, scored by ``method``'s ``scorer``.

    Without a scorer this is the plain LM with sliding windows (``cfg.window_stride``). Every method
    scores the same targets, so their ppl and bpb are directly comparable. ``per_target``, when given,
    receives each document's per-target NLL by document id.
    """
    from tqdm import tqdm

    cfg = cfg or LMEvalConfig()
    docs = docs[: cfg.max_docs] if cfg.max_docs else docs
    if not docs:
        raise RalmError("no documents to evaluate")
    context = model_context(model, cfg.context)
    stride = cfg.window_stride or max(1, context // 2)
    if stride > context:
        raise RalmError(f"--window-stride {stride} exceeds the context of {context} tokens")
    if scorer is None:
        def scorer(t: Targets, ctx: int) -> tuple[torch.Tensor, float]:
            return token_nll(model, t, ctx, stride), 0.0
    targets = [make_targets(d, tokenizer) for d in docs]
    total = sum(t.n_targets for t in targets)
    nll_sum, n_bytes, retrieval_s = 0.0, 0, 0.0
    t0 = time.perf_counter()
    with tqdm(total=total, unit="tok", desc=f"eval {method}", disable=not progress, file=sys.stderr) as bar:
        for t in targets:
            nll, r_s = scorer(t, context)
            if len(nll) != t.n_targets:  # a method that scored other tokens would not be comparable
                raise AssertionError(f"{method} scored {len(nll)} targets of {t.doc_id!r}, expected {t.n_targets}")
            if per_target is not None:
                per_target[t.doc_id] = nll
            nll_sum += float(nll.double().sum())
            n_bytes += t.scored_bytes
            retrieval_s += r_s
            bar.update(len(nll))
    seconds = time.perf_counter() - t0
    return summarize(nll_sum, total, n_bytes, seconds, method=method, documents=len(docs), context=context,
                     window_stride=stride, start_token=start_token(tokenizer), retrieval_seconds=round(retrieval_s, 3),
                     retrieval_share=round(retrieval_s / max(seconds, 1e-9), 4), config=asdict(cfg))
