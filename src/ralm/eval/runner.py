"""``ralm eval-lm``: load a model and held-out documents, build the method's scorer, evaluate.

Methods: ``none`` (plain LM, sliding windows), ``in-context`` (In-Context RALM), ``replug``, ``knn-lm`` and
``retro`` (a RETRO-fit checkpoint, retrieval on or off), all on the same targets so their perplexity and
bits per byte sit in one table. kNN-LM can pick λ on a
validation split (``validation``): its per-target LM and kNN probabilities do not depend on λ, so one
pass over the validation documents prices every λ of the grid.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ralm.core.neighbours import NeighbourLog
from ralm.core.targets import make_targets, model_context
from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents
from ralm.data.document import Document
from ralm.datastore.knn_store import KNNStore
from ralm.datastore.store import Datastore
from ralm.datastore.subset import nested_rows
from ralm.errors import IncompatibleError, RalmError
from ralm.eval.leakage import DocScores, leakage_report, target_bytes
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.lm.hidden import model_fingerprints
from ralm.lm.models import load
from ralm.lm.presets import start_token_change, tokenizer_fingerprint
from ralm.methods.in_context import InContextConfig, in_context_nll, replug_nll, store_retriever
from ralm.methods.knnlm import KNNLMConfig, KNNScorer, mix
from ralm.methods.plain import token_nll
from ralm.methods.retro.checkpoint import load_retrofit, read_checkpoint_config
from ralm.methods.retro.neighbours import check_store_fits, document_neighbours
from ralm.methods.retro.scoring import retro_nll

METHODS = ("none", "in-context", "replug", "knn-lm", "retro")
LMBDA_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# distances between final hidden states run in the hundreds: T = 1 makes p_kNN the nearest neighbour's token
TEMPERATURE_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class EvalLMConfig:
    model: str
    data: list[str]
    method: str = field(default="none", metadata={"help": "none, in-context, replug, knn-lm or retro"})
    datastore: str | None = field(default=None, metadata={"help": "retrieval store (in-context, replug, retro) "
                                                                  "or kNN-LM store (knn-lm)"})
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
        if self.method not in METHODS:
            raise RalmError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.retrieval not in ("on", "off"):
            raise RalmError(f"--retrieval {self.retrieval!r}: expected on or off")
        if self.method == "retro":
            if not self.checkpoint:
                raise RalmError("--method retro needs --checkpoint")
            # the store the checkpoint was trained with, unless another is named
            self.datastore = self.datastore or read_checkpoint_config(self.checkpoint).get("datastore")
        elif self.checkpoint:
            raise RalmError("--checkpoint is for --method retro")
        if self.method != "none" and not self.datastore and not (self.method == "retro" and self.retrieval == "off"):
            raise RalmError(f"--method {self.method} needs --datastore")
        if self.decontaminate is not None and self.decontaminate < 1:
            raise RalmError(f"--decontaminate {self.decontaminate}: must be >= 1")
        if self.validation and self.method != "knn-lm":
            raise RalmError("--validation picks λ for --method knn-lm only")
        bad = [x for x in self.lmbda_grid if not 0.0 <= x <= 1.0]
        if bad or not self.lmbda_grid:
            raise RalmError(f"--lmbda-grid {bad or 'empty'}: every λ must be in [0, 1]")
        bad = [x for x in self.temperature_grid if not x > 0]
        if bad or not self.temperature_grid:
            raise RalmError(f"--temperature-grid {bad or 'empty'}: every temperature must be > 0")
        if self.leakage_report and self.method == "none":
            raise RalmError("--leakage-report needs a retrieval method (in-context, replug, knn-lm or retro)")
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


def _sweep(scorer: KNNScorer, grid: tuple[float, ...], temperature: float | None = None) -> dict[float, float]:
    """Perplexity at every λ of the grid from the scorer's recorded per-target probabilities (at ``temperature``,
    default the scorer's own)."""
    lm = torch.cat(scorer.lp_lm)
    knn = torch.cat(scorer.lp_knn if temperature in (None, scorer.cfg.temperature) else scorer.lp_knn_at[temperature])
    return {lam: math.exp(-float(mix(lm, knn, lam).double().mean())) for lam in grid}


