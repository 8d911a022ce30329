"""kNN-LM datastore: the LM's final hidden state at every position of a corpus (key) and the next token (value).

```
DS/manifest.json            format "ralm-knnlm", model/tokenizer fingerprints, windows, counts, parts, index
DS/keys/part-NNNNN.npy      (n, d) fp16 hidden states, memory-mapped on read
DS/values/part-NNNNN.npy    (n,) int32 next-token ids
DS/docs/part-NNNNN.npy      (n,) int32 document ordinals (same-document exclusion, leakage windows)
DS/documents.json           document ids, by ordinal
DS/index/knn.faiss          squared-L2 FAISS index over global rows, metadata JSON beside it
```

This module reads a finished store (``KNNStore``); building one needs a model and lives with the method
(``ralm.methods.knnlm_store``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ralm.datastore.index import load_index
from ralm.datastore.keys import KeyParts
from ralm.datastore.manifest import check_paths
from ralm.datastore.store import check_files, read_manifest, unreadable, warn_unsealed
from ralm.errors import IncompatibleError, StoreError

FORMAT, VERSION = "ralm-knnlm", 1


def _paths(root: Path, part: int) -> dict[str, Path]:
    name = f"part-{part:05d}.npy"
    return {"keys": root / "keys" / name, "values": root / "values" / name, "docs": root / "docs" / name}


def _check_knn_paths(root: Path, manifest: dict, manifest_path: Path) -> None:
    check_paths(root, manifest, manifest_path, {kind: (lambda n, k=kind: _paths(Path(), n)[k])
                                                for kind in ("keys", "values", "docs")},
                required=("keys", "values", "docs"), fixed=("documents.json",))


def read_knn_manifest(root: Path) -> dict:
    """The manifest of a finished kNN-LM store, every path in it checked to stay inside the store."""
    return read_manifest(root, FORMAT, VERSION, paths=_check_knn_paths)


_CORRUPT_HINT = "the kNN-LM store is damaged: rebuild it with `ralm knnlm build ... --force`"


class KNNStore:
    """An opened kNN-LM store: search hidden states, read values and document ordinals of rows."""

    def __init__(self, root: Path, manifest: dict, allowed: np.ndarray | None = None):
        self.root, self.manifest, self.allowed = root, manifest, allowed
        parts = [_paths(root, r["part"]) for r in manifest["parts"]]
        for p in parts:  # a damaged header is named here, not raised from inside KeyParts
            _readable(p["keys"], np.load, mmap_mode="r")
        self.keys = KeyParts([p["keys"] for p in parts])
        self.values = np.concatenate([_readable(p["values"], np.load) for p in parts])  # (n,) int32, 4 bytes a key
        self.docs = np.concatenate([_readable(p["docs"], np.load) for p in parts])  # (n,) int32
        self.doc_ids: list[str] = _readable(root / "documents.json", lambda p: json.loads(p.read_text()))
        vocab = int(manifest.get("vocab_size", 2**31 - 1))
        for name, arr, hi in (("values", self.values, vocab), ("docs", self.docs, len(self.doc_ids))):
            if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= hi):  # damaged bytes inside a part
                raise StoreError(f"{root}: {name} parts hold ids outside [0, {hi}); {_CORRUPT_HINT}")
        self._ordinal = {d: i for i, d in enumerate(self.doc_ids)}
        self._index: Any = None

    @classmethod
    def open(cls, path: str | Path, verify: bool = False, log: Callable[[str], None] | None = None) -> KNNStore:
        """Open a finished store; refuse unfinished, truncated, edited or (with ``verify``) corrupt ones.

        With ``verify``, a manifest without a checksum (written before they existed) is reported to ``log``.
        """
        root = Path(path)
        manifest = read_knn_manifest(root)
        files = [(root / f["path"], f) for f in manifest["index"]["files"]]
        for r in manifest["parts"]:
            files += [(p, r[kind]) for kind, p in _paths(root, r["part"]).items()]
        check_files(files, verify, "the kNN-LM store")
        if verify:
            warn_unsealed(root, manifest, log)
        return cls(root, manifest)

    def __len__(self) -> int:
        return len(self.values) if self.allowed is None else len(self.allowed)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def restrict(self, rows: np.ndarray) -> KNNStore:
        """A view that searches only ``rows`` (e.g. a random subset, for store-size scaling)."""
        view = KNNStore.__new__(KNNStore)
        view.__dict__.update(self.__dict__)
        view.allowed = np.unique(np.asarray(rows, dtype=np.int64))
        return view

    def check_compatible(self, model_fps: tuple[str, ...], tokenizer_fp: str, model_name: str, dim: int) -> None:
        """Refuse a model whose tokens or hidden states are not the ones stored (``model_fps``: the model's
        current and legacy fingerprints, ``lm.hidden.model_fingerprints``)."""
        m = self.manifest
        if tokenizer_fp != m["tokenizer"]["fingerprint"]:
            raise IncompatibleError(f"{self.root}: built with the tokenizer of {m['model']['name']!r} "
                                    f"({m['tokenizer']['fingerprint']}); {model_name!r} tokenizes differently "
                                    f"({tokenizer_fp}), so stored next-token values mean other tokens")
        if dim != self.dim:
            raise IncompatibleError(f"{self.root}: keys have dim {self.dim}, {model_name!r} has hidden size {dim}")
        if m["model"]["fingerprint"] not in model_fps:
            raise IncompatibleError(f"{self.root}: keys are hidden states of {m['model']['name']!r} "
                                    f"({m['model']['fingerprint']}), not of {model_name!r} ({model_fps[0]}); "
                                    "rebuild the store with this model")

    def ordinal(self, doc_id: str) -> int:
        """The stored ordinal of a document id, or -1 when it is not in the store."""
        return self._ordinal.get(doc_id, -1)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and rows (nq, k) of the nearest stored states; -1 rows past the store's end."""
        if self._index is None:
            meta = self.manifest["index"]["meta"]
            self._index = _readable(self.root / self.manifest["index"]["path"], load_index, meta, self.keys)
        return self._index.search(xq, k, allowed=self.allowed)

    def windows(self, rows: np.ndarray, length: int) -> list[list[int]]:
        """The stored tokens ending at each row's value: up to ``length`` tokens of the same document."""
        out = []
        for r in np.asarray(rows).reshape(-1):
            if r < 0:
                out.append([])
                continue
            lo = max(0, int(r) - length + 1)
            span = self.docs[lo:r + 1] == self.docs[r]
            lo += int(np.argmax(span))  # first row of the same document inside the window
            out.append(self.values[lo:r + 1].tolist())
        return out


def _readable(path: Path, load: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``load(path, ...)``, with a damaged file (right size, wrong bytes) refused in one line naming it."""
    try:
        return load(path, *args, **kw)
    except (RuntimeError, ValueError, OSError, EOFError, UnicodeDecodeError) as e:  # numpy, json, FAISS
        raise unreadable(path, e, _CORRUPT_HINT) from None
