"""Building a kNN-LM store (``ralm knnlm build``); its layout and reader are ``ralm.datastore.knn_store``.

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
from tqdm import tqdm

from ralm.core.start_token import start_token
from ralm.core.targets import default_stride, make_targets, model_context, window_plan
from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents, list_input_files
from ralm.datastore.build import input_files_fingerprint
from ralm.datastore.index import IndexConfig, build_index
from ralm.datastore.keys import KeyParts
from ralm.datastore.knn_store import FORMAT, VERSION, _paths, read_knn_manifest
from ralm.datastore.layout import BUILD_DIR
from ralm.datastore.manifest import seal
from ralm.errors import RalmError
from ralm.lm.hidden import check_states_match_head, final_states, model_fingerprints
from ralm.lm.models import load
from ralm.lm.presets import DEFAULT_LM, start_token_change, tokenizer_fingerprint
from ralm.utils.atomic import atomic_path, sha256_file, write_json
from ralm.utils.outdir import Kind, open_out, read_json


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
    out: str = field(metadata={"help": "kNN-LM store directory to create", "short": "-o"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "the LM whose hidden states are stored "
                                                              "(preset, folder, GGUF, hub id)"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    index: IndexConfig = field(default_factory=lambda: IndexConfig(target_recall=0.9, metric="l2"))
    context: int | None = field(default=None, metadata={"help": "tokens per window (default: as eval-lm, "
                                                                          "model max capped at 2048)"})
    window_stride: int | None = field(default=None, metadata={"help": "new positions per window (default context/2)"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    shard_tokens: int = field(default=50_000, metadata={"help": "positions per part: the unit of resumption "
                                                                       "and of build memory"})
    force: bool = field(default=False, metadata={"help": "delete an existing or unfinished store and start over"})

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


def _save(path: Path, arr: np.ndarray) -> dict:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _shards(docs, shard_tokens: int, tokenizer) -> Any:
    """Documents grouped into parts of about ``shard_tokens`` positions, with their targets."""
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
    lm = load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    context = model_context(model, cfg.context)
    stride = min(default_stride(context, cfg.window_stride), context - 1)
    check_states_match_head(model, torch.arange(min(8, context))[None] % model.config.get_text_config().vocab_size)
    files = input_files_fingerprint(cfg.inputs)
    model_fps = model_fingerprints(model)  # (current, legacy): an unfinished build may have recorded either
    fp = {"model": model_fps[0], "tokenizer": tokenizer_fingerprint(tok), "start_token": start_token(tok)}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["params"] != params or state["inputs"] != list(cfg.inputs) or state["files"] != files:
            raise RalmError(f"--out {root}: holds an unfinished kNN-LM build of other inputs or parameters; "
                            "use --force to start over")
        log(f"resuming the unfinished kNN-LM build in {root}")
    else:
        state = {"params": params, "inputs": list(cfg.inputs), "files": files, **fp}
        write_json(state_path, state)
    if state["model"] not in model_fps:
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


