"""kNN-LM (Khandelwal et al. 2020): a next-token distribution from the nearest stored LM states.

    p_kNN(w) ∝ Σ_{neighbours j with value w} exp(-d_j / T)
    p(w)     = λ · p_kNN(w) + (1 - λ) · p_LM(w)        computed in log space (logaddexp)

Keys are the LM's final hidden states at every corpus position, values the next token. Paper defaults:
k = 1024, λ = 0.25, T = 1, d = squared L2 distance.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ralm.core.registry import Method, MethodContext, Session, register_method
from ralm.core.retriever import KNNRetriever, Retriever, payload_store
from ralm.core.targets import default_stride, make_targets, model_context, window_plan
from ralm.datastore.knn_store import KNNStore
from ralm.errors import IncompatibleError, RalmError
from ralm.lm.hidden import head_inputs, model_fingerprints
from ralm.lm.presets import start_token_change, tokenizer_fingerprint
from ralm.methods.stores import method_retriever, restrict
from ralm.serve.client import is_url

LMBDA_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# distances between final hidden states run in the hundreds: T = 1 makes p_kNN the nearest neighbour's token
TEMPERATURE_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class KNNLMConfig:
    k: int = field(default=1024, metadata={"help": "neighbours per position"})
    lmbda: float = field(default=0.25, metadata={"help": "weight of p_kNN in the interpolation, in [0, 1]"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature over -distance"})
    validation: list[str] | None = field(default=None, metadata={
        "help": "documents on which λ and T are chosen from the grids (overrides --lmbda and --temperature); "
                "repeatable"})
    lmbda_grid: tuple[float, ...] = field(default=LMBDA_GRID, metadata={"help": "comma-separated λ values of the "
                                                                                "sweep"})
    temperature_grid: tuple[float, ...] = field(default=TEMPERATURE_GRID, metadata={
        "help": "comma-separated temperatures swept with λ on --validation (the pair with the lowest perplexity "
                "is used)"})

    def __post_init__(self) -> None:
        if self.k < 1:
            raise RalmError(f"--k {self.k}: must be >= 1")
        if not 0.0 <= self.lmbda <= 1.0:
            raise RalmError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        if not self.temperature > 0:
            raise RalmError(f"--temperature {self.temperature}: must be > 0")
        bad = [x for x in self.lmbda_grid if not 0.0 <= x <= 1.0]
        if bad or not self.lmbda_grid:
            raise RalmError(f"--lmbda-grid {bad or 'empty'}: every λ must be in [0, 1]")
        bad = [x for x in self.temperature_grid if not x > 0]
        if bad or not self.temperature_grid:
            raise RalmError(f"--temperature-grid {bad or 'empty'}: every temperature must be > 0")


def knn_log_probs(distances: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float = 1.0,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """log p_kNN of shape (B, V) from neighbour distances (B, k) and their next-token values (B, k).

    ``valid`` (B, k) masks out padding neighbours (e.g. -1 ids from an index with fewer than k hits);
    a row with no valid neighbour gets -inf everywhere (the interpolation then falls back to the LM).
    """
    scores = -distances.float() / temperature  # (B, k)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, k); all -inf rows -> nan -> 0
    probs = torch.zeros(scores.shape[0], vocab_size, dtype=torch.float32, device=scores.device)
    probs.scatter_add_(1, values.clamp(min=0).long(), weights)  # sum weights of neighbours sharing a token
    return probs.log()


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs_: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(λ·p_kNN + (1-λ)·p_LM), exactly the LM's log-probs when λ = 0 and exactly p_kNN when λ = 1."""
    if lmbda == 0.0:
        return lm_log_probs
    if lmbda == 1.0:
        return knn_log_probs_
    return torch.logaddexp(knn_log_probs_ + math.log(lmbda), lm_log_probs.float() + math.log1p(-lmbda))


def target_log_probs(distances: np.ndarray, rows_values: np.ndarray, valid: np.ndarray, targets: np.ndarray,
                     temperature: float = 1.0) -> torch.Tensor:
    """(nq,) log p_kNN(target) from neighbour distances (nq, k), their values (nq, k) and a validity mask.

    Only the target's probability is needed for perplexity, so the (nq, V) distribution is never built;
    a query with no valid neighbour, or none with the target's value, gets -inf.
    """
    scores = torch.from_numpy(-np.asarray(distances, dtype=np.float32) / temperature)
    scores = scores.masked_fill(~torch.from_numpy(valid), float("-inf"))
    log_w = torch.log_softmax(scores, dim=-1)  # (nq, k); rows of -inf stay nan
    hit = torch.from_numpy(rows_values == targets[:, None]) & torch.from_numpy(valid)
    return torch.logsumexp(log_w.masked_fill(~hit, float("-inf")), dim=-1).nan_to_num(nan=float("-inf"))


def mix(lp_lm: torch.Tensor, lp_knn: torch.Tensor, lmbda: float) -> torch.Tensor:
    """Per-target log(λ·p_kNN + (1-λ)·p_LM); exactly ``lp_lm`` at λ = 0 and ``lp_knn`` at λ = 1."""
    if lmbda == 0.0:
        return lp_lm
    if lmbda == 1.0:
        return lp_knn
    return torch.logaddexp(lp_knn + math.log(lmbda), lp_lm + math.log1p(-lmbda))


