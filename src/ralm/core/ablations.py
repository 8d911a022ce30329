"""Store-content ablations for ``ralm diagnose`` (issue 15), as retriever wrappers at equal context length.

Each keeps the real search's k and its pattern of missing neighbours (-1), so the context a method builds is as
long as with the real store; only what fills it changes. With ralm.core.retriever's ``EmptyRetriever`` (no
retrieval), ``RandomRetriever`` (random store rows) and ``FixedRetriever`` (one fixed chunk for every input):

- ``ShuffledRetriever``: each input (one query of a search) gets ANOTHER input's retrieved rows. Methods search
  in batches (a document's blocks, a batch of questions), so the shuffle cannot be made inside one call: a real
  run first records every query's rows in call order (``RecordingRetriever`` into a ``RetrievalLog``), then
  ``Shuffle(log, seed)`` fixes a seeded derangement over all recorded inputs and a second, identical run reads
  query i's rows from input ``partner[i]`` (the i-th query searched, checked against the recorded one).
  Whole lists move between inputs, never ids within one list, and no input gets its own list (or the same set
  of rows) back where another one exists.
- ``RandomTextRetriever``: the real rows, but the method reads them from a payload view (``payload(store)``,
  ralm.core.retriever.payload_store) whose records hold random tokens drawn from the store's own tokens (a
  seeded sample of rows), as many as the real chunk and continuation have, so the text handed out has exactly
  the length distribution of the real retrieved chunks. Text fields are random words of the store (same word
  count), or ``decode(tokens)`` when a decoder is given. A kNN-LM store's view draws its values (next tokens)
  from the store's own values instead; a store with a ``random_text_view(seed)`` (RetroPrompt's knowledge
  store: the representations of random text of each example's word count) makes its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ralm.core.retriever import (
    EmptyRetriever,
    Exclusions,
    FixedRetriever,
    RandomRetriever,
    Retriever,
    RetrieverWrapper,
    check_k,
    per_query_exclusions,
)
from ralm.errors import RalmError


def _query_key(q: Any) -> Any:
    """What identifies a query between the recorded and the ablated run: its text, or its vector."""
    return q if isinstance(q, str) else np.asarray(q, dtype=np.float32).copy()


def _same_query(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-4))


@dataclass
class RetrievalLog:
    """Every query a run searched, in call order: its key (text or vector), exclusion set and (D, I) rows."""

    queries: list[Any] = field(default_factory=list)
    groups: list[frozenset[str]] = field(default_factory=list)  # the query's excluded doc ids (its document)
    D: list[np.ndarray] = field(default_factory=list)  # (k,) per query
    I: list[np.ndarray] = field(default_factory=list)  # (k,) per query, -1 = no neighbour  # noqa: E741

    def __len__(self) -> int:
        return len(self.I)

    def ids(self) -> list[list[int]]:
        """Per input, its retrieved row ids (no -1): what the context-variance metrics read."""
        return [[int(i) for i in row if i >= 0] for row in self.I]

    def add(self, queries: Any, exclude: Exclusions, D: np.ndarray, I: np.ndarray) -> None:  # noqa: E741
        for q, ex, d, i in zip(queries, per_query_exclusions(exclude, len(I)), D, I, strict=True):
            self.queries.append(_query_key(q))
            self.groups.append(frozenset(ex))
            self.D.append(np.array(d))
            self.I.append(np.array(i, dtype=np.int64))


class RecordingRetriever(RetrieverWrapper):
    """The real search, unchanged, with every query's rows appended to ``log`` (several wrappers may share one
    log: a task run wraps one retriever per restricted search)."""

    def __init__(self, inner: Retriever, log: RetrievalLog) -> None:
        super().__init__(inner)
        self.log = log

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        D, I = self.inner.search(queries, k, exclude_doc_ids)  # noqa: E741
        self.log.add(queries, exclude_doc_ids, D, I)
        return D, I


def derangement(log: RetrievalLog, seed: int = 0) -> np.ndarray:
    """``partner[i] != i`` for every input (n >= 2), seeded. Inputs are put in a random order, grouped by their
    exclusion set (their document, where the method names it), and each takes the input ``s`` places on in that
    cyclic order, ``s`` = the largest group's size where that still leaves room, so partners come from other
    documents; then an input whose partner retrieved the same set of rows swaps partners with another where
    that fixes it (bounded tries: a store whose every input retrieves the same rows cannot be shuffled)."""
    n = len(log)
    if n < 2:
        raise RalmError(f"shuffled retrieval: {n} recorded input(s); a derangement needs at least 2")
    rng = np.random.default_rng(seed)
    names = {g: j for j, g in enumerate(dict.fromkeys(log.groups))}
    group = np.array([names[g] for g in log.groups])
    order = rng.permutation(n)
    order = order[np.argsort(group[order], kind="stable")]  # random within a group, groups side by side
    largest = int(np.bincount(group).max())
    s = min(largest, n - largest) if len(names) > 1 else 1
    partner = np.empty(n, dtype=np.int64)
    partner[order] = order[(np.arange(n) + s) % n]
    sets = [frozenset(r) for r in log.ids()]

    def bad(i: int, p: int) -> bool:
        return p == i or sets[p] == sets[i]

    for i in range(n):
        for _ in range(64 if bad(i, int(partner[i])) else 0):
            j = int(rng.integers(n))
            if not bad(i, int(partner[j])) and not bad(j, int(partner[i])):
                partner[i], partner[j] = partner[j], partner[i]
                break
    return partner


class Shuffle:
    """A seeded derangement over a recorded run and the cursor of the run replaying it (shared by every
    ``ShuffledRetriever`` over it). ``unchanged``: inputs left with the same set of rows as their own."""

    def __init__(self, log: RetrievalLog, seed: int = 0) -> None:
        self.log, self.partner, self.cursor = log, derangement(log, seed), 0
        sets = [frozenset(r) for r in log.ids()]
        self.unchanged = sum(sets[i] == sets[p] for i, p in enumerate(self.partner))

    def take(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of the next ``len(queries)`` inputs: each its own recorded scores and missing neighbours,
        its partner's rows, best first, in its own found positions (past the partner's rows: -1)."""
        nq, start = len(queries), self.cursor
        if start + nq > len(self.log):
            raise RalmError(f"shuffled retrieval: query {start + nq} of a run that recorded {len(self.log)}; "
                            "replay exactly the recorded run")
        D, I = [], []  # noqa: E741
        for j, q in enumerate(queries):
            i = start + j
            if not _same_query(_query_key(q), self.log.queries[i]) or len(self.log.I[i]) < k:
                raise RalmError(f"shuffled retrieval: query {i} differs from the recorded run's (or asks more "
                                f"than its k={len(self.log.I[i])}); replay exactly the recorded run")
            own, other = self.log.I[i][:k], self.log.I[int(self.partner[i])]
            rows = np.full(k, -1, dtype=np.int64)
            found = np.flatnonzero(own >= 0)
            theirs = other[other >= 0][: len(found)]
            rows[found[: len(theirs)]] = theirs
            D.append(self.log.D[i][:k])
            I.append(rows)
        self.cursor += nq
        return np.stack(D), np.stack(I)


