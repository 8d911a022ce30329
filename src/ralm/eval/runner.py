"""``ralm eval-lm``: load a model and held-out documents, build the method's scorer, evaluate.

Methods: ``none`` (plain LM, sliding windows), ``in-context`` (In-Context RALM) and ``replug``, all on
the same targets so their perplexity and bits per byte sit in one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ralm.data.corpus import CorpusConfig, iter_documents
from ralm.errors import RalmError
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.lm.in_context import InContextConfig, in_context_nll, replug_nll, store_retriever

METHODS = ("none", "in-context", "replug")


@dataclass
class EvalLMConfig:
    model: str
    data: list[str]
    method: str = field(default="none", metadata={"help": "none, in-context or replug"})
    datastore: str | None = field(default=None, metadata={"help": "store the retrieval methods read from"})
    lm: LMEvalConfig = field(default_factory=LMEvalConfig)
    in_context: InContextConfig = field(default_factory=InContextConfig)
    exclude_same_doc: bool = field(default=True, metadata={"help": "drop neighbours from the evaluated document"})
    decontaminate: int | None = field(default=None, metadata={"help": "drop neighbours sharing an N-token span"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RalmError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method != "none" and not self.datastore:
            raise RalmError(f"--method {self.method} needs --datastore")
        if self.decontaminate is not None and self.decontaminate < 1:
            raise RalmError(f"--decontaminate {self.decontaminate}: must be >= 1")


def run_eval_lm(cfg: EvalLMConfig, progress: bool = True) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the metrics dict."""
    from ralm.datastore.store import Datastore
    from ralm.eval.lm import make_targets
    from ralm.lm.models import load
    from ralm.lm.presets import tokenizer_fingerprint

    docs = list(iter_documents(cfg.data, CorpusConfig()))
    if cfg.lm.max_docs:
        docs = docs[: cfg.lm.max_docs]
    lm = load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    scorer: Any = None
    extra: dict[str, Any] = {"model": cfg.model}
    if cfg.method != "none":
        ds = Datastore.open(cfg.datastore)
        # passages are the store's own token ids: they must be the model's tokens
        ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(tok), tokenizer_name=cfg.model)
        doc_tokens = {d.id: make_targets(d, tok).ids for d in docs} if cfg.decontaminate else None
        k = cfg.in_context.docs
        retrieve = store_retriever(ds, k, cfg.exclude_same_doc, cfg.decontaminate, doc_tokens)
        fn = in_context_nll if cfg.method == "in-context" else replug_nll

        def scorer(t, context):
            return fn(model, tok, t, retrieve, cfg.in_context, context)

        extra.update(datastore=cfg.datastore, exclude_same_doc=cfg.exclude_same_doc,
                     decontaminate=cfg.decontaminate, stride=cfg.in_context.stride,
                     query_len=cfg.in_context.query_len, docs=k, doc_tokens=cfg.in_context.doc_tokens)
    result = evaluate_lm(model, tok, docs, cfg.lm, scorer=scorer, method=cfg.method, progress=progress)
    return {**result, **extra}
