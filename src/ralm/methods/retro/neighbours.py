"""Neighbours of every chunk of a document, from a retrieval datastore, for RETRO-fit training and evaluation.

A document is seen as the model sees it (``Targets.ids``: the start token first where the tokenizer has one) and cut
on RETRO's grid into chunks of m tokens; chunk u is retrieved with its own text and gets the top-K
neighbours, each the stored chunk plus its continuation (up to 2m tokens), best first. Same-document
neighbours are excluded by default; ``decontaminate`` also drops neighbours sharing an N-token span with
the document. Only whole chunks get neighbours: a partial last chunk is never whole inside a window.

Training precomputes them once into a cache (``NeighbourCache``: one int32 array plus a JSON header that
names exactly what it was computed from), so every epoch reads them from disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ralm.core.retriever import Retriever
from ralm.core.targets import Targets
from ralm.datastore.store import store_sha256
from ralm.errors import IncompatibleError, RalmError
from ralm.methods.in_context import store_retriever
from ralm.methods.retro.model import PAD, RetroConfig, pad_neighbours, window_chunks
from ralm.utils.atomic import atomic_path, write_json

CACHE_VERSION = 1


def check_store_fits(ds: Any, cfg: RetroConfig, tokenizer_fp: str, model_name: str) -> None:
    """The store's chunks must be m-token chunks with continuations, in the model's tokens."""
    ch = ds.manifest["chunking"]
    if ch["chunk_tokens"] != cfg.chunk_size:
        raise IncompatibleError(f"{ds.root}: chunked into {ch['chunk_tokens']}-token chunks, but the RETRO-fit "
                                f"chunk size is {cfg.chunk_size}; rebuild the store with --chunk-tokens "
                                f"{cfg.chunk_size} or set --chunk-size {ch['chunk_tokens']}")
    if not ch["continuation"]:
        raise IncompatibleError(f"{ds.root}: built without continuations; RETRO neighbours are chunk + "
                                "continuation (rebuild without --no-continuation)")
    ds.check_compatible(tokenizer_fingerprint=tokenizer_fp, tokenizer_name=model_name)


def store_id(ds: Any) -> str:
    """A short hash of the store's manifest: which store, which build, which index."""
    return store_sha256(ds)[:16]


def chunk_queries(t: Targets, tokenizer: Any, m: int) -> list[str]:
    """The text of every whole chunk of ``t`` on the model's grid (the start token excluded from the text)."""
    special = set(tokenizer.all_special_ids)
    out = []
    for u in range(len(t.ids) // m):
        ids = [i for i in t.ids[u * m:(u + 1) * m].tolist() if i not in special]
        out.append(tokenizer.decode(ids))
    return out


def document_neighbours(ds: Any, tokenizer: Any, targets: list[Targets], cfg: RetroConfig,
                        exclude_same_doc: bool = True, decontaminate: int | None = None,
                        progress: bool = False, retriever: Retriever | None = None) -> list[torch.Tensor]:
    """Per document, a (n_whole_chunks, K, R) tensor of neighbour tokens (PAD where fewer were found): rows
    from ``retriever`` (default: the store's own search), tokens from the store ``ds``."""
    doc_tokens = {t.doc_id: t.ids for t in targets} if decontaminate else None
    retrieve = store_retriever(ds, cfg.neighbours, exclude_same_doc, decontaminate, doc_tokens, retriever)
    out = []
    for t in tqdm(targets, desc="neighbours", unit="doc", disable=not progress):
        queries = chunk_queries(t, tokenizer, cfg.chunk_size)
        found = retrieve(queries, t.doc_id) if queries else []
        out.append(pad_neighbours([[p.tokens for p in passages] for passages in found], cfg.neighbours,
                                  cfg.neighbour_len))
    return out


@dataclass
class NeighbourCache:
    """Neighbours of the whole chunks of a list of documents: ``tokens[offsets[i]:offsets[i+1]]`` is doc i's."""

    header: dict[str, Any]
    tokens: np.ndarray  # (total_chunks, K, R) int32
    offsets: np.ndarray  # (n_docs + 1,) int64

    def doc(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "neighbours.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, tokens=self.tokens, offsets=self.offsets)
        write_json(path / "header.json", self.header)  # written last: its presence marks a finished cache

    @classmethod
    def load(cls, path: Path, expect: dict[str, Any] | None = None) -> NeighbourCache:
        """Load a finished cache; with ``expect``, refuse one computed from anything else."""
        head, data = path / "header.json", path / "neighbours.npz"
        if not head.exists() or not data.exists():
            raise RalmError(f"{path}: missing neighbours cache (no {head.name if not head.exists() else data.name});"
                            " run `ralm retrofit` without --neighbours to compute it")
        try:
            header = json.loads(head.read_text())
            with np.load(data) as z:
                tokens, offsets = z["tokens"], z["offsets"]
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
            raise RalmError(f"{path}: corrupt neighbours cache ({e})") from None
        if expect is not None:
            diff = sorted(k for k in expect if header.get(k) != expect[k])
            if diff:
                raise IncompatibleError(f"{path}: neighbours cache was computed with other {', '.join(diff)} "
                                        f"({', '.join(f'{k}={header.get(k)!r}' for k in diff)}); "
                                        "delete it or point --neighbours elsewhere")
        return cls(header, tokens, offsets)

    @classmethod
    def from_docs(cls, header: dict[str, Any], per_doc: list[torch.Tensor], k: int, r: int) -> NeighbourCache:
        sizes = [len(x) for x in per_doc]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        tokens = (torch.cat(per_doc).numpy().astype(np.int32) if per_doc and sum(sizes)
                  else np.zeros((0, k, r), np.int32))
        return cls(header, tokens, offsets)


def window_neighbours(doc_neighbours: torch.Tensor, offset: int, length: int, m: int) -> torch.Tensor:
    """(U, K, R) neighbours of the whole chunks of the window [offset, offset + length) of a document."""
    _, c0, U = window_chunks(offset, length, m)
    sel = doc_neighbours[c0:c0 + U]
    if len(sel) < U:  # chunks past the neighbours' end (cannot happen for a document's own windows)
        pad = torch.full((U - len(sel), *doc_neighbours.shape[1:]), PAD, dtype=doc_neighbours.dtype)
        sel = torch.cat([sel, pad])
    return sel