class ShuffledRetriever(RetrieverWrapper):
    """Another input's retrievals for every input (see the module docstring); no search is made."""

    def __init__(self, inner: Retriever, plan: Shuffle) -> None:
        super().__init__(inner)
        self.plan = plan

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        return self.plan.take(queries, check_k(k))


class RandomTextRetriever(RetrieverWrapper):
    """The real rows read from a view of random text (see the module docstring). ``pool_rows``: how many store
    rows (a seeded sample) supply the token and word pools; ``decode``: tokens -> text for the text fields."""

    def __init__(self, inner: Retriever, seed: int = 0, pool_rows: int = 1024,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        super().__init__(inner)
        if pool_rows < 1:
            raise RalmError(f"RandomTextRetriever pool_rows={pool_rows}: must be >= 1")
        self.seed, self.pool_rows, self.decode = seed, pool_rows, decode

    def payload(self, store: Any) -> Any:
        if hasattr(store, "random_text_view"):  # a store that encodes its own random text (RetroPrompt's)
            return store.random_text_view(self.seed)
        view = copy.copy(store)  # like Datastore.restrict: a view sharing the index, its own record reader
        rng = np.random.default_rng(self.seed)
        if not hasattr(store, "chunk"):  # a kNN-LM store: values (next tokens) drawn from its own values
            view.values = store.values[rng.integers(0, len(store.values), size=len(store.values))]
            return view
        rows = store.allowed if store.allowed is not None else np.arange(len(store))
        sample = [store.chunk(int(r)) for r in rng.choice(rows, size=min(len(rows), self.pool_rows), replace=False)]
        tokens = np.array([t for rec in sample for t in (*rec["tokens"], *rec["continuation"])], dtype=np.int64)
        words = np.array([w for rec in sample for w in rec["text"].split()] or ["the"], dtype=object)
        if len(tokens) == 0:
            raise RalmError(f"{getattr(store, 'root', 'store')}: no tokens to draw random text from")
        view.chunk = lambda row: self._record(store.chunk(row), int(row), tokens, words)
        return view

    def _record(self, rec: dict[str, Any], row: int, tokens: np.ndarray, words: np.ndarray) -> dict[str, Any]:
        """Row ``row``'s record with random tokens and text of its own lengths (seeded by row: a row handed out
        twice reads the same random text)."""
        rng = np.random.default_rng([self.seed, row])
        out = dict(rec)
        for tok_key, text_key in (("tokens", "text"), ("continuation", "continuation_text")):
            toks = tokens[rng.integers(0, len(tokens), size=len(rec[tok_key]))].tolist()
            out[tok_key] = toks
            if self.decode is not None:
                out[text_key] = self.decode(toks) if toks else ""
            else:
                n_words = len(rec[text_key].split())
                out[text_key] = " ".join(words[rng.integers(0, len(words), size=n_words)])
        return out


# the conditions `ralm diagnose` reports, by the names ralm.eval.verdict reads
ABLATIONS = ("real", "none", "shuffled", "random", "random-text", "fixed")


def fixed_rows(log: RetrievalLog) -> np.ndarray:
    """The fixed context at the real run's k: its most retrieved row, repeated k times (k = the longest list
    it recorded), so "one fixed chunk for every input" fills as many neighbour slots as the real store did."""
    ids = [i for row in log.ids() for i in row]
    if not ids:
        raise RalmError("fixed-chunk ablation: the recorded run retrieved no rows")
    values, counts = np.unique(np.asarray(ids, dtype=np.int64), return_counts=True)
    k = max(len(row) for row in log.I)
    return np.full(k, values[np.argmax(counts)], dtype=np.int64)  # ties: the lowest row id


def ablation_wrap(name: str, log: RetrievalLog | None = None, seed: int = 0,
                  decode: Callable[[list[int]], str] | None = None) -> Callable[[Retriever], Retriever] | None:
    """The ``wrap_retriever`` of ablation ``name`` (``ABLATIONS``; "real": None, the store as it is). Shuffled
    and fixed read the recorded real run ``log`` (record it with ``RecordingRetriever`` first); a shuffled wrap
    replays that run once (its cursor moves on): make one per run."""
    if name not in ABLATIONS:
        raise RalmError(f"ablation {name!r}: choose from {', '.join(ABLATIONS)}")
    if name in ("shuffled", "fixed") and log is None:
        raise RalmError(f"ablation {name!r} needs the real run's retrieval log")
    if name == "real":
        return None
    if name == "none":
        return EmptyRetriever
    if name == "random":
        return lambda r: RandomRetriever(r, seed)
    if name == "random-text":
        return lambda r: RandomTextRetriever(r, seed, decode=decode)
    if name == "fixed":
        rows = fixed_rows(log)
        return lambda r: FixedRetriever(r, rows)
    plan = Shuffle(log, seed)
    return lambda r: ShuffledRetriever(r, plan)