def _ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hashes (uint64, wrapping) of every n-gram along the last axis."""
    h = np.zeros(tokens.shape[:-1] + (tokens.shape[-1] - n + 1,), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * np.uint64(1_000_003) + tokens[..., j:tokens.shape[-1] - n + 1 + j].astype(np.uint64)
    return h


def store_ngram_hashes(store: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per stored row: the hash of the N values ending at it, and whether those N rows are one document.

    Computed once per store and N (a few passes over the values), so decontaminating a neighbour is a lookup.
    """
    cache = store.__dict__.setdefault("_ngram_cache", {})
    if n not in cache:
        values, docs = np.asarray(store.values), np.asarray(store.docs)
        hashes = np.zeros(len(values), dtype=np.uint64)
        whole = np.zeros(len(values), dtype=bool)
        if len(values) >= n:
            hashes[n - 1:] = _ngram_hashes(values[None], n)[0]  # the n-gram starting at i ends at row i + n - 1
            whole[n - 1:] = docs[n - 1:] == docs[: len(docs) - n + 1]  # documents are contiguous runs of rows
        cache[n] = (hashes, whole)
    return cache[n]


class KNNScorer:
    """Scores a document with kNN-LM over sliding windows; keeps per-target log p_LM and log p_kNN.

    The LM and kNN parts do not depend on λ, so one pass gives the perplexity at every λ (the sweep);
    ``temperatures`` adds log p_kNN at other temperatures from the same neighbours (``lp_knn_at``), so a
    temperature sweep costs one softmax per temperature and no extra search.
    """

    def __init__(self, model: Any, store: Any, cfg: KNNLMConfig, window_stride: int, exclude_same_doc: bool = True,
                 decontaminate: int | None = None, log_factory: Any = None, log_neighbours: int = 4,
                 temperatures: tuple[float, ...] = (), retriever: Retriever | None = None):
        # log_factory(targets) -> a NeighbourLog for that document (leakage report), or None for no log
        # retriever: finds the neighbours (default: the store's own search); values and documents come from store
        self.model, self.store, self.cfg, self.window_stride = model, store, cfg, window_stride
        self.retriever = KNNRetriever(store) if retriever is None else retriever
        self.exclude_same_doc, self.decontaminate = exclude_same_doc, decontaminate
        self.log_factory, self.log_neighbours = log_factory, log_neighbours
        self.query_block = 1024
        self.lp_lm: list[torch.Tensor] = []
        self.lp_knn: list[torch.Tensor] = []  # at cfg.temperature
        self.lp_knn_at: dict[float, list[torch.Tensor]] = {t: [] for t in temperatures if t != cfg.temperature}

    @torch.inference_mode()
    def __call__(self, t: Any, context: int) -> tuple[torch.Tensor, float]:
        lp_lm, states = [], []
        device = next(self.model.parameters()).device
        for begin, end, first in window_plan(len(t.ids), context, self.window_stride):
            with head_inputs(self.model) as seen:
                logits = self.model(input_ids=t.ids[begin:end][None].to(device),
                                    logits_to_keep=end - first + 1).logits[0, :-1].float()  # (end-first, V)
            targets = t.ids[first:end].to(device)
            lp_lm.append(-torch.nn.functional.cross_entropy(logits, targets, reduction="none").cpu())
            states.append(seen[0][0, :-1].float().cpu())  # (end-first, d): the states that predict the targets
        lp_lm_doc = torch.cat(lp_lm)
        xq = torch.cat(states).numpy()  # (n_targets, d)
        target_ids = t.ids[t.first:].numpy()
        k = min(self.cfg.k, max(1, len(self.retriever)))
        own = self.store.ordinal(t.doc_id) if self.exclude_same_doc else -1
        lp_knn, seconds = [], 0.0
        log = self.log_factory(t) if self.log_factory is not None else None
        for s in range(0, len(xq), self.query_block):  # bounded memory: (block, k) neighbours at a time
            t0 = time.perf_counter()
            # the kNN-LM's rule: same-document neighbours are masked among the k nearest, not refilled
            D, I = self.retriever.search(xq[s:s + self.query_block], k)  # noqa: E741
            seconds += time.perf_counter() - t0
            valid = I >= 0
            safe = np.where(valid, I, 0)
            if own >= 0:
                valid &= self.store.docs[safe] != own
            if self.decontaminate:
                valid &= ~self._contaminated(t, safe, valid)
            vals, tgt = self.store.values[safe], target_ids[s:s + self.query_block]
            lp_knn.append(target_log_probs(D, vals, valid, tgt, self.cfg.temperature))
            for temp, acc in self.lp_knn_at.items():
                acc.append(target_log_probs(D, vals, valid, tgt, temp))
            if log is not None:
                self._log(log, t.first + s, safe, valid)
        lp_knn_doc = torch.cat(lp_knn)
        self.lp_lm.append(lp_lm_doc)
        self.lp_knn.append(lp_knn_doc)
        return -mix(lp_lm_doc, lp_knn_doc, self.cfg.lmbda), seconds

    def _contaminated(self, t: Any, rows: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(nq, k) neighbours whose last N stored tokens (ending at their value) occur in the evaluated text."""
        n = self.decontaminate
        doc_hashes = _ngram_hashes(t.ids[t.first:].numpy()[None], n)[0] if t.n_targets >= n else np.zeros(0, np.uint64)
        hashes, whole = store_ngram_hashes(self.store, n)
        return valid & whole[rows] & np.isin(hashes[rows], doc_hashes)

    def _log(self, log: Any, first: int, rows: np.ndarray, valid: np.ndarray) -> None:
        """For each target from ``first`` on: the stored token windows of its best few valid neighbours."""
        for q in range(len(rows)):
            best = rows[q][valid[q]][: self.log_neighbours]
            log.add(first + q, first + q + 1, self.store.windows(best, 64))


def open_knn_store(path: str, model_name: str, model: Any, tok: Any) -> KNNStore:
    """The kNN-LM store at ``path``, refused unless its keys are this model's states."""
    store = KNNStore.open(path)
    store.check_compatible(model_fingerprints(model), tokenizer_fingerprint(tok), model_name,
                           model.config.get_text_config().hidden_size)
    if (why := start_token_change(store.manifest["tokenizer"], tok)) is not None:
        # the first token conditions every later hidden state: keys made after another one match nothing
        raise IncompatibleError(f"--datastore {path}: a kNN-LM store {why}; its keys no longer match "
                                "the model's states: rebuild it with `ralm knnlm build ... --force`")
    return store


def sweep(scorer: KNNScorer, grid: tuple[float, ...], temperature: float | None = None) -> dict[float, float]:
    """Perplexity at every λ of the grid from the scorer's recorded per-target probabilities (at ``temperature``,
    default the scorer's own)."""
    lm = torch.cat(scorer.lp_lm)
    knn = torch.cat(scorer.lp_knn if temperature in (None, scorer.cfg.temperature) else scorer.lp_knn_at[temperature])
    return {lam: math.exp(-float(mix(lm, knn, lam).double().mean())) for lam in grid}


def _open(ctx: MethodContext) -> Session:
    """kNN-LM on the plain LM's windows; with validation documents, λ and T are chosen on them first (the LM and
    kNN parts do not depend on λ, so one pass prices the whole grid)."""
    if is_url(ctx.store):
        raise RalmError(f"--datastore {ctx.store}: `ralm serve` serves retrieval stores, not kNN-LM stores; "
                        "give the kNN-LM store's directory")
    store = open_knn_store(ctx.store, ctx.model_name, ctx.model, ctx.tokenizer)
    store = restrict(store, len(store.values), ctx)
    retriever = method_retriever(store, ctx)
    store = payload_store(retriever, store)  # where the rows' values are read (an ablation's view)
    context = model_context(ctx.model, ctx.lm.context)
    stride = default_stride(context, ctx.lm.window_stride)
    knn_cfg: KNNLMConfig = ctx.options
    info: dict[str, Any] = {}
    if ctx.validation:
        val = KNNScorer(ctx.model, store, knn_cfg, stride, ctx.exclude_same_doc, ctx.decontaminate,
                       temperatures=knn_cfg.temperature_grid, retriever=retriever)
        for d in ctx.validation:
            val(make_targets(d, ctx.tokenizer), context)
        sweeps = {temp: sweep(val, knn_cfg.lmbda_grid, temp) for temp in knn_cfg.temperature_grid}
        temp, best = min(((t, lam) for t, sw in sweeps.items() for lam in sw), key=lambda tl: sweeps[tl[0]][tl[1]])
        knn_cfg = dataclasses.replace(knn_cfg, lmbda=best, temperature=temp)
        info.update(lmbda_sweep_validation={str(lam): round(p, 4) for lam, p in sweeps[temp].items()},
                    temperature_sweep_validation={str(t): round(min(sw.values()), 4) for t, sw in sweeps.items()},
                    validation=knn_cfg.validation)
    session = Session(info=info)
    scorer = KNNScorer(ctx.model, store, knn_cfg, stride, ctx.exclude_same_doc, ctx.decontaminate,
                       log_factory=(lambda t: session.log_for(t.doc_id, True)) if ctx.leakage else None,
                       retriever=retriever)
    session.scorer = scorer
    info.update(k=knn_cfg.k, lmbda=knn_cfg.lmbda, temperature=knn_cfg.temperature, store_keys=len(store))
    session.after = lambda: {"lmbda_sweep_test": {str(lam): round(p, 4)
                                                  for lam, p in sweep(scorer, knn_cfg.lmbda_grid).items()}}
    return session


register_method(Method(name="knn-lm", help="kNN-LM: p_LM mixed with p_kNN over the nearest stored LM states",
                       store="knn", open=_open, config=KNNLMConfig, options="knn",
                       report=("lmbda",)))
