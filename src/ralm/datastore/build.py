"""Build a datastore: corpus -> shards -> (chunk, encode, write part) steps -> index -> manifest.

Crash safety: the resolved parameters are recorded in ``.build/state.json`` before any work, every
finished shard leaves a done marker, and the manifest is written last and atomically. A rerun of the
same command skips finished shards; a rerun on a finished store changes nothing; ``--force`` restarts.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents, list_input_files
from ralm.data.document import Document
from ralm.datastore import layout
from ralm.datastore.bm25 import build_bm25
from ralm.datastore.build_shards import build_sharded, holds_sharded_build, select_shard
from ralm.datastore.chunking import ChunkingConfig
from ralm.datastore.dedup import exact_duplicate_mask, near_duplicate_ordinals
from ralm.datastore.encoders import EncoderConfig, load_encoder
from ralm.datastore.executors import make_executor
from ralm.datastore.index import IndexConfig, build_index, check_factory
from ralm.datastore.keys import KeyParts
from ralm.datastore.manifest import seal
from ralm.datastore.shard import ShardTask, process_shard
from ralm.datastore.store import read_manifest
from ralm.errors import RalmError, refuse_below
from ralm.lm.presets import DEFAULT_LM, load_tokenizer, tokenizer_fingerprint
from ralm.utils.atomic import sha256_file, write_json
from ralm.utils.outdir import OutDir, open_out, remove_owned


@dataclass
class BuildConfig:
    inputs: list[str]
    out: str = field(metadata={"help": "datastore directory to create", "short": "-o"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    tokenizer: str = field(default=DEFAULT_LM, metadata={"help": "tokenizer of the LM the store serves (preset, "
                                                                 "folder, GGUF, hub id)"})
    shard_docs: int = field(default=1000, metadata={"help": "documents per shard (memory is bounded by a shard)"})
    shards: int = field(default=1, metadata={"help": "split the corpus's documents into N stores (OUT/shard-00000 "
                                                     "...) written as one store set in OUT (1: one store)"})
    # set by a --shards build for each of its stores: (this shard, of how many); see datastore/build_shards.py
    shard_of: tuple[int, int] | None = field(default=None, metadata={"cli": False})
    dedup: bool = field(default=False, metadata={"help": "drop exact-duplicate chunks from the index"})
    near_dup: bool = field(default=False, metadata={"help": "drop near-duplicate documents (13-gram Jaccard >= 0.8)"})
    executor: str = field(default="local", metadata={"help": "'local' or 'ray'"})
    ray_address: str | None = field(default=None, metadata={"help": "Ray cluster address, e.g. 127.0.0.1:6379"})
    force: bool = field(default=False, metadata={"help": "delete an existing or unfinished store and start over"})
    add: bool = field(default=False, metadata={"help": "append these inputs to an existing store"})

    def __post_init__(self) -> None:
        refuse_below(self, ("shard_docs", "shards"))
        if self.shards > 1 and self.add:
            raise RalmError(f"--add with --shards {self.shards}: appending to a sharded store is not supported; "
                            "build the new corpus as its own store and join them with `ralm storeset`")
        if self.force and self.add:
            raise RalmError("--force and --add contradict each other: choose one")
        if self.executor not in ("local", "ray"):
            raise RalmError(f"--executor {self.executor!r}: expected 'local' or 'ray'")
        if self.executor == "ray" and not self.ray_address:
            raise RalmError("--ray-address is required with --executor ray (e.g. 127.0.0.1:6379)")

    def output_params(self) -> dict:
        """Everything that determines the store's content (not how or where it is computed)."""
        return {"tokenizer": self.tokenizer, "chunking": asdict(self.chunking), "corpus": asdict(self.corpus),
                "encoder": {k: v for k, v in asdict(self.encoder).items() if k != "batch_size"},
                "index": {k: v for k, v in asdict(self.index).items()}, "shard_docs": self.shard_docs,
                "dedup": self.dedup, "near_dup": self.near_dup,
                **({"shard_of": list(self.shard_of)} if self.shard_of else {})}  # absent: one store, as before


