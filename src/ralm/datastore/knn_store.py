"""kNN-LM datastore: the LM's final hidden state at every position of a corpus (key) and the next token (value).

```
DS/manifest.json            format "ralm-knnlm", model/tokenizer fingerprints, windows, counts, parts, index
DS/keys/part-NNNNN.npy      (n, d) fp16 hidden states, memory-mapped on read
DS/values/part-NNNNN.npy    (n,) int32 next-token ids
DS/docs/part-NNNNN.npy      (n,) int32 document ordinals (same-document exclusion, leakage windows)
DS/documents.json           document ids, by ordinal
DS/index/knn.faiss          squared-L2 FAISS index over global rows, metadata JSON beside it
```

Rows follow the corpus: a document's row j is the state that predicts its target j + 1, computed with the
same windows ``ralm eval-lm`` uses (``context``, ``window_stride``), so a document that is both stored and
evaluated finds itself at distance ~0 (the leakage setting). Building is resumable like ``ralm build``:
finished shards leave done markers, and the manifest is written last.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents, list_input_files
from ralm.datastore.index import IndexConfig, build_index, load_index
from ralm.datastore.keys import KeyParts
from ralm.datastore.layout import BUILD_DIR
from ralm.datastore.manifest import check_paths, seal
from ralm.errors import IncompatibleError, RalmError, StoreError
from ralm.lm.presets import DEFAULT_LM
from ralm.utils.atomic import atomic_path, sha256_file, write_json
from ralm.utils.outdir import Kind, open_out, read_json

FORMAT, VERSION = "ralm-knnlm", 1


def _legacy(root: Path) -> bool:
    """A store built before folders had an owner marker: its manifest, or an unfinished build's state."""
    manifest, state = read_json(root / "manifest.json"), read_json(root / BUILD_DIR / "state.json")
    return (isinstance(manifest, dict) and manifest.get("format") == FORMAT) or \
        (isinstance(state, dict) and "model" in state and "base_part" not in state)


_PART = r"part-\d{5}\.npy"
# every name a build writes: --force and the failed-start cleanup remove these and nothing else
KIND = Kind("knnlm", "ralm kNN-LM store", {
    r"manifest\.json": None, r"documents\.json": None, "keys": {_PART: None}, "values": {_PART: None},
    "docs": {_PART: None}, "index": {r"knn\.(faiss|json)": None},
    r"\.build": {r"state\.json": None, "done": {r"part-\d{5}\.json": None}},
}, _legacy)


