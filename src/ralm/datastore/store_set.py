"""A store set: several datastores searched as one (MassiveDS-style: one store per domain, or shards of one corpus).

A set is a folder holding ``storeset.json``::

    {"format": "ralm-storeset", "version": 1, "dedup": true,
     "shards": [{"path": "../wiki", "manifest_sha256": "..."}, ...]}

Shard paths are relative to the set's folder (or absolute); each manifest's sha256 is recorded, so a shard that
was rebuilt or edited after the set was made is refused rather than silently mixed in.

Global rows: shard ``s``'s local row ``r`` is row ``offsets[s] + r``, so a set answers the same (D, I) contract as
one store (``ralm.core.retriever``). A search sends every shard the same query vectors (encoded once, by the set:
all shards must share the encoder, tokenizer, chunking and metric), each shard returns its own top-k with the
same-document exclusion applied there, and the merge keeps the global top-k by score. With ``dedup`` (default)
a chunk whose text equals a better-ranked chunk's is dropped (overlapping corpora), and shards are asked deeper
until each query has k distinct chunks or every shard is exhausted.

A shard is anything with ``search_rows``, ``chunks(rows)``, ``restrict``, ``__len__``, ``metric`` and
``manifest``: a local ``Datastore``, or a ``RayShard`` (``ralm.datastore.ray_shards``) whose actors hold the
store on other machines. BM25 shards score with their own document frequencies, so a BM25 set ranks by scores
that are not exactly one BM25 store's; dense sets rank exactly as one index over all rows would.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ralm.core.retriever import Exclusions, check_k, per_query_exclusions, worst
from ralm.datastore import layout
from ralm.datastore.store import Datastore, store_sha256
from ralm.errors import IncompatibleError, RalmError, StoreError
from ralm.utils.atomic import sha256_file, write_json

FILE = layout.STORESET
FORMAT, VERSION = "ralm-storeset", 1
# what every shard must agree on for their rows to mean the same thing to a method
_SAME = (("encoder", "fingerprint"), ("encoder", "dim"), ("tokenizer", "fingerprint"), ("chunking", "chunk_tokens"),
         ("chunking", "continuation"))


def is_store_set(path: str | Path) -> bool:
    return (Path(path) / FILE).is_file()


def create_store_set(out: str | Path, shards: list[str | Path], dedup: bool = True, force: bool = False) -> Path:
    """Write ``out/storeset.json`` over the finished stores ``shards`` (checked: each opens and they agree)."""
    out = Path(out)
    if len(shards) < 1:
        raise RalmError("a store set needs at least one store")
    if (out / FILE).exists() and not force:
        raise RalmError(f"{out / FILE}: exists; pass --force to replace it")
    stores = [Datastore.open(p) for p in shards]
    _check_agree([str(s.root) for s in stores], [s.manifest for s in stores], [s.metric for s in stores])
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in stores:
        root = Path(s.root).resolve()
        try:
            rel = Path(os.path.relpath(root, out.resolve()))
        except ValueError:  # another drive: keep it absolute
            rel = root
        entries.append({"path": str(rel), "manifest_sha256": store_sha256(s), "chunks": len(s)})
    write_json(out / FILE, {"format": FORMAT, "version": VERSION, "dedup": dedup, "shards": entries})
    return out / FILE


def read_store_set(path: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """The set's record and its shards' folders; a malformed file is one ``StoreError`` naming it."""
    f = Path(path) / FILE
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        if rec.get("format") != FORMAT or rec.get("version") != VERSION:
            raise ValueError(f"format {rec.get('format')!r} version {rec.get('version')!r}, not {FORMAT!r} {VERSION}")
        shards = rec["shards"]
        if not isinstance(shards, list) or not shards:
            raise ValueError("'shards' must be a non-empty list")
        paths = [(Path(path) / s["path"]).resolve() for s in shards]  # an absolute path stays itself
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise StoreError(f"{f}: not a readable store set ({e})") from None
    return rec, paths


def _check_agree(names: list[str], manifests: list[dict], metrics: list[str]) -> None:
    m0 = manifests[0]
    for name, m, metric in zip(names[1:], manifests[1:], metrics[1:], strict=True):
        if metric != metrics[0]:
            raise IncompatibleError(f"{name}: scores by {metric!r}, but {names[0]} by {metrics[0]!r}; "
                                    "a store set merges scores of one kind")
        for a, b in _SAME:
            if m[a].get(b) != m0[a].get(b):
                raise IncompatibleError(f"{name}: {a}.{b} is {m[a].get(b)!r}, but {names[0]} has "
                                        f"{m0[a].get(b)!r}; the shards of a set must be built alike")


class StoreSet:
    """Several shards searched as one store (see the module docstring)."""

    encode = Datastore.encode  # the shards' shared encoder, loaded here once
    check_compatible = Datastore.check_compatible
    hits = Datastore.hits
    search = Datastore.search  # search_rows with each row's record
    _validate_queries = Datastore._validate_queries

    def __init__(self, root: str | Path, shards: list[Any], dedup: bool = True, set_sha256: str | None = None) -> None:
        if not shards:
            raise RalmError("a store set needs at least one shard")
        self.root, self.shards, self.dedup = Path(root), list(shards), dedup
        _check_agree([str(s.root) for s in self.shards], [s.manifest for s in self.shards],
                     [s.metric for s in self.shards])
        # a shard's rows are its chunks' (a --dedup store indexes only some, under their row numbers): the set's
        # rows are offset by the shards' chunk counts, its length (what a search can return) sums the indexed ones
        self.sizes = np.array([int(s.manifest["counts"]["chunks"]) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.indexed = int(sum(len(s) for s in self.shards))
        self.manifest = _set_manifest([s.manifest for s in self.shards], self.indexed,
                                      [str(s.root) for s in self.shards])
        self.manifest_sha256 = set_sha256 or hashlib.sha256(
            "".join(store_sha256(s) for s in self.shards).encode()).hexdigest()
        self._encoder: Any = None
        self.allowed: np.ndarray | None = None
        self._searched: dict[int, Any] = dict(enumerate(self.shards))  # shard number -> what a search asks

    @classmethod
    def open(cls, path: str | Path, ray_address: str | None = None, replicas: int = 1,
             timeout_s: float = 60.0) -> StoreSet:
        """The set at ``path``: its shards opened here, or (``ray_address``) held by Ray actors on that cluster
        (``replicas`` actors per shard). Each shard's manifest must still be the one the set recorded."""
        rec, paths = read_store_set(path)
        for entry, p in zip(rec["shards"], paths, strict=True):
            if not (p / "manifest.json").is_file():
                raise StoreError(f"{Path(path) / FILE}: shard {entry['path']} has no store at {p}")
            if sha256_file(p / "manifest.json") != entry.get("manifest_sha256"):
                raise StoreError(f"{Path(path) / FILE}: shard {p} changed since the set was made (its manifest "
                                 f"sha256 differs); rerun `ralm storeset {path} ...` over the current stores")
        if ray_address is None:
            shards: list[Any] = [Datastore.open(p) for p in paths]
        else:
            from ralm.datastore.ray_shards import ray_shards  # ray: only for a set on a cluster

            shards = ray_shards(paths, ray_address, replicas=replicas, timeout_s=timeout_s)
        sha = sha256_file(Path(path) / FILE)
        return cls(path, shards, dedup=bool(rec.get("dedup", True)), set_sha256=sha)

    # ---- what the methods read of a store ----------------------------------------------------
    encoder_name = Datastore.encoder_name  # read from the set's manifest, as a store's from its own
    sparse = Datastore.sparse

    @property
    def metric(self) -> str:
        return self.shards[0].metric

    def __len__(self) -> int:
        return self.indexed if self.allowed is None else len(self.allowed)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.root), "chunks": len(self), "shards": len(self.shards), "dedup": self.dedup,
                "encoder": self.encoder_name, "shard_paths": [str(s.root) for s in self.shards],
                "shard_chunks": self.sizes.tolist()}

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        return shard, rows - self.offsets[shard]

    def restrict(self, rows: np.ndarray) -> StoreSet:
        """A view searching only the set's global ``rows``: each shard restricted to its part of them."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0:
            raise RalmError("restrict: empty subset of rows")
        if rows[0] < 0 or rows[-1] >= self.offsets[-1]:
            raise RalmError(f"restrict: rows outside 0..{int(self.offsets[-1]) - 1}")
        view = StoreSet.__new__(StoreSet)
        view.__dict__.update(self.__dict__)
        view.allowed = rows
        shard, local = self._locate(rows)
        view._searched = {int(s): self.shards[s].restrict(local[shard == s]) for s in np.unique(shard)}
        return view

    # ---- search ------------------------------------------------------------------------------
    def search_rows(self, queries: list[str] | np.ndarray, k: int = 10,
                    exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) over all shards, global rows, best first (the contract of ``Datastore.search_rows``)."""
        nq = self._validate_queries(queries)
        k = check_k(k)
        if k > len(self):
            raise RalmError(f"k={k}: larger than the store set ({len(self)} chunks)")
        excl = per_query_exclusions(exclude_doc_ids, nq)
        if not self.sparse and not isinstance(queries, np.ndarray):
            queries = self.encode(queries)  # once for every shard
        fetch = k if not self.dedup else min(2 * k, len(self))
        while True:
            Ds, Is, full = [], [], False
            for s, shard in self._searched.items():
                f = min(fetch, len(shard))
                D, I = shard.search_rows(queries, f, excl if any(excl) else None)  # noqa: E741
                full |= f < len(shard) and bool((I[:, -1] >= 0).any())  # it may hold more rows than it gave
                Ds.append(D)
                Is.append(np.where(I >= 0, I + self.offsets[s], -1))
            D, I = _merge(np.concatenate(Ds, 1), np.concatenate(Is, 1), self.metric)  # noqa: E741
            if self.dedup:
                D, I, short = self._dedup(D, I, k)  # noqa: E741
            else:
                short = False
            if not short or not full:
                return D[:, :k], I[:, :k]
            fetch = min(len(self), fetch * 4)

    def _dedup(self, D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:  # noqa: E741
        """Each query's rows with a text seen at a better rank dropped; whether a query is left with < k."""
        texts = self._texts(I)
        outD = np.full((len(I), k), worst(self.metric), dtype=np.float32)
        outI = np.full((len(I), k), -1, dtype=np.int64)
        short = False
        for q in range(len(I)):
            seen: set[str] = set()
            n = 0
            for j in range(I.shape[1]):
                if I[q, j] < 0 or texts[q, j] in seen:
                    continue
                seen.add(texts[q, j])
                outD[q, n], outI[q, n] = D[q, j], I[q, j]
                n += 1
                if n == k:
                    break
            short |= n < k
        return outD, outI, short

    def _texts(self, I: np.ndarray) -> np.ndarray:  # noqa: E741
        flat = I.reshape(-1)
        rows = np.unique(flat[flat >= 0])
        text = dict(zip(rows.tolist(), (r["text"] for r in self.chunks(rows.tolist())), strict=True))
        return np.array([text.get(int(r), "") for r in flat], dtype=object).reshape(I.shape)

    # ---- chunk records -----------------------------------------------------------------------
    def chunks(self, rows: list[int]) -> list[dict[str, Any]]:
        """The records of global ``rows``, one batched call per shard."""
        arr = np.asarray(rows, dtype=np.int64)
        if len(arr) and (arr.min() < 0 or arr.max() >= self.offsets[-1]):
            raise RalmError(f"rows outside 0..{int(self.offsets[-1]) - 1}")
        shard, local = self._locate(arr)
        out: list[dict[str, Any] | None] = [None] * len(arr)
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            for i, rec in zip(at, self.shards[s].chunks(local[at].tolist()), strict=True):
                out[i] = rec
        return out  # type: ignore[return-value]

    def chunk(self, row: int) -> dict[str, Any]:
        return self.chunks([int(row)])[0]

    def _doc_ids(self, rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(-1)
        out = np.full(len(flat), "", dtype=object)
        real = flat >= 0
        out[real] = [rec["doc_id"] for rec in self.chunks(flat[real].tolist())]
        return out.reshape(rows.shape)


def _merge(D: np.ndarray, I: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:  # noqa: E741
    """Each query's candidates from all shards, best first (stable: ties keep shard order), -1 rows last."""
    key = np.where(I >= 0, D if metric == "l2" else -D, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)


def _set_manifest(manifests: list[dict], total: int, names: list[str]) -> dict[str, Any]:
    """The first shard's manifest with the set's counts: what the methods read (encoder, tokenizer, chunking,
    counts, index.meta.ntotal); per-part fields are the shards' own business."""
    m = copy.deepcopy(manifests[0])
    m.pop("parts", None)
    for key in ("documents", "chunks", "tokens"):
        m["counts"][key] = sum(int(x["counts"][key]) for x in manifests)
    m["index"] = {"meta": {**m["index"]["meta"], "ntotal": total, "factory": "store set"}}
    domains: dict[str, int] = {}
    for x in manifests:
        for d, c in x.get("domains", {}).items():
            domains[d] = domains.get(d, 0) + int(c)
    m["domains"] = domains
    m["storeset"] = {"shards": names}
    return m