def open_knn_store(cfg: EvalLMConfig, model: Any, tok: Any) -> Any:
    store = KNNStore.open(cfg.datastore)
    store.check_compatible(model_fingerprints(model), tokenizer_fingerprint(tok), cfg.model,
                           model.config.get_text_config().hidden_size)
    if (why := start_token_change(store.manifest["tokenizer"], tok)) is not None:
        # the first token conditions every later hidden state: keys made after another one match nothing
        raise IncompatibleError(f"--datastore {cfg.datastore}: a kNN-LM store {why}; its keys no longer match "
                                "the model's states: rebuild it with `ralm knnlm build ... --force`")
    return store


def run_eval_lm(cfg: EvalLMConfig, progress: bool = True, loaded: Any = None) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.data`` with ``cfg.method``; return the metrics dict.

    ``loaded``: an already loaded ``LoadedLM`` to reuse (e.g. across the points of a scaling curve).
    """
    docs = _documents(cfg.data, cfg.lm.max_docs)
    lm = loaded or load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    scorer: Any = None
    extra: dict[str, Any] = {"model": cfg.model}
    logs: dict[str, Any] = {}  # doc id -> NeighbourLog, for the leakage report
    if cfg.method in ("in-context", "replug"):
        ds = Datastore.open(cfg.datastore)
        # passages are the store's own token ids: they must be the model's tokens
        ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(tok), tokenizer_name=cfg.model)
        ds = _restrict(ds, ds.manifest["counts"]["chunks"], cfg)
        doc_tokens = {d.id: make_targets(d, tok).ids for d in docs} if cfg.decontaminate else None
        k = cfg.in_context.docs
        retrieve = store_retriever(ds, k, cfg.exclude_same_doc, cfg.decontaminate, doc_tokens)
        fn = in_context_nll if cfg.method == "in-context" else replug_nll

        def scorer(t, context):
            log = logs.setdefault(t.doc_id, NeighbourLog()) if cfg.leakage_report else None
            return fn(model, tok, t, retrieve, cfg.in_context, context, log=log)

        extra.update(stride=cfg.in_context.stride, query_len=cfg.in_context.query_len, docs=k,
                     doc_tokens=cfg.in_context.doc_tokens)
    elif cfg.method == "knn-lm":
        store = open_knn_store(cfg, model, tok)
        store = _restrict(store, len(store.values), cfg)
        context = model_context(model, cfg.lm.context)
        stride = cfg.lm.window_stride or max(1, context // 2)
        knn_cfg = cfg.knn
        if cfg.validation:
            val = KNNScorer(model, store, cfg.knn, stride, cfg.exclude_same_doc, cfg.decontaminate,
                            temperatures=cfg.temperature_grid)
            evaluate_lm(model, tok, _documents(cfg.validation, cfg.lm.max_docs, "--validation"), cfg.lm, scorer=val,
                        method="knn-lm (validation)", progress=progress)
            sweeps = {temp: _sweep(val, cfg.lmbda_grid, temp) for temp in cfg.temperature_grid}
            temp, best = min(((t, lam) for t, sw in sweeps.items() for lam in sw), key=lambda tl: sweeps[tl[0]][tl[1]])
            knn_cfg = KNNLMConfig(k=cfg.knn.k, lmbda=best, temperature=temp)
            extra.update(lmbda_sweep_validation={str(lam): round(p, 4) for lam, p in sweeps[temp].items()},
                         temperature_sweep_validation={str(t): round(min(sw.values()), 4) for t, sw in sweeps.items()},
                         validation=cfg.validation)
        scorer = KNNScorer(model, store, knn_cfg, stride, cfg.exclude_same_doc, cfg.decontaminate,
                           log_factory=(lambda t: logs.setdefault(t.doc_id, NeighbourLog())) if cfg.leakage_report
                           else None)
        extra.update(k=knn_cfg.k, lmbda=knn_cfg.lmbda, temperature=knn_cfg.temperature, store_keys=len(store))
    elif cfg.method == "retro":
        scorer, retro = _retro_scorer(cfg, model, tok, logs)
        extra.update(checkpoint=cfg.checkpoint, retrieval=cfg.retrieval, chunk_size=retro.cfg.chunk_size,
                     neighbours=retro.cfg.neighbours)
    if cfg.method != "none":
        extra.update(datastore=cfg.datastore, exclude_same_doc=cfg.exclude_same_doc,
                     decontaminate=cfg.decontaminate, subset=cfg.subset)
    per_target: dict[str, torch.Tensor] = {}
    try:
        result = evaluate_lm(model, tok, docs, cfg.lm, scorer=scorer, method=cfg.method, progress=progress,
                             per_target=per_target if cfg.leakage_report else None)
    finally:
        if cfg.method == "retro":  # leave a reused model as it came
            retro.remove_hooks()
    if cfg.method in ("in-context", "replug"):  # its blocks of --stride tokens, not the plain LM's windows
        result["window_stride"] = cfg.in_context.stride
    if cfg.method == "knn-lm":
        extra["lmbda_sweep_test"] = {str(lam): round(p, 4) for lam, p in _sweep(scorer, cfg.lmbda_grid).items()}
    if cfg.leakage_report:
        extra["leakage"] = _leakage(model, tok, docs, cfg, result, per_target, logs)
    return {**result, **extra}


def _leakage(model: Any, tok: Any, docs: list[Document], cfg: EvalLMConfig, result: dict,
             per_target: dict[str, torch.Tensor], logs: dict[str, Any]) -> dict:
    """RETRO's leakage table: the method and the plain LM (same windows as ``none``) per overlap bucket."""
    scores = []
    for d in docs:
        t = make_targets(d, tok)
        baseline = token_nll(model, t, result["context"], cfg.lm.window_stride or max(1, result["context"] // 2))
        scores.append(DocScores(t, per_target[d.id], baseline, target_bytes(d.text, tok, t), logs[d.id]))
    return leakage_report(scores, method=cfg.method, baseline="none")


def _retro_scorer(cfg: EvalLMConfig, model: Any, tok: Any, logs: dict[str, Any]) -> tuple[Any, Any]:
    """A RETRO-fit checkpoint on the plain LM's windows; with retrieval on, each document's chunk neighbours
    are retrieved in one batch (same-document exclusion and decontamination as for the other methods)."""
    retro, _ = load_retrofit(cfg.checkpoint, model, tok, cfg.model)
    stride = cfg.lm.window_stride or max(1, model_context(model, cfg.lm.context) // 2)
    ds = None
    if cfg.retrieval == "on":
        ds = Datastore.open(cfg.datastore)
        check_store_fits(ds, retro.cfg, tokenizer_fingerprint(tok), cfg.model)
        ds = _restrict(ds, ds.manifest["counts"]["chunks"], cfg)

    def scorer(t, context):
        log = logs.setdefault(t.doc_id, NeighbourLog()) if cfg.leakage_report else None
        neighbours, seconds = None, 0.0
        if ds is not None:
            t0 = time.perf_counter()
            neighbours = document_neighbours(ds, tok, [t], retro.cfg, cfg.exclude_same_doc, cfg.decontaminate)[0]
            seconds = time.perf_counter() - t0
        return retro_nll(retro, t, context, stride, neighbours, log), seconds

    return scorer, retro


def _restrict(store: Any, n_rows: int, cfg: EvalLMConfig) -> Any:
    if cfg.subset is None or cfg.subset == 1.0:
        return store

    return store.restrict(nested_rows(n_rows, cfg.subset, cfg.subset_seed))
