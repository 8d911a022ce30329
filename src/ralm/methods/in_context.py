"""In-Context RALM (Ram et al. 2023): every ``stride`` tokens, retrieve with the last ``query_len`` tokens
and prepend the top passages to the context of the next ``stride`` tokens.

Scores the same targets as ``ralm.methods.plain.token_nll``: block [i, i+stride) is predicted from
[start token] + passages + the most recent tokens that fit the model's context. With no passage (the first
block, or an empty retrieval) a block is scored from the last ``context`` tokens alone, which is the plain
sliding window with ``window_stride = stride`` (identical when ``context - 1`` is a multiple of ``stride``),
so with retrieval switched off this reproduces the plain LM.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ralm.core.neighbours import NeighbourLog
from ralm.core.registry import Method, MethodContext, Session, register_method
from ralm.core.retriever import Retriever, StoreRetriever, payload_store
from ralm.core.start_token import start_token_id
from ralm.core.targets import Targets, make_targets
from ralm.errors import RalmError, refuse_below
from ralm.methods.stores import method_retriever, open_retrieval_store, restrict, store_hits, without_tokens


@dataclass
class Passage:
    tokens: list[int]  # LM token ids (chunk + continuation)
    score: float  # retrieval score (inner product, or BM25)


# (queries, doc_id) -> the passages of each query, best first (``store_retriever``: read through a Retriever)
PassageSource = Callable[[list[str], str], list[list[Passage]]]


@dataclass
class InContextConfig:
    stride: int = field(default=16, metadata={"help": "tokens scored between two retrievals (paper: 4-32)"})
    query_len: int = field(default=32, metadata={"help": "last tokens used as the retrieval query"})
    docs: int = field(default=1, metadata={"help": "passages per retrieval, prepended together (in-context) "
                                                   "or scored one per pass and mixed (replug)"})
    doc_tokens: int = field(default=256, metadata={"help": "each passage is truncated to this many tokens"})

    def __post_init__(self) -> None:
        refuse_below(self, ("stride", "query_len", "docs", "doc_tokens"))


def block_starts(n: int, stride: int) -> list[int]:
    """First target of each scored block: targets 1..n-1 in blocks of ``stride``."""
    return list(range(1, n, stride))


def block_input(ids: torch.Tensor, start: int, end: int, passage: list[int], context: int, bos: int | None) -> torch.Tensor:
    """Input ids for scoring targets [start, end): passage first, then as much recent text as fits."""
    if not passage:
        return ids[max(0, end - context):end]
    head = ([bos] if bos is not None else []) + passage
    room = context - len(head)
    if room < end - start + 1:
        raise RalmError(f"passages of {len(passage)} tokens leave no room for a {end - start}-token block "
                        f"in a {context}-token context; lower --doc-tokens or --docs")
    lo = max(1 if bos is not None else 0, end - room)
    return torch.cat([torch.tensor(head, dtype=ids.dtype), ids[lo:end]])


def _retrieve_blocks(tokenizer: Any, t: Targets, starts: list[int], retrieve: PassageSource | None,
                     query_len: int) -> tuple[list[list[Passage]], float]:
    """Passages for every block, from one batched retrieval; the first block has no query text yet."""
    found: list[list[Passage]] = [[] for _ in starts]
    if retrieve is None:
        return found, 0.0
    asks = [b for b, s in enumerate(starts) if s >= 2]
    queries = [tokenizer.decode(t.ids[max(1, starts[b] - query_len):starts[b]].tolist()) for b in asks]
    t0 = time.perf_counter()
    results = retrieve(queries, t.doc_id) if queries else []
    for b, per_query in zip(asks, results, strict=True):
        found[b] = per_query
    return found, time.perf_counter() - t0


def _block_logprobs(model: Any, t: Targets, start: int, end: int, passage: list[int], context: int,
                    bos: int | None) -> torch.Tensor:
    """(end-start,) log-probabilities of targets [start, end) given the passage and recent text."""
    device = next(model.parameters()).device
    inp = block_input(t.ids, start, end, passage, context, bos).unsqueeze(0).to(device)
    logits = model(input_ids=inp, logits_to_keep=end - start + 1).logits[0, :-1].float()  # (end-start, V)
    return -torch.nn.functional.cross_entropy(logits, t.ids[start:end].to(device), reduction="none").cpu()


@torch.inference_mode()
def in_context_nll(model: Any, tokenizer: Any, t: Targets, retrieve: PassageSource | None, cfg: InContextConfig,
                   context: int, log: NeighbourLog | None = None) -> tuple[torch.Tensor, float]:
    """(n_targets,) NLL in nats with the top ``docs`` passages in context, and the seconds spent retrieving.

    ``log`` (leakage report) receives, per block, each passage as it entered the context.
    """
    starts = block_starts(len(t.ids), cfg.stride)
    found, seconds = _retrieve_blocks(tokenizer, t, starts, retrieve, cfg.query_len)
    bos = start_token_id(tokenizer)
    out = []
    for start, passages in zip(starts, found, strict=True):
        used = [p.tokens[: cfg.doc_tokens] for p in passages[: cfg.docs]]
        passage = [tok for u in used for tok in u]
        end = min(start + cfg.stride, len(t.ids))
        if log is not None:
            log.add(start, end, used)
        out.append(-_block_logprobs(model, t, start, end, passage, context, bos))
    return torch.cat(out), seconds


@torch.inference_mode()
def replug_nll(model: Any, tokenizer: Any, t: Targets, retrieve: PassageSource | None, cfg: InContextConfig,
               context: int, log: NeighbourLog | None = None) -> tuple[torch.Tensor, float]:
    """REPLUG: one forward pass per top-``docs`` passage; each target's probability is the mixture
    Σ_j softmax(scores)_j · p(target | passage_j, text), computed in log space. ``log`` as in
    ``in_context_nll``."""
    starts = block_starts(len(t.ids), cfg.stride)
    found, seconds = _retrieve_blocks(tokenizer, t, starts, retrieve, cfg.query_len)
    bos = start_token_id(tokenizer)
    out = []
    for start, passages in zip(starts, found, strict=True):
        end = min(start + cfg.stride, len(t.ids))
        passages = passages[: cfg.docs]
        if log is not None:
            log.add(start, end, [p.tokens[: cfg.doc_tokens] for p in passages])
        if not passages:
            out.append(-_block_logprobs(model, t, start, end, [], context, bos))
            continue
        log_w = torch.log_softmax(torch.tensor([p.score for p in passages], dtype=torch.float32), 0)  # (J,)
        lp = torch.stack([_block_logprobs(model, t, start, end, p.tokens[: cfg.doc_tokens], context,
                                          bos) for p in passages])  # (J, end-start)
        out.append(-torch.logsumexp(lp + log_w[:, None], dim=0))
    return torch.cat(out), seconds


def store_retriever(ds: Any, k: int, exclude_same_doc: bool = True, decontaminate: int | None = None,
                    doc_tokens: dict[str, torch.Tensor] | None = None,
                    retriever: Retriever | None = None) -> PassageSource:
    """Passages from a ralm ``Datastore``, rows found by ``retriever`` (default: the store's own search),
    payload read from the store: passage = chunk text (+ continuation) in LM tokens.

    ``exclude_same_doc`` drops neighbours from the evaluated document (RETRO's rule): asked of the search,
    and checked again on what comes back, so a wrapper's rows (random, fixed) obey it too; ``decontaminate``
    drops neighbours sharing an N-token span with the evaluated document (``doc_tokens`` by doc id).
    """
    retriever = StoreRetriever(ds) if retriever is None else retriever

    def retrieve(queries: list[str], doc_id: str) -> list[list[Passage]]:
        fetch = min(len(retriever), k * (4 if decontaminate else 1))
        D, I = retriever.search(queries, fetch, exclude_doc_ids=[{doc_id}] * len(queries)  # noqa: E741
                                if exclude_same_doc else None)
        grams = _ngrams(doc_tokens[doc_id].tolist(), decontaminate) if decontaminate and doc_tokens else None
        out = []
        for scores, rows in zip(D, I, strict=True):
            kept = []
            for score, row in zip(scores, rows, strict=True):
                if row < 0:
                    continue
                rec = ds.chunk(int(row))
                if exclude_same_doc and rec["doc_id"] == doc_id:
                    continue
                toks = list(rec["tokens"]) + list(rec["continuation"])
                if grams is not None and _ngrams(toks, decontaminate) & grams:
                    continue
                kept.append(Passage(toks, float(score)))
                if len(kept) == k:
                    break
            out.append(kept)
        return out

    return retrieve


def _ngrams(tokens: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _opener(fn: Callable[..., tuple[torch.Tensor, float]]) -> Callable[[MethodContext], Session]:
    """``open`` for in-context RALM / REPLUG: one store retriever, blocks of ``--stride`` tokens."""
    def open_(ctx: MethodContext) -> Session:
        cfg: InContextConfig = ctx.options
        ds = open_retrieval_store(ctx)
        ds = restrict(ds, ds.manifest["counts"]["chunks"], ctx)
        doc_tokens = {d.id: make_targets(d, ctx.tokenizer).ids for d in ctx.docs} if ctx.decontaminate else None
        retriever = method_retriever(ds, ctx)
        retrieve = store_retriever(payload_store(retriever, ds), cfg.docs, ctx.exclude_same_doc, ctx.decontaminate,
                                   doc_tokens, retriever=retriever)
        # its blocks of --stride tokens, not the plain LM's windows
        session = Session(window_stride=cfg.stride, info=dict(stride=cfg.stride, query_len=cfg.query_len,
                                                              docs=cfg.docs, doc_tokens=cfg.doc_tokens))

        def scorer(t: Targets, context: int) -> tuple[torch.Tensor, float]:
            return fn(ctx.model, ctx.tokenizer, t, retrieve, cfg, context, log=session.log_for(t.doc_id, ctx.leakage))

        session.scorer = scorer
        return session

    return open_


def _generate(model: Any, tokenizer: Any, cfg: Any, ds: Any, state: Any) -> Any:
    """``ralm generate`` step: every ``cfg.stride`` tokens (and once for the prompt) the last ``cfg.query_len``
    tokens retrieve the top ``cfg.docs`` passages, prepended to the context of what follows."""
    device = next(model.parameters()).device
    bos = start_token_id(tokenizer)
    special = set(tokenizer.all_special_ids)
    retriever = StoreRetriever(ds)
    passage: list[int] = []

    def step(ids: list[int], n_prompt: int, retrievals: list[dict[str, Any]]) -> torch.Tensor:
        nonlocal passage
        n = len(ids)
        if (n - n_prompt) % cfg.stride == 0:
            query = tokenizer.decode([i for i in ids[max(0, n - cfg.query_len):] if i not in special])
            hits = store_hits(ds, query, cfg.docs, retriever)
            passage = [tok for h in hits for tok in h["tokens"][: cfg.doc_tokens]]
            retrievals.append({"position": n, "query": query, "neighbours": without_tokens(hits)})
        inp = block_input(torch.tensor(ids, dtype=torch.long), n - 1, n, passage, cfg.context, bos)
        return model(input_ids=inp.unsqueeze(0).to(device), logits_to_keep=1).logits[0, -1]

    return step


register_method(Method(name="in-context", help="In-Context RALM: top passages prepended every --stride tokens",
                       store="retrieval", open=_opener(in_context_nll), config=InContextConfig,
                       options="in_context", generate=_generate))
register_method(Method(name="replug", help="REPLUG: one pass per passage, probabilities mixed by retrieval score",
                       store="retrieval", open=_opener(replug_nll), config=InContextConfig, options="in_context"))
