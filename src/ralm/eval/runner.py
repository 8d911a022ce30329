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
from ralm.core.registry import MethodContext, get_method, method_names, refuse_foreign
from ralm.core.targets import default_stride, make_targets
from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.eval.leakage import DocScores, leakage_report, target_bytes
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.lm.models import load
from ralm.methods.in_context import InContextConfig
from ralm.methods.knnlm import LMBDA_GRID, TEMPERATURE_GRID, KNNLMConfig
from ralm.methods.plain import token_nll

__all__ = ["LMBDA_GRID", "TEMPERATURE_GRID", "EvalLMConfig", "run_eval_lm"]


@dataclass
class EvalLMConfig:
    model: str
    data: list[str]
    method: str = field(default="none", metadata={"help": "a registered method (ralm.core.registry)"})
    datastore: str | None = field(default=None, metadata={"help": "the method's store: a retrieval store or a "
                                                                  "kNN-LM store (its Method.store kind)"})
    checkpoint: str | None = field(default=None, metadata={"help": "retro: the RETRO-fit checkpoint folder"})
    retrieval: str = field(default="on", metadata={"help": "retro: on (neighbours from the store) or off "
                                                           "(the frozen model)"})
    lm: LMEvalConfig = field(default_factory=LMEvalConfig)
    in_context: InContextConfig = field(default_factory=InContextConfig)
    knn: KNNLMConfig = field(default_factory=KNNLMConfig)
    validation: list[str] | None = field(default=None, metadata={"help": "knn-lm: documents on which λ is chosen "
                                                                          "from the grid (overrides --lmbda)"})
    lmbda_grid: tuple[float, ...] = field(default=LMBDA_GRID, metadata={"help": "λ values of the sweep"})
    temperature_grid: tuple[float, ...] = field(default=TEMPERATURE_GRID, metadata={
        "help": "temperatures swept with λ on --validation (the pair with the lowest perplexity is used)"})
    exclude_same_doc: bool = field(default=True, metadata={"help": "drop neighbours from the evaluated document"})
    decontaminate: int | None = field(default=None, metadata={"help": "drop neighbours sharing an N-token span"})
    subset: float | None = field(default=None, metadata={"help": "search only this random fraction of the store"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the (nested) random subset"})
    leakage_report: bool = field(default=False, metadata={"help": "bucket 64-token chunks by their longest common "
                                                                 "token run with the neighbours; ppl/bpb per bucket"})

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if self.retrieval not in ("on", "off"):
            raise RalmError(f"--retrieval {self.retrieval!r}: expected on or off")
        refuse_foreign(self, self.method)
        if method.resolve is not None:
            method.resolve(self)
        elif method.store != "none" and not self.datastore:
            raise RalmError(f"--method {self.method} needs --datastore")
        if self.decontaminate is not None and self.decontaminate < 1:
            raise RalmError(f"--decontaminate {self.decontaminate}: must be >= 1")
        bad = [x for x in self.lmbda_grid if not 0.0 <= x <= 1.0]
        if bad or not self.lmbda_grid:
            raise RalmError(f"--lmbda-grid {bad or 'empty'}: every λ must be in [0, 1]")
        bad = [x for x in self.temperature_grid if not x > 0]
        if bad or not self.temperature_grid:
            raise RalmError(f"--temperature-grid {bad or 'empty'}: every temperature must be > 0")
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
                wrap_store: Callable[[Any], Any] | None = None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the metrics dict.

    ``loaded``: an already loaded ``LoadedLM`` to reuse (e.g. across the points of a scaling curve);
    ``wrap_store``: wraps the store the method opens (e.g. ``ralm.core.retriever.EmptyRetriever``).
    """
    method = get_method(cfg.method)
    docs = _documents(cfg.data, cfg.lm.max_docs)
    validation = _documents(cfg.validation, cfg.lm.max_docs, "--validation") if cfg.validation else None
    lm = loaded or load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    ctx = MethodContext(model=model, tokenizer=tok, model_name=cfg.model, store=cfg.datastore,
                        options=method.options_of(cfg), lm=cfg.lm, run=cfg, docs=docs,
                        exclude_same_doc=cfg.exclude_same_doc, decontaminate=cfg.decontaminate, subset=cfg.subset,
                        subset_seed=cfg.subset_seed, leakage=cfg.leakage_report, validation=validation,
                        progress=progress, wrap_store=wrap_store)
    session = method.open(ctx)
    extra: dict[str, Any] = {"model": cfg.model}
    per_target: dict[str, torch.Tensor] = {}
    try:
        extra.update(session.info)
        if method.store != "none":
            extra.update(datastore=cfg.datastore, exclude_same_doc=cfg.exclude_same_doc,
                         decontaminate=cfg.decontaminate, subset=cfg.subset)
        result = evaluate_lm(model, tok, docs, cfg.lm, scorer=session.scorer, method=cfg.method, progress=progress,
                             per_target=per_target if cfg.leakage_report else None)
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
