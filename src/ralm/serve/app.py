"""``ralm serve``: a datastore behind HTTP (FastAPI on uvicorn), searched exactly as in process.

Routes (JSON; every error is ``{"error": "<one line>"}`` with its status code):

- ``POST /search`` ``{"store"?, "queries": [text, ...] | "vectors": [[float, ...], ...], "k", "exclude_doc_ids"?:
  [[doc id, ...] per query], "rows"?: [global row, ...]}`` -> ``{"ids": [[row, ...]], "scores": [[float | null]],
  "metric"}``: ``Datastore.search_rows`` (ralm.core.retriever's (D, I) contract; a missing neighbour is id -1,
  score null). ``rows``: search only those rows (``Datastore.restrict``, what ``--subset`` searches).
- ``POST /chunks`` ``{"store"?, "rows": [...]}`` -> ``{"chunks": [record, ...]}``: ``Datastore.chunk`` per row.
- ``GET /info`` -> ``{"stores": {name: info}}``: each store's ``info()`` plus rows, metric, dim, its manifest,
  the manifest's sha256 and the service's limits. ``GET /health`` -> ``{"status": "ok"}``. OpenAPI at ``/docs``.

``store`` names one of the served stores (its directory name); it may be left out when one is served.
Decontamination is not a search option: the methods apply it to the returned rows' tokens, read by ``/chunks``.

Statuses: 400 bad value (k, dimension, sizes, malformed JSON), 401 missing or wrong bearer token (every route
but /health when ``--token-file`` is given), 404 unknown store or route, 413 body over ``--max-body-bytes``,
422 body of the wrong shape, 504 search over ``--timeout-s``, 500 anything else; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ralm.core.retriever import per_query_exclusions
from ralm.datastore.store import Datastore, RestrictedViews, store_sha256
from ralm.datastore.store_set import StoreSet, is_store_set
from ralm.errors import RalmError, UnavailableError
from ralm.serve.batcher import MicroBatcher, Pending
from ralm.serve.config import ServeConfig


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SearchRequest(BaseModel):
    store: str | None = Field(None, description="served store name (may be left out when one is served)")
    queries: list[str] | None = Field(None, description="query texts (the store encodes them)")
    vectors: list[list[float]] | None = Field(None, description="(nq, dim) query vectors from the store's encoder")
    k: int = Field(10, description="neighbours per query")
    exclude_doc_ids: list[list[str]] | None = Field(None, description="per query: document ids never returned")
    rows: list[int] | None = Field(None, description="search only these global rows (a subset of the store)")


class ChunksRequest(BaseModel):
    store: str | None = None
    rows: list[int] = Field(description="global rows whose chunk records to return")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """ASGI middleware: the bearer token (all but /health) and the body size bound, before any parsing."""

    def __init__(self, app: Any, token: str | None, max_body: int) -> None:
        self.app, self.token, self.max_body = app, token, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                what = "wrong" if given else "missing"
                return await error(401, f"{what} bearer token: send 'Authorization: Bearer <token>'")(scope, receive, send)
        too_big = error(413, f"request body over {self.max_body} bytes (--max-body-bytes)")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:  # read it here (bounded) and replay it: a chunked body has no length to check first
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def store_name(path: str | Path) -> str:
    return os.path.basename(os.path.abspath(path))


def open_stores(paths: list[str], ray_address: str | None = None, replicas: int = 1,
                timeout_s: float = 60.0) -> dict[str, Datastore | StoreSet]:
    """Each store (or store set) of ``paths`` opened and warmed (index and encoder loaded), by its folder name."""
    if not paths:
        raise RalmError("ralm serve: give at least one datastore directory")
    out: dict[str, Datastore | StoreSet] = {}
    for p in paths:
        name = store_name(p)
        if name in out:
            raise RalmError(f"DS {p}: another served store is named {name!r} too (a store is served under its "
                            "directory name; rename or link one)")
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise RalmError(f"DS {p}: its name {name!r} must be letters, digits, '-', '_' or '.' (it is a URL part)")
        if is_store_set(p):  # its shards: here, or in Ray actors that load them as they start
            ds: Datastore | StoreSet = StoreSet.open(p, ray_address, replicas, timeout_s)
        elif ray_address is not None:
            raise RalmError(f"DS {p}: --ray-address holds the shards of store sets (`ralm storeset`); this is one store")
        else:
            ds = Datastore.open(p)
        for shard in getattr(ds, "shards", [ds]):
            if isinstance(shard, Datastore):
                shard._get_index()  # noqa: SLF001 (load the index now, not in the first request)
        if not ds.sparse:
            ds.encode(["warm up"])
        out[name] = ds
    return out


def store_info(store: Any, cfg: ServeConfig) -> dict[str, Any]:
    enc = store.manifest["encoder"]
    return {**store.info(), "rows": len(store), "metric": store.metric, "sparse": store.sparse,
            "dim": enc.get("dim"), "manifest": store.manifest, "manifest_sha256": store_sha256(store),
            "limits": {"max_queries": cfg.max_queries, "max_k": cfg.max_k, "max_chunk_rows": 16 * cfg.max_queries,
                       "max_query_bytes": cfg.max_query_bytes, "max_body_bytes": cfg.max_body_bytes}}


def _scores(D: np.ndarray) -> list[list[float | None]]:
    """JSON has no infinities: a missing neighbour's score is null."""
    return [[float(x) if math.isfinite(x) else None for x in row] for row in D.tolist()]