@dataclass
class KNNBuildConfig:
    inputs: list[str]
    out: str
    model: str = field(default=DEFAULT_LM, metadata={"help": "the LM whose hidden states are stored"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=lambda: IndexConfig(metric="l2"))
    context: int | None = field(default=None, metadata={"help": "tokens per window (default: as eval-lm)"})
    window_stride: int | None = field(default=None, metadata={"help": "new positions per window (default context/2)"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    shard_tokens: int = field(default=50_000, metadata={"help": "positions per part: the unit of resumption "
                                                                       "and of build memory"})
    force: bool = False

    def __post_init__(self) -> None:
        if self.index.metric != "l2":
            raise RalmError("kNN-LM keys are searched by L2 distance (index metric must be 'l2')")
        if self.context is not None and self.context < 2:
            raise RalmError(f"--context {self.context}: must be >= 2")
        if self.window_stride is not None and self.window_stride < 1:
            raise RalmError(f"--window-stride {self.window_stride}: must be >= 1")
        if self.batch_size < 1:
            raise RalmError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.shard_tokens < 1:
            raise RalmError(f"--shard-tokens {self.shard_tokens}: must be >= 1")

    def output_params(self) -> dict:
        return json.loads(json.dumps({"model": self.model, "corpus": asdict(self.corpus), "index": asdict(self.index),
                                      "context": self.context, "window_stride": self.window_stride,
                                      "shard_tokens": self.shard_tokens}))


def _paths(root: Path, part: int) -> dict[str, Path]:
    name = f"part-{part:05d}.npy"
    return {"keys": root / "keys" / name, "values": root / "values" / name, "docs": root / "docs" / name}


def _save(path: Path, arr: np.ndarray) -> dict:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _shards(docs, shard_tokens: int, tokenizer) -> Any:
    """Documents grouped into parts of about ``shard_tokens`` positions, with their targets."""
    from ralm.eval.lm import make_targets

    shard, n = [], 0
    for d in docs:
        try:
            t = make_targets(d, tokenizer)
        except RalmError:  # nothing to score: nothing to store
            continue
        shard.append((d, t))
        n += t.n_targets
        if n >= shard_tokens:
            yield shard
            shard, n = [], 0
    if shard:
        yield shard


@torch.inference_mode()
def shard_states(model: Any, targets: list, context: int, stride: int, batch_size: int,
                 on_tokens: Callable[[int], None] = lambda n: None) -> list[np.ndarray]:
    """(n_targets, d) fp16 states of every document, computed over ``window_plan`` windows in batches."""
    from ralm.eval.lm import window_plan
    from ralm.lm.hidden import final_states

    d = model.config.get_text_config().hidden_size
    out = [np.zeros((t.n_targets, d), dtype=np.float16) for t in targets]
    jobs = [(i, b, e, f) for i, t in enumerate(targets) for b, e, f in window_plan(len(t.ids), context, stride)]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths share a batch: little padding
    device = next(model.parameters()).device
    for s in range(0, len(jobs), batch_size):
        batch = jobs[s:s + batch_size]
        width = max(e - b for _, b, e, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (i, b, e, _) in enumerate(batch):  # right padding: causal attention never reaches the pads
            ids[r, :e - b] = targets[i].ids[b:e]
            mask[r, :e - b] = 1
        h = final_states(model, ids.to(device), mask.to(device)).float().cpu()  # (B, width, d)
        for r, (i, b, e, f) in enumerate(batch):
            # position p predicts target p + 1; row j of a document holds the state predicting target j + 1
            out[i][f - 1:e - 1] = h[r, f - 1 - b:e - 1 - b].numpy()
            on_tokens(e - f)
    return out


def build_knn_store(cfg: KNNBuildConfig, log: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Build (or resume) the kNN-LM store at ``cfg.out``; return its summary."""
    log = log or (lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    list_input_files(cfg.inputs)
    # writable, locked against a second writer, and ralm's own: checked before the LM is loaded
    with open_out(cfg.out, KIND, force=cfg.force, log=log) as out:
        root = out.root
        params = cfg.output_params()
        state_path = root / BUILD_DIR / "state.json"
        if (root / "manifest.json").exists():
            manifest = read_knn_manifest(root)
            if manifest["build"]["params"] == params and manifest["build"]["inputs"] == list(cfg.inputs):
                log(f"{root}: already complete; nothing to do (use --force to rebuild)")
                return {**manifest["summary"], "already_complete": True}
            raise RalmError(f"--out {root}: already a kNN-LM store built from other inputs or parameters; "
                            "use --force")
        out.claim()
        fresh = not state_path.exists()
        try:
            return _build(cfg, root, params, state_path, log, progress, t0)
        except RalmError as e:
            done = root / BUILD_DIR / "done"
            if fresh and not (done.exists() and any(done.iterdir())):  # nothing worth resuming: leave no trace
                out.discard(e)
            raise


def _build(cfg: KNNBuildConfig, root: Path, params: dict, state_path: Path, log: Callable[[str], None],
           progress: bool, t0: float) -> dict:
    from tqdm import tqdm

    from ralm.datastore.build import input_files_fingerprint
    from ralm.eval.lm import model_context
    from ralm.lm.hidden import check_states_match_head, model_fingerprint
    from ralm.lm.models import load
    from ralm.lm.presets import start_token, start_token_change, tokenizer_fingerprint

    lm = load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    context = model_context(model, cfg.context)
    stride = min(cfg.window_stride or max(1, context // 2), context - 1)
    check_states_match_head(model, torch.arange(min(8, context))[None] % model.config.get_text_config().vocab_size)
    files = input_files_fingerprint(cfg.inputs)
    fp = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tok), "start_token": start_token(tok)}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["params"] != params or state["inputs"] != list(cfg.inputs) or state["files"] != files:
            raise RalmError(f"--out {root}: holds an unfinished kNN-LM build of other inputs or parameters; "
                            "use --force to start over")
        log(f"resuming the unfinished kNN-LM build in {root}")
    else:
        state = {"params": params, "inputs": list(cfg.inputs), "files": files, **fp}
        write_json(state_path, state)
    if state["model"] != fp["model"]:
        raise RalmError(f"--model {cfg.model}: loads other weights than the unfinished build started with; use --force")
    if (why := start_token_change(state, tok)) is not None:  # keys after two start tokens would not mix
        raise RalmError(f"--out {root}: the unfinished build was {why}; use --force to start over")

    stats = ReadStats()
    records, doc_ids = [], []
    bar = tqdm(unit="pos", desc="knn-lm keys", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for part, shard in enumerate(_shards(iter_documents(cfg.inputs, cfg.corpus, stats), cfg.shard_tokens, tok)):
            base_doc = len(doc_ids)
            doc_ids += [d.id for d, _ in shard]
            marker = root / BUILD_DIR / "done" / f"part-{part:05d}.json"
            if marker.exists():
                records.append(json.loads(marker.read_text()))
                bar.update(records[-1]["rows"])
                continue
            targets = [t for _, t in shard]
            states = shard_states(model, targets, context, stride, cfg.batch_size, bar.update)
            paths = _paths(root, part)
            rec: dict[str, Any] = {"part": part, "documents": len(shard), "rows": sum(t.n_targets for t in targets)}
            rec["keys"] = _save(paths["keys"], np.concatenate(states))
            rec["values"] = _save(paths["values"], np.concatenate([t.ids[1:].numpy() for t in targets]).astype(np.int32))
            rec["docs"] = _save(paths["docs"], np.concatenate(
                [np.full(t.n_targets, base_doc + j, dtype=np.int32) for j, t in enumerate(targets)]))
            write_json(marker, rec)
            records.append(rec)
    finally:
        bar.close()
    if not records:
        raise RalmError(f"{', '.join(cfg.inputs)}: no document with at least one token to store")
    for w in stats.warnings[:20]:  # repeated document ids first (same-document exclusion goes by id)
        log(f"warning: {w}")

    keys = KeyParts([_paths(root, r["part"])["keys"] for r in records])
    n = len(keys)
    log(f"indexing {n:,} keys of dim {keys.dim}")
    index_path = root / "index" / "knn.faiss"
    meta = build_index(keys, np.arange(n, dtype=np.int64), cfg.index, index_path, log=log)
    with atomic_path(root / "documents.json") as tmp:
        tmp.write_text(json.dumps(doc_ids))
    summary = {"documents": len(doc_ids), "keys": n, "dim": keys.dim, "context": context, "window_stride": stride,
               "index": meta["factory"], "index_params": meta["params"], "recall_at_10": meta["recall_at_10"],
               "skipped": {"blank": stats.blank, "too_large": stats.too_large,
                           "invalid_utf8_skipped": stats.invalid_utf8_skipped},
               "seconds": round(time.perf_counter() - t0, 2)}
    summary["keys_per_second"] = round(n / max(summary["seconds"], 1e-9), 1)
    index_files = [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
                   for p in (index_path, index_path.with_suffix(".json"), root / "documents.json")]
    manifest = {"format": FORMAT, "version": VERSION, "model": {"name": cfg.model, "fingerprint": fp["model"]},
                "tokenizer": {"name": cfg.model, "fingerprint": fp["tokenizer"], "start_token": fp["start_token"]},
                "dim": keys.dim,
                "vocab_size": int(model.config.get_text_config().vocab_size),
                "context": context, "window_stride": stride, "parts": records,
                "index": {"path": "index/knn.faiss", "meta": meta, "files": index_files},
                "build": {"params": params, "inputs": list(cfg.inputs)}, "summary": summary}
    write_json(root / "manifest.json", seal(manifest))  # with the checksum of its content
    shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    return summary


def _check_knn_paths(root: Path, manifest: dict, manifest_path: Path) -> None:
    check_paths(root, manifest, manifest_path, {kind: (lambda n, k=kind: _paths(Path(), n)[k])
                                                for kind in ("keys", "values", "docs")},
                required=("keys", "values", "docs"), fixed=("documents.json",))


def read_knn_manifest(root: Path) -> dict:
    """The manifest of a finished kNN-LM store, every path in it checked to stay inside the store."""
    from ralm.datastore.store import read_manifest

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
        from ralm.datastore.store import check_files, warn_unsealed

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

    def check_compatible(self, model_fp: str, tokenizer_fp: str, model_name: str, dim: int) -> None:
        """Refuse a model whose tokens or hidden states are not the ones stored."""
        m = self.manifest
        if tokenizer_fp != m["tokenizer"]["fingerprint"]:
            raise IncompatibleError(f"{self.root}: built with the tokenizer of {m['model']['name']!r} "
                                    f"({m['tokenizer']['fingerprint']}); {model_name!r} tokenizes differently "
                                    f"({tokenizer_fp}), so stored next-token values mean other tokens")
        if dim != self.dim:
            raise IncompatibleError(f"{self.root}: keys have dim {self.dim}, {model_name!r} has hidden size {dim}")
        if model_fp != m["model"]["fingerprint"]:
            raise IncompatibleError(f"{self.root}: keys are hidden states of {m['model']['name']!r} "
                                    f"({m['model']['fingerprint']}), not of {model_name!r} ({model_fp}); "
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
    from ralm.datastore.store import unreadable

    try:
        return load(path, *args, **kw)
    except (RuntimeError, ValueError, OSError, EOFError, UnicodeDecodeError) as e:  # numpy, json, FAISS
        raise unreadable(path, e, _CORRUPT_HINT) from None
