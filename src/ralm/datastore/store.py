"""Open a finished datastore and search it: ``Datastore.open(path).search(queries, k)`` (hits with their chunk
records) or ``.search_rows(queries, k)`` ((D, I) rows, what ``ralm.core.retriever.StoreRetriever`` reads)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ralm.core.retriever import Exclusions, check_k, per_query_exclusions, search_excluding
from ralm.datastore import layout
from ralm.datastore.bm25 import load_bm25
from ralm.datastore.encoders import EncoderConfig, load_encoder
from ralm.datastore.keys import KeyParts
from ralm.datastore.manifest import CHECKSUM, check_checksum, check_paths, check_tree, inside
from ralm.errors import IncompatibleError, RalmError, StoreError
from ralm.utils.atomic import sha256_file


@dataclass
class Hit:
    rank: int
    score: float
    chunk_id: int
    doc_id: str
    domain: str
    text: str
    continuation: str  # text of the next chunk of the same document ("" for the last chunk or passages)
    row: int  # global row (FAISS id)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("row")
        return d


FORMATS = {layout.FORMAT: ("datastore", "ralm build", "in-context or replug"),
           "ralm-knnlm": ("kNN-LM store", "ralm knnlm build", "knn-lm")}
PathCheck = Callable[[Path, dict, Path], None]


def _check_datastore_paths(root: Path, manifest: dict, manifest_path: Path) -> None:
    check_paths(root, manifest, manifest_path,
                {"chunks_file": lambda n: layout.chunks_path(Path(), n), "keys_file": lambda n: layout.keys_path(Path(), n)},
                required=("chunks_file",) + (("keys_file",) if _dense(manifest) else ()))


def _dense(manifest: dict) -> bool:
    encoder = manifest.get("encoder")
    return not (isinstance(encoder, dict) and encoder.get("kind") == "sparse")


def read_manifest(root: Path, fmt: str = layout.FORMAT, version: int = layout.VERSION,
                  paths: PathCheck | None = None) -> dict:
    """The manifest of a finished store of format ``fmt``; one-line errors for every other state.

    Every path it names is checked to stay inside ``root`` (``paths``: the check for ``fmt``) and its
    checksum, where it has one, to match, before any file it names is opened or stat'ed.
    """
    what, command, _ = FORMATS[fmt]
    path = root / layout.MANIFEST
    if not root.exists():
        raise StoreError(f"{root}: no such {what} directory")
    if not path.exists():
        if (root / layout.BUILD_DIR).exists():
            raise StoreError(f"{root}: unfinished {what} (build interrupted); rerun the same `{command}` "
                             "command to finish it")
        raise StoreError(f"{root}: not a ralm {what} (no {layout.MANIFEST})")
    inside(root, layout.MANIFEST, path, "the manifest itself")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{path}: corrupt manifest (not a JSON object)")
    if manifest.get("format") != fmt:
        other = FORMATS.get(manifest.get("format"))
        hint = f" (it is a {other[0]}: use it with {other[2]})" if other else ""
        raise StoreError(f"{path}: not a ralm {what} manifest{hint}; build one with `{command}`")
    if manifest.get("version") != version:
        raise StoreError(f"{path}: format version {manifest.get('version')} is not supported (expected {version})")
    if paths is None and fmt != layout.FORMAT:
        raise ValueError(f"read_manifest: no path check given for format {fmt!r}")
    (paths or _check_datastore_paths)(root, manifest, path)
    check_checksum(path, manifest, command)
    return manifest


def warn_unsealed(root: Path, manifest: dict, log: Callable[[str], None] | None = None) -> None:
    """What ``--verify`` says of a manifest written before checksums: its own content went unchecked."""
    if CHECKSUM not in manifest:
        (log or (lambda m: print(m, file=sys.stderr)))(
            f"warning: {root / layout.MANIFEST}: has no checksum (written before ralm stored one), so --verify "
            "checked every file it names but not the manifest's own content; rebuild the store to add one")


def unreadable(path: Path, e: BaseException, hint: str) -> StoreError:
    """A part or index that passed the size check but cannot be read: one line, not a library traceback."""
    detail = (str(e).strip().splitlines() or [""])[0][:160]
    return StoreError(f"{path}: corrupt, cannot be read ({type(e).__name__}: {detail}); {hint}")


def _store_files(root: Path, manifest: dict) -> list[tuple[Path, dict]]:
    files = []
    for p in manifest["parts"]:
        files.append((layout.chunks_path(root, p["part"]), p["chunks_file"]))
        if "keys_file" in p:
            files.append((layout.keys_path(root, p["part"]), p["keys_file"]))
    files.extend((root / f["path"], f) for f in manifest["index"]["files"])
    return files


def verify_files(root: Path, manifest: dict, checksums: bool) -> None:
    """Every file the manifest names exists with its size (and, with ``checksums``, its sha256)."""
    check_files(_store_files(root, manifest), checksums, "the datastore")


def check_files(files: list[tuple[Path, dict]], checksums: bool, where: str) -> None:
    """Each ``(path, {"bytes", "sha256"})`` exists with that size (and, with ``checksums``, that sha256)."""
    for path, rec in files:
        if not path.exists():
            raise StoreError(f"{path}: missing from {where}")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise StoreError(f"{path}: truncated or altered ({size} bytes, manifest says {rec['bytes']})")
        if checksums and sha256_file(path) != rec["sha256"]:
            raise StoreError(f"{path}: checksum mismatch (file is corrupt)")


class RestrictedViews:
    """``store.restrict(rows)`` views of one store, the ``size`` last used kept: a service or a shard actor is
    asked for the same subset (``--subset``) request after request, and a view is cheap to keep, not to make."""

    def __init__(self, store: Any, size: int = 8) -> None:
        self.store, self.size = store, size
        self._views: OrderedDict[bytes, Any] = OrderedDict()

    def get(self, rows: np.ndarray) -> tuple[Any, bytes]:
        """The view searching ``rows`` and its key (the rows' digest: requests with equal keys search alike)."""
        key = hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).digest()
        if key not in self._views:
            self._views[key] = self.store.restrict(rows)
            while len(self._views) > self.size:
                self._views.popitem(last=False)
        self._views.move_to_end(key)
        return self._views[key], key


