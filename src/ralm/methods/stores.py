"""What the retrieval methods share: opening the store a run names, its random subset, the retriever every
method reads neighbours through, and top-k hits."""

from __future__ import annotations

from typing import Any

from ralm.core.registry import MethodContext
from ralm.core.retriever import KNNRetriever, Retriever, StoreRetriever
from ralm.datastore.knn_store import KNNStore
from ralm.datastore.store import Datastore
from ralm.datastore.subset import nested_rows
from ralm.lm.presets import tokenizer_fingerprint
from ralm.serve.client import RemoteStore, open_store


def restrict(store: Any, n_rows: int, ctx: MethodContext) -> Any:
    """The store, or its nested random subset (``--subset``, ``--subset-seed``), searched in place."""
    if ctx.subset is None or ctx.subset == 1.0:
        return store
    return store.restrict(nested_rows(n_rows, ctx.subset, ctx.subset_seed))


def open_retrieval_store(ctx: MethodContext, check: bool = True) -> Datastore | RemoteStore:
    """The run's retrieval store; ``check``: its passages are the store's own token ids, so they must be the
    model's tokens. ``ctx.store``: a store directory or a served store's http(s) URL."""
    ds = open_store(ctx.store)
    if check:
        ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(ctx.tokenizer), tokenizer_name=ctx.model_name)
    return ds


def method_retriever(store: Datastore | RemoteStore | KNNStore, ctx: MethodContext) -> Retriever:
    """The retriever a method reads its neighbours from: the store's adapter (of its subset, if restricted),
    wrapped by ``ctx.wrap_retriever``: the one place every method's retrieval passes."""
    return ctx.wrapped(KNNRetriever(store) if isinstance(store, KNNStore) else StoreRetriever(store))


def store_hits(ds: Any, query: str, k: int, retriever: Retriever | None = None) -> list[dict[str, Any]]:
    """Top-k chunks for one query, read through ``retriever`` (default: the store's own): LM tokens (chunk +
    continuation), doc id, score, text (``ralm generate``)."""
    retriever = StoreRetriever(ds) if retriever is None else retriever
    D, I = retriever.search([query], min(k, len(retriever)))  # noqa: E741
    out = []
    for score, row in zip(D[0], I[0], strict=True):
        if row < 0:
            continue
        rec = ds.chunk(int(row))
        out.append({"doc_id": rec["doc_id"], "score": round(float(score), 4),
                    "text": rec["text"] + rec["continuation_text"],
                    "tokens": list(rec["tokens"]) + list(rec["continuation"])})
    return out


def without_tokens(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "tokens"} for h in hits]
