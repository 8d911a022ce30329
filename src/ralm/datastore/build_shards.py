"""``ralm build --shards N``: one corpus split by documents into N stores, written as one store set.

``OUT/shard-00000`` ... ``OUT/shard-{N-1:05d}`` are ordinary stores, each built by ``build.build`` with every
option of the command (tokenizer, chunking, encoder, index and its memory budget, dedup, near-dup, executor);
``OUT/storeset.json`` (``store_set.create_store_set``) is written last, over the finished shards, so ``OUT``
opens as a ``StoreSet`` wherever a store goes. Until it exists ``OUT`` is an unfinished build that nothing
opens: a rerun of the same command resumes it (finished shards and parts are kept, as a one-store build keeps
its finished parts), ``--force`` starts over, and a failure before any shard finished work removes all of it.

Which shard a document goes to: round-robin over the corpus's documents in reading order, after near-duplicate
removal (document ``j`` to shard ``j % N``). Rather than a hash of the document id, because it is balanced (shard
sizes differ by at most one document), so every shard holds a document whenever ``N`` <= documents (a hash can
leave a shard empty or lopsided on a small corpus), and it is deterministic for the same inputs (they are read
in one fixed order). It never splits a document: a document is the unit assigned. What it gives up, stability
when documents are added, does not arise: a sharded store is rebuilt, not appended to (``--add`` is refused).

With ``--dedup`` the set drops, at search time, identical chunks that two shards hold (each shard's index drops
its own), so a set answers with the chunks one store of the whole corpus would; without it the set keeps them,
as that store would.

This module does not import ``build`` (which imports it): the one-store build is passed in.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ralm.data.corpus import ReadStats, iter_documents, list_input_files
from ralm.data.document import Document
from ralm.datastore import layout
from ralm.datastore.dedup import near_duplicate_ordinals
from ralm.datastore.store_set import create_store_set, read_store_set
from ralm.errors import RalmError
from ralm.utils.atomic import sha256_file
from ralm.utils.outdir import open_out


def select_shard(docs: Iterator[Document], shard_of: tuple[int, int]) -> Iterator[Document]:
    """The documents of shard ``i`` of ``n``: every ``n``-th, starting at the ``i``-th (see the module doc)."""
    i, n = shard_of
    return (d for j, d in enumerate(docs) if j % n == i)


def holds_sharded_build(root: Path) -> bool:
    """Whether ``root`` holds a --shards build, finished (its store set) or not (shard folders)."""
    return (root / layout.STORESET).exists() or bool(layout.shard_paths(root))


def _finished(path: Path) -> bool:
    return (path / layout.MANIFEST).is_file() and not (path / layout.BUILD_DIR).exists()


def _has_work(path: Path) -> bool:
    """Whether a shard folder holds work worth keeping for a rerun: a finished store or finished parts."""
    done = path / layout.BUILD_DIR / "done"
    return (path / layout.MANIFEST).is_file() or (done.is_dir() and any(done.iterdir()))


def count_documents(cfg: Any) -> tuple[int, set[int] | None]:
    """The corpus's documents a build keeps, and (with ``--near-dup``) the near-duplicates' ordinals it drops."""
    docs = iter_documents(cfg.inputs, cfg.corpus, ReadStats())
    if not cfg.near_dup:
        return sum(1 for _ in docs), None
    seen = [0]

    def texts() -> Iterator[str]:
        for d in docs:
            seen[0] += 1
            yield d.text

    drop = near_duplicate_ordinals(texts())
    return seen[0] - len(drop), drop


def _refuse_other_contents(root: Path, n: int) -> None:
    """Refuse an ``OUT`` holding a one-store build, or a sharded build with another number of shards."""
    if (root / layout.MANIFEST).exists() or (root / layout.BUILD_DIR).exists():
        raise RalmError(f"--out {root}: holds a single store (built without --shards); use --force to rebuild "
                        f"it as {n} shards, or choose another folder")
    if (root / layout.STORESET).exists():
        rec, _ = read_store_set(root)
        if len(rec["shards"]) != n:
            raise RalmError(f"--out {root}: is a store set of {len(rec['shards'])} shards; rerun with --shards "
                            f"{len(rec['shards'])} or use --force to rebuild it as {n}")
    extra = [p.name for p in layout.shard_paths(root) if int(p.name.split("-")[1]) >= n]
    if extra:
        raise RalmError(f"--out {root}: holds {extra[-1]}, which a build with --shards {n} does not write; "
                        "rerun the command that wrote it or use --force to start over")


def _set_is_current(root: Path, paths: list[Path]) -> bool:
    """Whether ``OUT/storeset.json`` exists and records exactly these shards' current manifests."""
    if not (root / layout.STORESET).exists():
        return False
    rec, recorded = read_store_set(root)
    return recorded == [p.resolve() for p in paths] and all(
        e.get("manifest_sha256") == sha256_file(p / layout.MANIFEST) for e, p in zip(rec["shards"], paths, strict=True))


