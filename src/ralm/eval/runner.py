"""``ralm eval-lm``: load a model and held-out documents, open the method's session, evaluate.

The method comes from the registry (``ralm.core.registry``; the built-in ones are listed by
``method_names()``): this module names none of them. Every method scores the same targets, so their
perplexity and bits per byte sit in one table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import ralm.methods  # noqa: F401  registers the built-in methods
from ralm.core.registry import MethodContext, check_options, get_method, method_names
from ralm.core.retriever import Retriever
from ralm.core.targets import default_stride, make_targets
from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.eval.leakage import DocScores, leakage_report, target_bytes
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.lm.models import load
from ralm.lm.presets import DEFAULT_LM
from ralm.methods.plain import token_nll

__all__ = ["EvalLMConfig", "run_eval_lm"]


@dataclass
class EvalLMConfig:
    model: str = field(default=DEFAULT_LM, metadata={"help": "preset (smollm2-135m, ...), model folder, GGUF file "
                                                             "or hub id"})
    data: list[str] = field(default_factory=list, metadata={"help": "held-out documents (JSONL/.txt/Parquet/"
                                                                    "folder); repeatable"})
    method: str = field(default="none", metadata={"help": "scoring method (`ralm methods` lists them)"})
    datastore: str | None = field(default=None, metadata={"help": "the method's store: a retrieval store (in-context, "
                                                                  "replug, retro; retro defaults to its checkpoint's; "
                                                                  "a directory or `ralm serve`'s http://HOST:PORT) or "
                                                                  "a kNN-LM store (knn-lm)"})
    lm: LMEvalConfig = field(default_factory=LMEvalConfig)
    # every registered method's options by Method.options key (defaults filled in from the registry); only the
    # chosen method's may differ from their defaults
    options: dict[str, Any] = field(default_factory=dict)
    exclude_same_doc: bool = field(default=True, metadata={"help": "drop neighbours from the evaluated document"})
    decontaminate: int | None = field(default=None, metadata={"help": "drop neighbours sharing an N-token span with "
                                                                      "the text"})
    subset: float | None = field(default=None, metadata={"help": "search only this random fraction of the store"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the (nested) random subset"})
    leakage_report: bool = field(default=False, metadata={"help": "ppl/bpb by the longest common token run of each "
                                                                 "64-token chunk with its neighbours"})

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if not self.data:
            raise RalmError("--data: give at least one file of held-out documents")
        self.options = check_options(self.options, [self.method])
        method.prepare(self, method.options_of(self))
        if self.decontaminate is not None and self.decontaminate < 1:
            raise RalmError(f"--decontaminate {self.decontaminate}: must be >= 1")
        if self.leakage_report and method.store == "none":
            raise RalmError(f"--leakage-report needs a retrieval method ({', '.join(method_names(store='any'))})")
        if self.subset is not None and not 0 < self.subset <= 1:
            raise RalmError(f"--subset {self.subset}: must be in (0, 1]")


def _documents(files: list[str], max_docs: int | None, flag: str = "--data") -> list[Document]:
    """The documents of ``files``; an empty set is refused naming the files (before any model is loaded)."""
    stats = ReadStats()
    docs = list(iter_documents(files, CorpusConfig(), stats))
    if not docs:
        raise RalmError(f"{flag} {', '.join(map(str, files))}: no documents to evaluate ({stats.blank} blank, "
                        f"{stats.too_large} too large, {stats.invalid_utf8_skipped} invalid UTF-8 skipped)")
    return docs[:max_docs] if max_docs else docs


def run_eval_lm(cfg: EvalLMConfig, progress: bool = True, loaded: Any = None,
                wrap_retriever: Callable[[Retriever], Retriever] | None = None,
                per_target: dict[str, torch.Tensor] | None = None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the metrics dict.

    ``loaded``: an already loaded ``LoadedLM`` to reuse (e.g. across the points of a scaling curve);
    ``wrap_retriever``: wraps the retriever the method reads neighbours from (``ralm.core.retriever``: e.g.
    ``EmptyRetriever``, or ``lambda r: RandomRetriever(r, seed)``); ``per_target``: filled with each document's
    per-target NLL (doc id -> (n_targets,) nats), the units ``ralm.eval.bootstrap`` resamples.
    """
    method = get_method(cfg.method)
    options = method.options_of(cfg)
    docs = _documents(cfg.data, cfg.lm.max_docs)
    val_files = getattr(options, "validation", None)  # documents the method tunes on (the kNN-LM's λ and T)
    validation = _documents(val_files, cfg.lm.max_docs, "--validation") if val_files else None
    lm = loaded or load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    ctx = MethodContext(model=model, tokenizer=tok, model_name=cfg.model, store=cfg.datastore,
                        options=options, lm=cfg.lm, run=cfg, docs=docs,
                        exclude_same_doc=cfg.exclude_same_doc, decontaminate=cfg.decontaminate, subset=cfg.subset,
                        subset_seed=cfg.subset_seed, leakage=cfg.leakage_report, validation=validation,
                        progress=progress, wrap_retriever=wrap_retriever)
    session = method.open(ctx)
    extra: dict[str, Any] = {"model": cfg.model}
    per_target = {} if per_target is None else per_target
    try:
        extra.update(session.info)
        if method.store != "none":
            extra.update(datastore=cfg.datastore, exclude_same_doc=cfg.exclude_same_doc,
                         decontaminate=cfg.decontaminate, subset=cfg.subset)
        result = evaluate_lm(model, tok, docs, cfg.lm, scorer=session.scorer, method=cfg.method, progress=progress,
                             per_target=per_target)
        if session.window_stride is not None:
            result["window_stride"] = session.window_stride
        extra.update(session.extras())
    finally:
        session.close()  # removes the method's hooks: a reused model is left as it came
    if cfg.leakage_report:
        extra["leakage"] = _leakage(model, tok, docs, cfg, result, per_target, session.logs)
    return {**result, **extra}


def _leakage(model: Any, tok: Any, docs: list[Document], cfg: EvalLMConfig, result: dict,
             per_target: dict[str, torch.Tensor], logs: dict[str, Any]) -> dict:
    """RETRO's leakage table: the method and the plain LM (same windows as ``none``) per overlap bucket."""
    scores = []
    for d in docs:
        t = make_targets(d, tok)
        baseline = token_nll(model, t, result["context"], default_stride(result["context"], cfg.lm.window_stride))
        scores.append(DocScores(t, per_target[d.id], baseline, target_bytes(d.text, tok, t), logs[d.id]))
    return leakage_report(scores, method=cfg.method, baseline=method_names(store="none")[0])
