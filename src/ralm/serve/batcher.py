"""Micro-batching: concurrent search requests merged into one index search.

One asyncio worker takes the first waiting request, then gathers more for at most ``max_wait`` seconds or
until ``max_batch`` queries, and searches each group of requests that can share a search (same store view,
same kind of query, same k) with ONE ``search_rows`` call on one search thread; each request gets its rows of
the result. Many single-query clients so get batch throughput, and the index is searched by one thread at a
time (FAISS uses its own threads inside a call). A merged search that fails is retried request by request, so
one request's error is its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Pending:
    """One request's search: ``key`` says which requests may share an index call."""

    key: Hashable
    store: Any  # what search_rows is called on (a store or its restricted view)
    queries: list[str] | np.ndarray  # texts, or (nq, dim) float32
    k: int
    exclusions: list[set[str]]  # one set per query
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.queries)


class MicroBatcher:
    """Merges concurrent ``submit`` calls; ``index_calls`` counts the ``search_rows`` calls made."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.index_calls = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ralm-search")
        self._queue: asyncio.Queue[Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._carry: Pending | None = None  # taken off the queue but over the batch bound: first of the next

    async def submit(self, item: Pending) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of ``item``'s queries, searched together with whatever else is waiting."""
        if self._worker is None or self._worker.done():  # started in the serving loop, on first use
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        item.future = asyncio.get_running_loop().create_future()
        await self._queue.put(item)
        return await item.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _gather(self) -> list[Pending]:
        loop = asyncio.get_running_loop()
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, n = [first], len(first)
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            left = deadline - loop.time()
            try:
                item = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if n + len(item) > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            n += len(item)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._gather()
            groups: dict[Hashable, list[Pending]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for group in groups.values():
                await self._search(group)

    async def _search(self, group: list[Pending]) -> None:
        group = [g for g in group if not g.future.done()]  # a request that timed out is not searched
        if not group:
            return
        first = group[0]
        if isinstance(first.queries, np.ndarray):
            queries: Any = np.concatenate([g.queries for g in group])
        else:
            queries = [q for g in group for q in g.queries]
        exclusions = [e for g in group for e in g.exclusions]
        try:
            D, I = await asyncio.get_running_loop().run_in_executor(  # noqa: E741
                self._executor, self._call, first.store, queries, first.k, exclusions)
        except Exception as e:  # noqa: BLE001 (handed to the request, which answers with it)
            if len(group) > 1:
                for g in group:
                    await self._search([g])
            elif not first.future.done():
                first.future.set_exception(e)
            return
        at = 0
        for g in group:
            if not g.future.done():
                g.future.set_result((D[at:at + len(g)], I[at:at + len(g)]))
            at += len(g)

    def _call(self, store: Any, queries: Any, k: int, exclusions: list[set[str]]) -> tuple[np.ndarray, np.ndarray]:
        self.index_calls += 1
        return store.search_rows(queries, k, exclusions if any(exclusions) else None)