def store_sha256(store: Any) -> str:
    """The sha256 that names one build of a store (RETRO neighbour caches, the service's /info): its manifest
    file's, or what the store carries itself (a store set, a served or Ray-held store)."""
    own = getattr(store, "manifest_sha256", None)
    return own if isinstance(own, str) else sha256_file(Path(store.root) / layout.MANIFEST)


class Datastore:
    """A finished datastore, opened read-only. Keys are memory-mapped; chunk parts load on demand."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.parts = [p["part"] for p in manifest["parts"]]
        sizes = [p["chunks"] for p in manifest["parts"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._index: Any = None
        self._encoder: Any = None
        self.allowed: np.ndarray | None = None  # a subset of rows to search (``restrict``), or all

    @classmethod
    def open(cls, path: str | Path, verify: bool = False, log: Callable[[str], None] | None = None) -> Datastore:
        """Open a finished store; refuse unfinished, truncated, edited or (with ``verify``) corrupt ones.

        With ``verify``, a manifest written before manifests carried a checksum is reported to ``log``
        (stderr by default): its files are checked, its own content cannot be.
        """
        root = Path(path)
        manifest = read_manifest(root)
        verify_files(root, manifest, checksums=verify)
        if verify:
            warn_unsealed(root, manifest, log)
        return cls(root, manifest)

    @property
    def _corrupt_hint(self) -> str:
        return f"run `ralm info {self.root} --verify` to check the whole store, or rebuild it"

    # ---- what the store was built with -------------------------------------------------------
    @property
    def encoder_name(self) -> str:
        return self.manifest["encoder"]["name"]

    @property
    def sparse(self) -> bool:
        return self.manifest["encoder"]["kind"] == "sparse"

    def __len__(self) -> int:
        return int(self.manifest["index"]["meta"]["ntotal"]) if self.allowed is None else len(self.allowed)

    def restrict(self, rows: np.ndarray) -> Datastore:
        """A view that searches only the given global rows (e.g. a random subset, for store-size scaling).

        The view shares the loaded index and encoder; FAISS applies the subset inside the search, so
        results are what an index over those rows alone would return (exactly so for exact search).
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0:
            raise RalmError("restrict: empty subset of rows")
        self._get_index()
        view = Datastore.__new__(Datastore)
        view.__dict__.update(self.__dict__)
        view.allowed = rows
        return view

    def check_compatible(self, encoder: str | None = None, tokenizer_fingerprint: str | None = None,
                         tokenizer_name: str | None = None) -> None:
        """Raise ``IncompatibleError`` naming both sides when a use needs another encoder or tokenizer."""
        if encoder is not None and encoder != self.encoder_name:
            raise IncompatibleError(f"{self.root}: built with encoder {self.encoder_name!r}, "
                                    f"but {encoder!r} was asked for; rebuild the store or use its encoder")
        tok = self.manifest["tokenizer"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != tok["fingerprint"]:
            raise IncompatibleError(f"{self.root}: chunked with tokenizer {tok['name']!r} ({tok['fingerprint']}), "
                                    f"not {tokenizer_name or 'the requested one'!r} ({tokenizer_fingerprint})")

    # ---- search ------------------------------------------------------------------------------
    def _get_index(self):
        if self._index is None:
            meta = self.manifest["index"]["meta"]
            path = self.root / self.manifest["index"]["path"]
            if self.sparse:
                # bm25s opens the files of its folder by name: none of them may lead out of the store
                check_tree(self.root, path, self.root / layout.MANIFEST, "index.path")
                load = lambda: load_bm25(path)  # noqa: E731
            else:
                from ralm.datastore.index import load_index  # faiss: loaded when a store is first searched

                load = lambda: load_index(path, meta, self._keys())  # noqa: E731
            try:
                self._index = load()
            except (RuntimeError, ValueError, OSError, EOFError) as e:  # FAISS, numpy, bm25s on a damaged file
                raise unreadable(path, e, self._corrupt_hint) from None
        return self._index

    def _keys(self) -> KeyParts:
        paths = [layout.keys_path(self.root, p) for p in self.parts]
        try:
            return KeyParts(paths)
        except (ValueError, OSError, EOFError):
            for p in paths:  # name the damaged part
                try:
                    np.load(p, mmap_mode="r")
                except (ValueError, OSError, EOFError) as e:
                    raise unreadable(p, e, self._corrupt_hint) from None
            raise

    def encode(self, texts: list[str]) -> np.ndarray:
        """Queries encoded with the store's own encoder (same model, pooling and dtype)."""
        if self.sparse:
            raise IncompatibleError(f"{self.root}: a BM25 store has no vectors; search it with texts")
        if self._encoder is None:
            e = self.manifest["encoder"]
            try:
                enc = load_encoder(EncoderConfig(e["name"], e["pooling"], e["dtype"], max_length=e["max_length"]))
            except (RalmError, KeyError, TypeError) as err:
                # the user passed no --encoder: say what the store records and why it cannot be used
                detail = str(err).partition(": ")[2] if isinstance(err, RalmError) else f"missing or bad {err}"
                if "(" in detail and detail.endswith(")"):  # the loader's reason, without its --encoder wording
                    detail = detail[detail.index("(") + 1:-1]
                raise StoreError(f"{self.root / layout.MANIFEST}: records encoder {e.get('name')!r} "
                                 f"(pooling {e.get('pooling')!r}, dtype {e.get('dtype')!r}), which cannot be loaded: "
                                 f"{detail}; restore the manifest or rebuild the store") from None
            if enc.fingerprint != e["fingerprint"]:
                raise IncompatibleError(f"{self.root}: encoder {e['name']!r} now loads different weights "
                                        f"({enc.fingerprint}) than the store was built with ({e['fingerprint']})")
            self._encoder = enc
        return self._encoder.encode(list(texts))

    def _raw_search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self._get_index()
        if self.sparse:
            return index.search(queries, k, allowed=self.allowed)
        xq = queries if isinstance(queries, np.ndarray) else self.encode(queries)
        return index.search(xq, k, allowed=self.allowed)

    @property
    def metric(self) -> str:
        """How ``search_rows`` scores: "l2" (squared distance, smaller first) or "ip" (inner product or BM25)."""
        return "l2" if self.manifest["index"]["meta"].get("metric") == "l2" else "ip"

    def search_rows(self, queries: list[str] | np.ndarray, k: int = 10,
                    exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        """(D, I) of shape (nq, k): the scores and global rows of each query's top-k chunks, best first, -1
        (and the worst score) where fewer are left (``ralm.core.retriever``'s contract). ``queries``: texts, or
        an (nq, dim) array of vectors from the store's encoder.

        ``exclude_doc_ids`` (one set per query, or one set for all) drops rows of those documents (RETRO's
        same-document rule); the search over-fetches so each query still gets k rows where the store has them.
        """
        nq = self._validate_queries(queries)
        n = len(self)
        k = check_k(k)
        if k > n:
            raise RalmError(f"k={k}: larger than the store ({n} chunks)")
        excl = per_query_exclusions(exclude_doc_ids, nq)
        if not self.sparse and not isinstance(queries, np.ndarray):
            queries = self.encode(queries)  # once, not again at each deeper fetch

        def dropped(I: np.ndarray) -> np.ndarray:  # noqa: E741
            docs = self._doc_ids(I)
            if all(e == excl[0] for e in excl):  # one set for every query (the methods' case): one test
                return np.isin(docs, sorted(excl[0]))
            return np.stack([np.isin(docs[q], sorted(excl[q])) if excl[q] else np.zeros(I.shape[1], bool)
                             for q in range(nq)])

        return search_excluding(lambda fetch: self._raw_search(queries, fetch), dropped, k, n, any(excl), self.metric)

    def search(self, queries: list[str] | np.ndarray, k: int = 10,
               exclude_doc_ids: Exclusions = None) -> list[list[Hit]]:
        """Top-k hits per query: ``search_rows`` with each row's chunk record (same arguments)."""
        return self.hits(*self.search_rows(queries, k, exclude_doc_ids))

    def hits(self, D: np.ndarray, I: np.ndarray) -> list[list[Hit]]:  # noqa: E741
        """The chunk records of a (D, I) search result (any ``Retriever``'s over this store), -1 rows left out."""
        out = []
        for scores, rows in zip(D, I, strict=True):
            hits: list[Hit] = []
            for score, row in zip(scores, rows, strict=True):
                if row < 0:
                    continue
                rec = self.chunk(int(row))
                hits.append(Hit(len(hits) + 1, float(score), rec["chunk_id"], rec["doc_id"], rec["domain"],
                                rec["text"], rec["continuation_text"], int(row)))
            out.append(hits)
        return out

    def _validate_queries(self, queries) -> int:
        if isinstance(queries, np.ndarray):
            if self.sparse:
                raise IncompatibleError(f"{self.root}: a BM25 store is searched with texts, not vectors")
            dim = self.manifest["encoder"]["dim"]
            if queries.ndim != 2 or queries.shape[1] != dim:
                raise IncompatibleError(f"query vectors of shape {queries.shape}: the store's encoder "
                                        f"{self.encoder_name!r} has dim {dim}")
            return len(queries)
        if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
            raise RalmError("queries must be a list of strings or an (nq, dim) array")
        if not queries:
            raise RalmError("no queries given")
        return len(queries)

    def _doc_ids(self, rows: np.ndarray) -> np.ndarray:
        """The document id of every row of ``rows`` (any shape; -1 rows get ""), one numpy lookup per part."""
        flat = rows.reshape(-1)
        out = np.full(len(flat), "", dtype=object)
        parts = np.searchsorted(self.offsets, flat, side="right") - 1
        for p in np.unique(parts[flat >= 0]):
            at = (parts == p) & (flat >= 0)
            out[at] = self._part_doc_ids(int(p))[flat[at] - self.offsets[p]]
        return out.reshape(rows.shape)

    @lru_cache(maxsize=64)  # noqa: B019 (as _part_table)
    def _part_doc_ids(self, p: int) -> np.ndarray:
        return np.asarray(self._part_table(p)["doc_id"], dtype=object)

    # ---- chunk records -----------------------------------------------------------------------
    def chunk(self, row: int) -> dict[str, Any]:
        """The stored record of global row ``row`` plus ``continuation_text`` (next chunk of its document)."""
        p = int(np.searchsorted(self.offsets, row, side="right") - 1)
        table = self._part_table(p)
        local = row - int(self.offsets[p])
        rec = {c: table[c][local] for c in table}
        nxt = local + 1
        same_doc = nxt < len(table["doc_id"]) and table["doc_id"][nxt] == rec["doc_id"]
        rec["continuation_text"] = table["text"][nxt] if same_doc and rec["continuation"] else ""
        return rec

    def chunks(self, rows: list[int]) -> list[dict[str, Any]]:
        """The records of ``rows`` (``chunk`` of each): what a store set asks its shards for in one call."""
        return [self.chunk(int(r)) for r in rows]

    @lru_cache(maxsize=64)  # noqa: B019 (one store object lives as long as its cache should)
    def _part_table(self, p: int) -> dict[str, list]:
        import pyarrow as pa  # ~0.6 s: only when chunk texts are read, not at every CLI start
        import pyarrow.parquet as pq

        from ralm.datastore.shard import CHUNK_SCHEMA  # imports pyarrow too

        def kind(t: pa.DataType) -> str:  # a list's item field may be renamed by Parquet: compare item types
            return f"list<{t.value_type}>" if pa.types.is_list(t) else str(t)

        path = layout.chunks_path(self.root, self.parts[p])
        try:  # parts written with page checksums have them checked (a no-op on older parts)
            table = pq.read_table(path, page_checksum_verification=True)
            for want in CHUNK_SCHEMA:  # a damaged footer can turn strings into bytes
                t = table.schema.field(want.name).type
                if kind(t) != kind(want.type):
                    raise ValueError(f"column {want.name} is {t}, not {kind(want.type)}")
            return table.to_pydict()
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise unreadable(path, e, self._corrupt_hint) from None

    def info(self) -> dict[str, Any]:
        m = self.manifest
        meta = m["index"]["meta"]
        return {
            "path": str(self.root), "documents": m["counts"]["documents"], "chunks": m["counts"]["chunks"],
            "indexed_chunks": meta["ntotal"], "tokens": m["counts"]["tokens"], "domains": m["domains"],
            "parts": len(m["parts"]), "tokenizer": m["tokenizer"]["name"], "chunk_tokens": m["chunking"]["chunk_tokens"],
            "continuation": m["chunking"]["continuation"], "encoder": m["encoder"]["name"],
            "encoder_dim": m["encoder"].get("dim"), "index": meta.get("factory"), "index_params": meta.get("params"),
            "recall_at_10": meta.get("recall_at_10"), "bytes": sum(r["bytes"] for _, r in _store_files(self.root, m)),
            "manifest_checksum": m.get(CHECKSUM, "none (written before manifests carried one)"),
        }
