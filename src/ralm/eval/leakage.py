"""Leakage report (RETRO, Borgeaud et al. 2022): how much of the gain of a retrieval method comes from
neighbours that simply contain the evaluated text.

The evaluated targets are cut into consecutive *chunks* of ``chunk_tokens`` targets. A chunk's overlap is
the longest common contiguous token run between the chunk and any neighbour used to score one of its
targets, as a fraction of the chunk's length. Chunks are bucketed by that fraction and each bucket gives
perplexity and bits per byte of the retrieval method *and* of the no-retrieval baseline on the same
tokens, so "retrieval still helps on chunks with <= 8 overlapping tokens" can be read off directly.

Methods record what they retrieved in a ``NeighbourLog`` (``ralm.core.neighbours``) while scoring; this
module only reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ralm.core.neighbours import NeighbourLog
from ralm.core.start_token import start_token_id
from ralm.core.targets import Targets

DEFAULT_EDGES = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def _longest_run(a: np.ndarray, b: np.ndarray) -> int:
    """Longest common contiguous run; loops over the shorter sequence, vectorised over the longer."""
    if len(a) == 0 or len(b) == 0:
        return 0
    if len(a) > len(b):
        a, b = b, a
    run = np.zeros(len(b), dtype=np.int32)  # run[j]: length of the common run ending at a[i], b[j]
    best = np.zeros(len(b), dtype=np.int32)
    ext = np.empty_like(run)
    for tok in a:
        ext[0] = 1
        ext[1:] = run[:-1] + 1
        run = np.where(b == tok, ext, 0)
        np.maximum(best, run, out=best)
    return int(best.max())


def longest_common_substring(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common contiguous token run of ``a`` and ``b`` (O(len(a)·len(b)))."""
    return _longest_run(np.asarray(a, dtype=np.int64).reshape(-1), np.asarray(b, dtype=np.int64).reshape(-1))


def _longest_run_any(chunk: np.ndarray, neighbours: list[np.ndarray]) -> int:
    """max over neighbours of the LCS with ``chunk``, in one pass: neighbours joined by a separator that
    occurs nowhere in the chunk, so no run can cross from one neighbour into the next."""
    neighbours = [n for n in neighbours if len(n)]
    if not neighbours or len(chunk) == 0:
        return 0
    sep = np.array([chunk.min() - 1], dtype=np.int64)
    return _longest_run(chunk, np.concatenate([x for n in neighbours for x in (n, sep)]))