def build_sharded(cfg: Any, build_one: Callable[..., dict], log: Callable[[str], None], progress: bool) -> dict:
    """Build ``cfg.out`` as a store set of ``cfg.shards`` stores (see the module doc); return the summary."""
    n, t0 = cfg.shards, time.perf_counter()
    list_input_files(cfg.inputs)  # fail fast on a missing path, before touching the output folder
    with open_out(cfg.out, layout.KIND, force=cfg.force, log=log) as out:
        root = out.root
        _refuse_other_contents(root, n)
        paths = [layout.shard_path(root, i) for i in range(n)]
        near_dups = None
        if not all(_finished(p) for p in paths):
            if cfg.near_dup:
                log("finding near-duplicate documents (13-gram MinHash), once for every shard")
            docs, near_dups = count_documents(cfg)
            if docs < n:
                what = "an empty corpus" if docs == 0 else f"only {docs} document{'s' * (docs != 1)}"
                raise RalmError(f"--shards {n}: more shards than documents ({', '.join(cfg.inputs)}: {what}"
                                f"{' after dropping near-duplicates' if near_dups else ''}); each shard needs one")
        fresh = not holds_sharded_build(root)
        out.claim()
        try:
            summaries = []
            for i, path in enumerate(paths):
                log(f"shard {i + 1}/{n}: {path}")
                one = dataclasses.replace(cfg, out=str(path), shards=1, shard_of=(i, n), force=False)
                summaries.append(build_one(one, log=log, progress=progress, near_dups=near_dups))
            done = all(s.get("already_complete") for s in summaries) and _set_is_current(root, paths)
            if not done:
                create_store_set(root, paths, dedup=cfg.dedup, force=True)
        except RalmError as e:
            if fresh and not any(_has_work(p) for p in layout.shard_paths(root)):
                out.discard(e)  # nothing finished: no half-written OUT is left
            raise
    return _summary(summaries, done, time.perf_counter() - t0)


def _summary(shards: list[dict], already_complete: bool, seconds: float) -> dict:
    """One summary with the keys of a store's (``build._finalize``), summed over the shards."""
    total = {k: sum(s[k] for s in shards) for k in ("documents", "chunks", "indexed_chunks", "new_chunks", "tokens")}
    skipped = dict(shards[0]["skipped"])  # every shard read the whole corpus: its skips are the corpus's
    skipped["duplicate_chunks"] = sum(s["skipped"]["duplicate_chunks"] for s in shards)
    factories = sorted({s["index"] for s in shards})
    params = [s["index_params"] for s in shards]
    recalls = [s["recall_at_10"] for s in shards]
    domains: dict[str, int] = {}
    for s in shards:
        for d, c in s.get("domains", {}).items():
            domains[d] = domains.get(d, 0) + c
    out = {**total, "skipped": skipped, "index": f"{len(shards)} shards of {'/'.join(factories)}",
           "index_params": params[0] if all(p == params[0] for p in params) else params,
           "recall_at_10": None if None in recalls else min(recalls),  # the worst shard's
           "domains": domains, "shards": len(shards), "shard_documents": [s["documents"] for s in shards],
           "seconds": round(seconds, 2)}
    out["chunks_per_second"] = round(out["new_chunks"] / max(seconds, 1e-9), 1)
    if already_complete:
        out["already_complete"] = True
    return out
