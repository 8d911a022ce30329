"""``--datastore http://HOST:PORT[/NAME]``: a served store used where a store directory is.

``open_store(path_or_url)`` is what the commands open a retrieval store with: a ``Datastore`` for a directory,
a ``StoreSet`` for a store set's folder, a ``RemoteStore`` for a URL. ``RemoteStore`` answers what the methods
read of a ``Datastore``: ``search_rows`` (the Retriever contract, so ``StoreRetriever`` wraps it as it wraps a
local store), ``search`` / ``hits``, ``chunk(row)`` and the manifest, ``restrict(rows)``, ``check_compatible``,
``len``, ``metric``. Chunk records come from ``POST /chunks`` into a bounded LRU cache; after each search the
returned rows' records are fetched in one call (the methods read them next). The token, where the service wants
one, is ``$RALM_SERVE_TOKEN``.
Every route it calls only reads, so a call that could not have been answered (connection refused or closed
under it, as while the service restarts, or 503: a shard with no live actor) is sent again, backing off, for up
to ``retry_s`` (once the service has answered: a wrong URL fails at once); past that, and for any other failure
(no answer in time, an error status), it is one ``RalmError`` line naming the URL.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ralm.core.retriever import Exclusions, check_k, per_query_exclusions, worst
from ralm.datastore.store import Datastore
from ralm.datastore.store_set import StoreSet, is_store_set
from ralm.errors import RalmError

TOKEN_ENV = "RALM_SERVE_TOKEN"


def is_url(path: str | Path | None) -> bool:
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def open_store(path: str | Path, verify: bool = False) -> Any:
    """A retrieval store: ``Datastore.open(path)`` for a directory, ``StoreSet.open(path)`` for a store set's
    folder (``ralm storeset``), ``RemoteStore(path)`` for an http(s) URL."""
    if is_url(path):
        if verify:
            raise RalmError(f"--verify: checks a store's own files; run it where {path} is served")
        return RemoteStore(str(path))
    if is_store_set(path):
        if verify:
            raise RalmError(f"--verify: checks one store's files; run `ralm info SHARD --verify` on each shard of {path}")
        return StoreSet.open(path)
    return Datastore.open(path, verify=verify)


class RemoteStore:
    """A store served by ``ralm serve``, read over HTTP (see the module docstring)."""

    # what Datastore does from search_rows, chunk and the manifest alone: the same code, not a copy
    search = Datastore.search
    hits = Datastore.hits
    check_compatible = Datastore.check_compatible
    _doc_ids = StoreSet._doc_ids  # doc ids from the chunk records: one batched call

    def __init__(self, url: str, timeout: float = 60.0, cache_rows: int = 65536, prefetch: bool = True,
                 retry_s: float = 60.0) -> None:
        try:
            import httpx  # the serve extra: needed only for a URL
        except ImportError:
            raise RalmError(f"--datastore {url}: a served store needs the serve extra (pip install 'ralm[serve]')"
                            ) from None
        self._httpx = httpx
        parts = urlsplit(url)
        if not parts.netloc:
            raise RalmError(f"--datastore {url}: not an http://HOST:PORT[/NAME] URL")
        self.url, self.root = url, url  # root: what error messages name
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.timeout, self.prefetch, self.cache_rows, self.retry_s = timeout, prefetch, cache_rows, retry_s
        token = os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._reached = False  # retries only once the service has answered: a wrong URL fails at once
        served = self._call("GET", "/info")["stores"]
        self._reached = True
        name = parts.path.strip("/") or None
        if name is None:
            if len(served) != 1:
                raise RalmError(f"--datastore {url}: serves {len(served)} stores ({', '.join(served)}); name one, "
                                f"e.g. {self.base}/{next(iter(served), 'NAME')}")
            name = next(iter(served))
        if name not in served:
            raise RalmError(f"--datastore {url}: no store {name!r} is served there (served: {', '.join(served)})")
        self.name, self.meta = name, served[name]
        self.manifest: dict[str, Any] = self.meta["manifest"]
        self.manifest_sha256: str = self.meta["manifest_sha256"]
        self.metric: str = self.meta["metric"]
        self.sparse: bool = self.meta["sparse"]
        self.limits: dict[str, int] = self.meta["limits"]
        self.allowed: np.ndarray | None = None

    # ---- HTTP ----------------------------------------------------------------------------------
    def _call(self, method: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        httpx = self._httpx
        deadline, wait = time.monotonic() + self.retry_s, 0.2
        while True:
            r, unanswered = None, None
            try:
                r = self._http.request(method, self.base + route, json=body)
            except httpx.TimeoutException:
                raise RalmError(f"{self.url}: no answer to {route} within {self.timeout:g} s") from None
            except httpx.TransportError as e:  # refused, or the connection closed under the request: not answered
                unanswered = e
            # not answered, or a shard down (503): sent again while the retries last
            if (r is None or r.status_code == 503) and self._reached and time.monotonic() + wait < deadline:
                time.sleep(wait)
                wait = min(2 * wait, 2.0)
                continue
            if r is None:
                detail = (str(unanswered).strip().splitlines() or [""])[0]
                raise RalmError(f"{self.url}: cannot reach the retrieval service ({type(unanswered).__name__}: "
                                f"{detail})") from None
            break
        if r.status_code != 200:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            raise RalmError(f"{self.url}{route}: {r.status_code} {' '.join(str(msg).split())[:300]}")
        return r.json()

    # ---- what a method reads -------------------------------------------------------------------
    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    def __len__(self) -> int:
        return int(self.meta["rows"]) if self.allowed is None else len(self.allowed)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k not in ("manifest", "limits")} | {"url": self.url}

    def restrict(self, rows: np.ndarray) -> RemoteStore:
        """A view searching only ``rows`` (sent with each search); it shares this store's connection and cache."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0:
            raise RalmError("restrict: empty subset of rows")
        view = RemoteStore.__new__(RemoteStore)
        view.__dict__.update(self.__dict__)
        view.allowed = rows
        return view

    def search_rows(self, queries: list[str] | np.ndarray, k: int = 10,
                    exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) as ``Datastore.search_rows`` returns them, searched by the service (batched by ``max_queries``)."""
        k = check_k(k)
        if k > len(self):
            raise RalmError(f"k={k}: larger than the store ({len(self)} chunks)")
        vectors = isinstance(queries, np.ndarray)
        if not vectors and (isinstance(queries, str) or not all(isinstance(q, str) for q in queries)):
            raise RalmError("queries must be a list of strings or an (nq, dim) array")
        if len(queries) == 0:
            raise RalmError("no queries given")
        excl = per_query_exclusions(exclude_doc_ids, len(queries))
        step = self.limits["max_queries"]
        Ds, Is = [], []
        for at in range(0, len(queries), step):
            part = queries[at:at + step]
            body: dict[str, Any] = {"store": self.name, "k": k}
            body["vectors" if vectors else "queries"] = part.astype(np.float32).tolist() if vectors else list(part)
            if any(excl[at:at + step]):
                body["exclude_doc_ids"] = [sorted(e) for e in excl[at:at + step]]
            if self.allowed is not None:
                body["rows"] = self.allowed.tolist()
            out = self._call("POST", "/search", body)
            Is.append(np.asarray(out["ids"], dtype=np.int64).reshape(len(part), k))
            Ds.append(np.array([[worst(self.metric) if s is None else s for s in row] for row in out["scores"]],
                               dtype=np.float32).reshape(len(part), k))
        D, I = np.concatenate(Ds), np.concatenate(Is)  # noqa: E741
        if self.prefetch:
            self.chunks(np.unique(I[I >= 0]).tolist())
        return D, I

    def chunk(self, row: int) -> dict[str, Any]:
        """The record of global row ``row`` (with ``continuation_text``), as ``Datastore.chunk`` gives it."""
        return self.chunks([int(row)])[0]

    def chunks(self, rows: list[int]) -> list[dict[str, Any]]:
        """The records of ``rows``: the cached ones, and the rest in batched ``/chunks`` calls."""
        missing = list(dict.fromkeys(int(r) for r in rows if int(r) not in self._cache))
        step = self.limits["max_chunk_rows"]
        for at in range(0, len(missing), step):
            part = missing[at:at + step]
            for r, rec in zip(part, self._call("POST", "/chunks", {"store": self.name, "rows": part})["chunks"],
                              strict=True):
                self._cache[r] = rec
        out = []
        for r in rows:
            rec = self._cache[int(r)]
            self._cache.move_to_end(int(r))
            out.append(rec)
        while len(self._cache) > max(self.cache_rows, len(rows)):
            self._cache.popitem(last=False)
        return out