def target_bytes(text: str, tokenizer: Any, targets: Targets) -> np.ndarray:
    """(n_targets,) UTF-8 bytes attributed to each target, summing to ``targets.scored_bytes``.

    Same span as ``make_targets``: a target owns its token's text plus whatever lies between it and the
    previous token (whitespace a tokenizer drops goes to the following token); trailing text after the
    last token goes to the last target. Without a start token the first token is unscored, and the scored span
    starts at the second token. Tokens sharing one character (byte-level pieces of a multi-byte character)
    give the whole character to the first of them.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    has_bos = start_token_id(tokenizer) is not None
    scored = offsets if has_bos else offsets[1:]
    if len(scored) != targets.n_targets:
        raise ValueError(f"{targets.doc_id!r}: text gives {len(scored)} targets, expected {targets.n_targets} "
                         "(another text or tokenizer than make_targets used?)")
    raw = text.encode("utf-8")
    # byte offset of every character boundary: characters start at bytes that are not 10xxxxxx
    starts = np.flatnonzero((np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80)
    char_to_byte = np.append(starts, len(raw))
    begin = 0 if has_bos else offsets[1][0]
    cuts = np.array([begin, *(end for _, end in scored[:-1]), len(text)], dtype=np.int64)
    cuts = np.maximum.accumulate(char_to_byte[cuts])  # overlapping offsets never give negative counts
    out = np.diff(cuts)
    if int(out.sum()) != targets.scored_bytes:
        raise ValueError(f"{targets.doc_id!r}: bytes sum to {int(out.sum())}, expected {targets.scored_bytes}")
    return out


class ChunkOverlap(NamedTuple):
    start: int  # first target (index into Targets.ids)
    end: int  # one past the last target
    overlap: float  # longest common run with a neighbour / (end - start)

    @property
    def lcs_tokens(self) -> int:
        return round(self.overlap * (self.end - self.start))


def chunk_overlaps(targets: Targets, log: NeighbourLog, chunk_tokens: int = 64) -> list[ChunkOverlap]:
    """Every ``chunk_tokens`` consecutive targets from ``targets.first`` on, with their overlap.

    The last chunk may be shorter; its fraction is over its own length, and it is kept so that the
    buckets of a report cover every scored token (they recombine to the overall ppl and bpb).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens {chunk_tokens}: must be >= 1")
    first, n = targets.first, len(targets.ids)
    bounds = [(s, min(s + chunk_tokens, n)) for s in range(first, n, chunk_tokens)]
    seen: list[set[int]] = [set() for _ in bounds]
    for start, end, refs in log.entries:
        if start < first or end > n:
            raise ValueError(f"{targets.doc_id!r}: logged targets [{start}, {end}) outside [{first}, {n})")
        if refs and end > start:
            for c in range((start - first) // chunk_tokens, (end - 1 - first) // chunk_tokens + 1):
                seen[c].update(refs)
    ids = targets.ids.numpy() if isinstance(targets.ids, torch.Tensor) else np.asarray(targets.ids)
    out = []
    for (s, e), refs in zip(bounds, seen, strict=True):
        lcs = _longest_run_any(ids[s:e].astype(np.int64), [log._arrays[r] for r in sorted(refs)])
        out.append(ChunkOverlap(s, e, lcs / (e - s)))
    return out


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


@dataclass
class DocScores:
    """One evaluated document: per-target NLL (nats) of the method and the baseline, bytes, neighbours."""

    targets: Targets
    nll_method: torch.Tensor  # (n_targets,)
    nll_baseline: torch.Tensor  # (n_targets,) no retrieval, same targets
    bytes: np.ndarray  # (n_targets,) from target_bytes
    log: NeighbourLog

    def __post_init__(self) -> None:
        n = self.targets.n_targets
        for name in ("nll_method", "nll_baseline", "bytes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{self.targets.doc_id!r}: {name} has {len(getattr(self, name))} values, "
                                 f"expected {n}")
        if int(np.sum(self.bytes)) != self.targets.scored_bytes:
            raise ValueError(f"{self.targets.doc_id!r}: bytes sum to {int(np.sum(self.bytes))}, "
                             f"expected {self.targets.scored_bytes}")


def _metrics(nll_sum: float, tokens: int, n_bytes: int) -> dict[str, float | None]:
    if tokens == 0:
        return {"nll": None, "ppl": None, "bpb": None}
    return {"nll": nll_sum / tokens, "ppl": math.exp(nll_sum / tokens),
            "bpb": nll_sum / math.log(2) / n_bytes if n_bytes else None}


class _Acc:
    """Sums over a set of chunks; float64 so buckets recombine exactly to the overall figures."""

    def __init__(self) -> None:
        self.chunks = self.tokens = self.bytes = 0
        self.method = self.baseline = 0.0

    def add(self, tokens: int, n_bytes: int, method: float, baseline: float) -> None:
        self.chunks += 1
        self.tokens += tokens
        self.bytes += n_bytes
        self.method += method
        self.baseline += baseline

    def row(self, **head: Any) -> dict[str, Any]:
        m, b = _metrics(self.method, self.tokens, self.bytes), _metrics(self.baseline, self.tokens, self.bytes)
        delta = m["bpb"] - b["bpb"] if m["bpb"] is not None and b["bpb"] is not None else None
        return {**head, "chunks": self.chunks, "tokens": self.tokens, "bytes": self.bytes,
                "method": m, "baseline": b, "bpb_delta": delta}


def _bucket_label(edges: Sequence[float], i: int) -> str:
    if i == 0:
        return "0" if edges[0] == 0 else f"[0, {edges[0]:g}]"
    return f"({edges[i - 1]:g}, {edges[i]:g}]"


def leakage_report(docs: list[DocScores], chunk_tokens: int = 64, edges: Sequence[float] = DEFAULT_EDGES,
                   low_tokens: int = 8, method: str = "method", baseline: str = "none") -> dict[str, Any]:
    """Chunks of all ``docs`` bucketed by overlap, with ppl / bpb of the method and the baseline per bucket.

    Buckets: the first holds overlaps ``<= edges[0]`` (exactly 0 with the default edges, i.e. chunks that
    share no token run with any neighbour), bucket i holds ``edges[i-1] < overlap <= edges[i]``; the last
    edge must be >= 1 so every chunk lands somewhere. ``low_overlap`` gathers the chunks whose longest
    common run is at most ``low_tokens`` tokens (RETRO's "<= 8 tokens"); the short last chunk of a
    document is held to the same fraction, ``low_tokens / chunk_tokens``, so a copied 5-token tail does
    not count as unleaked.
    ``bpb_delta`` is method minus baseline: negative where retrieval helps.
    """
    edges = [float(e) for e in edges]
    if not edges or edges[0] < 0 or edges[-1] < 1 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"edges {edges}: need increasing values from >= 0 up to >= 1")
    buckets = [_Acc() for _ in edges]
    low, total = _Acc(), _Acc()
    for d in docs:
        m, b, nb = _as_float64(d.nll_method), _as_float64(d.nll_baseline), np.asarray(d.bytes, dtype=np.int64)
        first = d.targets.first
        for c in chunk_overlaps(d.targets, d.log, chunk_tokens):
            sl = slice(c.start - first, c.end - first)
            vals = (c.end - c.start, int(nb[sl].sum()), float(m[sl].sum()), float(b[sl].sum()))
            buckets[int(np.searchsorted(edges, c.overlap, side="left"))].add(*vals)
            total.add(*vals)
            if c.lcs_tokens * chunk_tokens <= low_tokens * (c.end - c.start):  # pro rata for a short last chunk
                low.add(*vals)
    return {
        "chunk_tokens": chunk_tokens, "edges": edges, "names": {"method": method, "baseline": baseline},
        "buckets": [acc.row(range=_bucket_label(edges, i), lo=edges[i - 1] if i else 0.0, hi=edges[i])
                    for i, acc in enumerate(buckets)],
        "low_overlap": low.row(range=f"<= {low_tokens} tokens", max_tokens=low_tokens),
        "all": total.row(range="all"),
    }


def leakage_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table: one row per bucket, then the low-overlap and overall rows."""
    names = report.get("names", {"method": "method", "baseline": "none"})
    m, b = names["method"], names["baseline"]

    def num(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    head = (f"| overlap (of {report['chunk_tokens']} tokens) | chunks | tokens | bytes | ppl {m} | ppl {b} "
            f"| bpb {m} | bpb {b} | Δbpb |")
    lines = [head, "|" + "---|" * 9]
    for row in [*report["buckets"], report["low_overlap"], report["all"]]:
        lines.append(f"| {row['range']} | {row['chunks']} | {row['tokens']} | {row['bytes']} "
                     f"| {num(row['method']['ppl'], '.3f')} | {num(row['baseline']['ppl'], '.3f')} "
                     f"| {num(row['method']['bpb'], '.4f')} | {num(row['baseline']['bpb'], '.4f')} "
                     f"| {num(row['bpb_delta'], '+.4f')} |")
    return "\n".join(lines) + "\n"