def _prepare(cfg: BuildConfig, out: OutDir, log: Callable[[str], None]) -> tuple[Path, dict | None, bool]:
    """What to do in the locked, checked output folder: (root, finished manifest for --add, already done)."""
    root = out.root
    manifest = None
    if holds_sharded_build(root):
        raise RalmError(f"--out {root}: holds a store set of a --shards build (shard-NNNNN folders); rerun "
                        "that command to finish or reuse it, or use --force to rebuild it as one store")
    if (root / layout.MANIFEST).exists():
        manifest = read_manifest(root)
        if (root / layout.BUILD_DIR).exists() and _finished_build_leftover(root, manifest):
            # killed after the manifest was written but before .build was removed: the store is
            # complete; resuming would append its parts a second time
            log(f"{root}: removing build state left over from a finished build")
            out.remove(layout.BUILD_DIR)
        if not cfg.add and not (root / layout.BUILD_DIR).exists():
            same = manifest["build"]["params"] == _jsonable(cfg.output_params()) and \
                manifest["build"]["inputs"] == [str(i) for i in cfg.inputs]
            if not same:
                raise RalmError(f"--out {root}: already a finished store built from other inputs or parameters; "
                                "use --add to append or --force to rebuild")
            return root, manifest, True
    elif cfg.add:
        raise RalmError(f"--add: {root} has no finished store to append to")
    return root, manifest, False


def _finished_build_leftover(root: Path, manifest: dict) -> bool:
    """Whether ``.build`` beside a manifest belongs to a build that already wrote that manifest.

    A build's parts start at ``base_part``; once its manifest is written the store has more parts than
    that. Without a state file nothing can have been started (it is written before any shard), or
    the removal of ``.build`` was cut short; either way there is nothing to resume.
    """
    state_path = root / layout.BUILD_DIR / "state.json"
    if not state_path.exists():
        return True
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    return int(state.get("base_part", 0)) < len(manifest["parts"])


def _discard_failed_start(out: OutDir, manifest: dict | None, err: RalmError) -> None:
    """After a fatal input error, remove what a build that finished no shard wrote (no half store left)."""
    done_dir = out.root / layout.BUILD_DIR / "done"
    if done_dir.exists() and any(done_dir.iterdir()):
        return  # finished shards: keep them, a rerun resumes from them
    out.discard(err, keep_store=manifest is not None)  # --add on a finished store: it stays as it was


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _resolve_state(cfg: BuildConfig, root: Path, manifest: dict | None, log) -> dict:
    """Load or create ``.build/state.json``: the parameters, resolved encoder dtype and part numbering."""
    state_path = root / layout.BUILD_DIR / "state.json"
    params = _jsonable(cfg.output_params())
    if manifest is not None and cfg.add:
        base = manifest["build"]["params"]
        for key in ("tokenizer", "chunking", "encoder"):
            if key == "encoder":
                mine = {k: v for k, v in params[key].items() if k != "dtype"}
                theirs = {k: v for k, v in base[key].items() if k != "dtype"}
            else:
                mine, theirs = params[key], base[key]
            if mine != theirs:
                raise RalmError(f"--add: {key} {mine} differs from the store's {theirs}; "
                                "an appended corpus must be chunked and encoded the same way")
    files = input_files_fingerprint(cfg.inputs)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if _shard_params(state["params"]) != _shard_params(params) or state["inputs"] != [str(i) for i in cfg.inputs]:
            raise RalmError(f"--out {root}: holds an unfinished build started with other inputs or parameters; "
                            "rerun that command to finish it, or use --force to start over")
        if state.get("files") != files:
            raise RalmError(f"--out {root}: the input files changed since the unfinished build started "
                            "(finished shards would no longer match them); use --force to start over")
        log(f"resuming the unfinished build in {root}")
        if state["params"].get("index") != params["index"]:
            # only the final index step reads the index parameters: the finished shards stay valid,
            # and the manifest records the parameters the index is actually built with
            log(f"{root}: the index parameters changed (--index {cfg.index.kind}); the finished shards are reused")
            state["params"]["index"] = params["index"]
            write_json(state_path, state)
        return state
    tok = load_tokenizer(cfg.tokenizer)
    encoder = None
    if not cfg.encoder.sparse:
        if manifest is not None and cfg.add:
            dtype = manifest["encoder"]["dtype"]  # appended keys must be encoded exactly like the old ones
        else:
            enc = load_encoder(cfg.encoder)
            dtype = enc.dtype
        encoder = {**asdict(cfg.encoder), "dtype": dtype}
    state = {"params": params, "inputs": [str(i) for i in cfg.inputs], "files": files, "encoder": encoder,
             "tokenizer_fingerprint": tokenizer_fingerprint(tok),
             "base_part": len(manifest["parts"]) if manifest else 0, "started": time.time()}
    write_json(state_path, state)
    return state