def create_app(stores: dict[str, Any], cfg: ServeConfig, token: str | None = None) -> FastAPI:
    """The service over ``stores`` (name -> opened store); ``app.state.batcher`` counts its index calls."""
    batcher = MicroBatcher(cfg.max_batch, cfg.max_wait_ms / 1000)
    views = {name: RestrictedViews(s) for name, s in stores.items()}  # each store's, by their rows
    infos = {name: store_info(s, cfg) for name, s in stores.items()}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await batcher.close()

    app = FastAPI(title="ralm retrieval service", lifespan=lifespan,
                  description="Search ralm datastores: the (D, I) of `Datastore.search_rows`, over HTTP.")
    app.state.batcher = batcher

    def pick(name: str | None) -> tuple[str, Any]:
        if name is None:
            if len(stores) > 1:
                raise ApiError(400, f"several stores are served ({', '.join(stores)}): name one in \"store\"")
            name = next(iter(stores))
        if name not in stores:
            raise ApiError(404, f"no store {name!r} is served (served: {', '.join(stores)})")
        return name, stores[name]

    def view(name: str, store: Any, rows: list[int] | None) -> tuple[Any, bytes | None]:
        if rows is None:
            return store, None
        arr = np.asarray(rows, dtype=np.int64)
        n = int(store.manifest["index"]["meta"]["ntotal"])
        if len(arr) == 0 or arr.min() < 0 or arr.max() >= n:
            raise ApiError(400, f"rows: must be a non-empty list of rows in 0..{n - 1}")
        return views[name].get(arr)

    def queries_of(req: SearchRequest, store: Any) -> list[str] | np.ndarray:
        if (req.queries is None) == (req.vectors is None):
            raise ApiError(400, "give either \"queries\" (texts) or \"vectors\", not both or neither")
        given = req.queries if req.queries is not None else req.vectors
        if not 1 <= len(given) <= cfg.max_queries:
            raise ApiError(400, f"{len(given)} queries: a request holds 1..{cfg.max_queries} (--max-queries)")
        if req.queries is not None:
            for i, q in enumerate(req.queries):
                if len(q.encode("utf-8")) > cfg.max_query_bytes:
                    raise ApiError(400, f"query {i}: over {cfg.max_query_bytes} UTF-8 bytes (--max-query-bytes)")
            return list(req.queries)
        dim = store.manifest["encoder"].get("dim")
        if store.sparse:
            raise ApiError(400, "a BM25 store is searched with texts, not vectors")
        if any(len(v) != dim for v in req.vectors):
            bad = next(len(v) for v in req.vectors if len(v) != dim)
            raise ApiError(400, f"vectors: a vector of dimension {bad}; the store's encoder has dim {dim}")
        return np.asarray(req.vectors, dtype=np.float32)

    @app.post("/search", summary="top-k rows per query: ids and scores (the Retriever contract)")
    async def search(req: SearchRequest) -> dict[str, Any]:
        name, store = pick(req.store)
        store, rows_key = view(name, store, req.rows)
        queries = queries_of(req, store)
        if not 1 <= req.k <= min(cfg.max_k, len(store)):
            raise ApiError(400, f"k={req.k}: must be in 1..{min(cfg.max_k, len(store))} (--max-k, store size)")
        exclusions = per_query_exclusions(None if req.exclude_doc_ids is None else
                                          [set(e) for e in req.exclude_doc_ids], len(queries))
        kind = "vectors" if isinstance(queries, np.ndarray) else "texts"
        item = Pending((name, rows_key, kind, req.k), store, queries, req.k, exclusions)
        try:
            D, I = await asyncio.wait_for(batcher.submit(item), cfg.timeout_s)  # noqa: E741
        except TimeoutError:
            raise ApiError(504, f"search took over {cfg.timeout_s:g} s (--timeout-s)") from None
        return {"ids": I.tolist(), "scores": _scores(D), "metric": store.metric}

    @app.post("/chunks", summary="chunk records of global rows")
    def chunks(req: ChunksRequest) -> dict[str, Any]:  # sync: FastAPI runs it on a worker thread (Parquet reads)
        _, store = pick(req.store)
        n = int(store.manifest["index"]["meta"]["ntotal"])
        if not 1 <= len(req.rows) <= 16 * cfg.max_queries:
            raise ApiError(400, f"{len(req.rows)} rows: a request holds 1..{16 * cfg.max_queries}")
        if min(req.rows) < 0 or max(req.rows) >= n:
            raise ApiError(400, f"rows: must be in 0..{n - 1}")
        return {"chunks": [store.chunk(r) for r in req.rows]}

    @app.get("/info", summary="what each served store is: rows, metric, dim, encoder, tokenizer, manifest")
    def info() -> dict[str, Any]:
        return {"stores": infos}

    @app.get("/health", summary="liveness (no token needed)")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error(e.status, str(e))

    @app.exception_handler(RalmError)
    async def _ralm(_: Request, e: RalmError) -> JSONResponse:
        return error(e.status if isinstance(e, UnavailableError) else 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error(422, f"{where}: {first['msg']}" + (f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _other(_: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    app.add_middleware(Guard, token=token, max_body=cfg.max_body_bytes)  # outermost but the 500 handler
    return app


def serve(cfg: ServeConfig, stores: dict[str, Any] | None = None) -> None:
    """Serve ``stores`` (default: ``cfg.stores`` opened) on ``cfg.host:cfg.port`` until SIGINT/SIGTERM, which
    stop accepting, let in-flight requests finish (at most ``timeout_s``) and return."""
    token = cfg.token()
    if stores is None:
        stores = open_stores(cfg.stores, cfg.ray_address, cfg.replicas, cfg.timeout_s)
    app = create_app(stores, cfg, token)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=cfg.timeout_s)
    uvicorn.Server(config).run()
