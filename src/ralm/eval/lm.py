"""Language-model evaluation: sliding-window perplexity and true bits per byte.

Every method scores the same *targets*: each token of a document is predicted from the tokens before it
(after the model's plain-text start token, ``ralm.core.start_token.start_token``: the BOS, or the document
separator where the BOS is a chat-turn token; where there is none, the first token is not scored). Perplexity is
exp(mean NLL) over those targets; bits per byte is their total NLL in bits over the UTF-8 bytes of the
text they cover — not log2(ppl)/8, which would depend on the tokenizer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ralm.core.start_token import start_token
from ralm.core.targets import Targets, default_stride, make_targets, model_context, summarize
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.methods.plain import token_nll


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
    cfg = cfg or LMEvalConfig()
    docs = docs[: cfg.max_docs] if cfg.max_docs else docs
    if not docs:
        raise RalmError("no documents to evaluate")
    context = model_context(model, cfg.context)
    stride = default_stride(context, cfg.window_stride)
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