def _shard_params(params: dict) -> dict:
    """The parameters that shape the shards (chunks and keys): all but the index's."""
    return {k: v for k, v in params.items() if k != "index"}


def input_files_fingerprint(inputs: list[str]) -> list[list]:
    """(name, size, mtime) of every input file: a resume must read exactly what the first run read."""
    return [[name, p.stat().st_size, p.stat().st_mtime_ns] for p, name in list_input_files(inputs)]


def shard_documents(docs: Iterator[Document], shard_docs: int, shard_chars: int = 32_000_000) -> Iterator[list[Document]]:
    shard: list[Document] = []
    chars = 0
    for d in docs:
        shard.append(d)
        chars += len(d.text)
        if len(shard) >= shard_docs or chars >= shard_chars:
            yield shard
            shard, chars = [], 0
    if shard:
        yield shard


def _estimate_documents(inputs: list[str]) -> int | None:
    """Cheap total for the progress bar: lines of JSONL, rows of Parquet, one per text file."""
    total = 0
    for path, _ in list_input_files(inputs):
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                total += sum(buf.count(b"\n") for buf in iter(lambda: f.read(1 << 24), b""))
        elif path.suffix == ".parquet":
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            total += 1
    return total


def build(cfg: BuildConfig, log: Callable[[str], None] | None = None, progress: bool = True, *,
          near_dups: set[int] | None = None) -> dict:
    """Build (or resume, or append to) the store at ``cfg.out``; return the build summary.

    ``cfg.shards`` > 1: ``cfg.out`` becomes a store set over that many stores (``datastore/build_shards.py``).
    ``near_dups``: the inputs' near-duplicate ordinals, when the caller (a --shards build) found them already."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if cfg.shards > 1:
        return build_sharded(cfg, build, log, progress)
    t0 = time.perf_counter()
    list_input_files(cfg.inputs)  # fail fast on a missing path, before touching the output folder
    # writable, locked against a second writer, and ralm's own: checked before any model is loaded
    with open_out(cfg.out, layout.KIND, force=cfg.force, log=log) as out:
        root, manifest, done = _prepare(cfg, out, log)
        if done:
            log(f"{root}: already complete; nothing to do (use --force to rebuild, --add to append)")
            return {**manifest["summary"], "already_complete": True}
        out.claim()
        fresh_state = not (root / layout.BUILD_DIR / "state.json").exists()
        try:
            return _build(cfg, root, manifest, log, progress, t0, near_dups)
        except RalmError as e:
            if fresh_state:
                _discard_failed_start(out, manifest, e)
            raise


def _build(cfg: BuildConfig, root: Path, manifest: dict | None, log, progress: bool, t0: float,
           near_dups: set[int] | None) -> dict:
    state = _resolve_state(cfg, root, manifest, log)
    base = state["base_part"]
    encoder_cfg = EncoderConfig(**state["encoder"]) if state["encoder"] else EncoderConfig(name="bm25")
    _check_before_encoding(cfg, encoder_cfg, log)

    stats = ReadStats()
    docs: Iterator[Document] = iter_documents(cfg.inputs, cfg.corpus, stats)
    near_dup_dropped = 0
    if cfg.near_dup:
        nd_path = root / layout.BUILD_DIR / "near_dup.json"
        if nd_path.exists():
            drop = set(json.loads(nd_path.read_text()))
        elif near_dups is not None:
            drop = near_dups
            write_json(nd_path, sorted(drop))
        else:
            log("finding near-duplicate documents (13-gram MinHash)")
            drop = near_duplicate_ordinals(d.text for d in iter_documents(cfg.inputs, cfg.corpus, ReadStats()))
            write_json(nd_path, sorted(drop))
        near_dup_dropped = len(drop)
        docs = (d for i, d in enumerate(docs) if i not in drop)
    total = _estimate_documents(cfg.inputs)
    if cfg.shard_of:  # one store of a --shards build: its documents only
        docs = select_shard(docs, cfg.shard_of)
        total = -(-total // cfg.shard_of[1])

    desc = f"shard {cfg.shard_of[0] + 1}/{cfg.shard_of[1]}" if cfg.shard_of else "build"
    bar = tqdm(total=total, unit="doc", desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    records: dict[int, dict] = {}

    def tasks() -> Iterator[ShardTask]:
        for i, shard in enumerate(shard_documents(docs, cfg.shard_docs)):
            part = base + i
            marker = layout.done_path(root, part)
            if marker.exists():  # finished before a crash: keep it
                records[part] = json.loads(marker.read_text())
                bar.update(len(shard))
                continue
            yield ShardTask(part, shard, str(root), cfg.tokenizer, cfg.chunking, encoder_cfg)

    executor = make_executor(cfg.executor, cfg.ray_address)
    try:
        for rec in executor.map(process_shard, tasks()):
            records[rec["part"]] = rec
            bar.update(rec["documents"])
            bar.set_postfix(chunks=sum(r["chunks"] for r in records.values()))
    finally:
        bar.close()
        executor.close()
    if stats.documents == 0:
        raise RalmError(f"{', '.join(cfg.inputs)}: empty corpus (no non-blank documents; "
                        f"{stats.blank} blank, {stats.too_large} too large, {stats.invalid_utf8_skipped} invalid)")
    for w in stats.warnings[:20]:
        log(f"warning: {w}")
    if len(stats.warnings) > 20:
        log(f"warning: ... and {len(stats.warnings) - 20} more")

    old_parts = manifest["parts"] if manifest else []
    parts = old_parts + [records[p] for p in sorted(records)]
    summary = _finalize(cfg, root, state, manifest, parts, stats, near_dup_dropped, log)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["chunks_per_second"] = round(summary["new_chunks"] / max(summary["seconds"], 1e-9), 1)
    return summary


def _check_before_encoding(cfg: BuildConfig, encoder_cfg: EncoderConfig, log: Callable[[str], None]) -> None:
    """Refuse a factory string FAISS cannot build, and warn on chunks the encoder truncates, before any encoding."""
    if encoder_cfg.sparse:
        return

    enc = load_encoder(encoder_cfg)  # loaded once per process: the shards reuse it
    check_factory(cfg.index, enc.dim)
    if cfg.chunking.chunk_tokens > enc.max_length:
        log(f"warning: --chunk-tokens {cfg.chunking.chunk_tokens} exceeds the encoder's maximum length of "
            f"{enc.max_length} tokens: each chunk's key sees only about its first {enc.max_length} tokens "
            f"(of up to {cfg.chunking.chunk_tokens}) and retrieval ignores the rest")


def _finalize(cfg: BuildConfig, root: Path, state: dict, manifest: dict | None, parts: list[dict],
              stats: ReadStats, near_dup_dropped: int, log) -> dict:
    """Index all parts, write the manifest last (atomically), then drop build state and stale files."""
    def texts_by_part() -> Iterator[list[str]]:
        for p in parts:
            yield pq.read_table(layout.chunks_path(root, p["part"]), columns=["text"])["text"].to_pylist()

    n = sum(p["chunks"] for p in parts)
    # BM25 indexes every text anyway: read them once and dedup from memory; dense stores stream them
    texts = [t for ts in texts_by_part() for t in ts] if cfg.encoder.sparse else None
    if cfg.dedup:
        keep = exact_duplicate_mask(iter([texts]) if texts is not None else texts_by_part())
    else:
        keep = np.ones(n, dtype=bool)
    rows = np.flatnonzero(keep).astype(np.int64)
    generation = (manifest["generation"] + 1) if manifest else 1
    index_dir = root / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    log(f"indexing {len(rows):,} chunks")
    if cfg.encoder.sparse:
        path = index_dir / f"bm25-g{generation:04d}"
        meta = build_bm25([texts[r] for r in rows], rows, path)
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        path = index_dir / f"dense-g{generation:04d}.faiss"
        keys = KeyParts([layout.keys_path(root, p["part"]) for p in parts])
        meta = build_index(keys, rows, cfg.index, path, log=log)
        files = [path, path.with_suffix(".json")]
    index_files = [{"path": f.relative_to(root).as_posix(), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
                   for f in files]
    domains: dict[str, int] = {}
    for p in parts:
        for d, c in p["domains"].items():
            domains[d] = domains.get(d, 0) + c
    prev = manifest["summary"] if manifest else {}
    summary = {
        "documents": sum(p["documents"] for p in parts), "chunks": n, "indexed_chunks": int(len(rows)),
        "new_chunks": sum(p["chunks"] for p in parts[len(manifest["parts"]) if manifest else 0:]),
        "tokens": sum(p["tokens"] for p in parts),
        "skipped": {"blank": stats.blank, "invalid_utf8": stats.invalid_utf8,
                    "invalid_utf8_skipped": stats.invalid_utf8_skipped, "too_large": stats.too_large,
                    "near_duplicate_documents": near_dup_dropped, "duplicate_chunks": int(n - len(rows)),
                    "files": len(stats.skipped_files)},
        "index": meta["factory"], "index_params": meta.get("params", {}), "recall_at_10": meta.get("recall_at_10"),
        "domains": domains,
    }
    if prev:
        summary["appended_documents"] = summary["documents"] - prev["documents"]
    encoder_desc = ({"name": "bm25", "kind": "sparse"} if cfg.encoder.sparse
                    else load_encoder(EncoderConfig(**state["encoder"])).describe())
    new_manifest = {
        "format": layout.FORMAT, "version": layout.VERSION, "generation": generation,
        "tokenizer": {"name": cfg.tokenizer, "fingerprint": state["tokenizer_fingerprint"]},
        "encoder": encoder_desc, "chunking": asdict(cfg.chunking),
        "counts": {k: summary[k] for k in ("documents", "chunks", "indexed_chunks", "tokens")},
        "domains": domains, "parts": [{k: v for k, v in p.items() if "seconds" not in k} for p in parts],
        "index": {"path": (path.relative_to(root)).as_posix(), "meta": meta, "files": index_files},
        "build": {"params": (manifest["build"]["params"] if manifest else state["params"]),
                  "inputs": (manifest["build"]["inputs"] if manifest else state["inputs"]),
                  "appended_inputs": (manifest["build"].get("appended_inputs", []) + [state["inputs"]])
                  if manifest else []},
        "summary": summary,
    }
    for sub in ("chunks", "keys", "index"):  # temporary files of writes cut short by a crash
        for tmp in (root / sub).glob(".*.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    write_json(root / layout.MANIFEST, seal(new_manifest))  # with the checksum of its content
    shutil.rmtree(root / layout.BUILD_DIR, ignore_errors=True)
    for stale in index_dir.iterdir():  # earlier generations of the index, now unreferenced
        if not stale.name.startswith((f"dense-g{generation:04d}", f"bm25-g{generation:04d}")):
            remove_owned(root, f"index/{stale.name}", layout.KIND)  # only ralm's names, never through a link
    return summary
