"""What the retrieval methods share: opening the store a run names, its random subset, and top-k hits."""

from __future__ import annotations

from typing import Any

from ralm.core.registry import MethodContext
from ralm.datastore.store import Datastore
from ralm.datastore.subset import nested_rows
from ralm.lm.presets import tokenizer_fingerprint


def restrict(store: Any, n_rows: int, ctx: MethodContext) -> Any:
    """The store, or its nested random subset (``--subset``, ``--subset-seed``), searched in place."""
    if ctx.subset is None or ctx.subset == 1.0:
        return store
    return store.restrict(nested_rows(n_rows, ctx.subset, ctx.subset_seed))


def open_retrieval_store(ctx: MethodContext, check: bool = True) -> Datastore:
    """The run's retrieval store; ``check``: its passages are the store's own token ids, so they must be the
    model's tokens. ``ctx.wrap_store`` (if any) wraps it: the one place every retrieval method's store passes."""
    ds = Datastore.open(ctx.store)
    if check:
        ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(ctx.tokenizer), tokenizer_name=ctx.model_name)
    return ctx.wrapped(ds)


def store_hits(ds: Any, query: str, k: int) -> list[dict[str, Any]]:
    """Top-k chunks for one query: LM tokens (chunk + continuation), doc id, score, text (``ralm generate``)."""
    out = []
    for h in ds.search([query], k=min(k, len(ds)))[0]:
        rec = ds.chunk(h.row)
        out.append({"doc_id": h.doc_id, "score": round(h.score, 4), "text": h.text + h.continuation,
                    "tokens": list(rec["tokens"]) + list(rec["continuation"])})
    return out


def without_tokens(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "tokens"} for h in hits]
