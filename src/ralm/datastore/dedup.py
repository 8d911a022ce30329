"""Deduplication: exact-duplicate chunks (by text hash) and near-duplicate documents (MinHash LSH).

MassiveDS drops documents whose 13-gram Jaccard similarity to an earlier one is >= 0.8; MinHash LSH
finds the candidates without comparing every pair. The first occurrence always wins, so the result
does not depend on how the build was sharded.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def ngrams(text: str, n: int = 13) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = 13) -> float:
    ga, gb = ngrams(a, n), ngrams(b, n)
    return len(ga & gb) / max(1, len(ga | gb))


def near_duplicate_ordinals(texts: Iterable[str], threshold: float = 0.8, n: int = 13,
                            num_perm: int = 128) -> set[int]:
    """Ordinals (0-based positions in ``texts``) of documents near-duplicating an earlier kept document."""
    from datasketch import MinHash, MinHashLSH  # only with the near-duplicate pre-pass

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    drop: set[int] = set()
    kept: dict[str, MinHash] = {}  # signatures only (num_perm hashes a document), not the n-grams
    for i, text in enumerate(texts):
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch([g.encode() for g in ngrams(text, n)])
        # LSH banding gives candidates; confirm with the signature's Jaccard estimate
        if any(mh.jaccard(kept[c]) >= threshold for c in lsh.query(mh)):
            drop.add(i)
            continue
        key = str(i)
        lsh.insert(key, mh)
        kept[key] = mh
    return drop


def exact_duplicate_mask(text_parts: Iterator[list[str]]) -> np.ndarray:
    """Boolean keep-mask over all chunks (parts in order): False for a repeat of an earlier chunk text."""
    seen: set[bytes] = set()
    keep: list[bool] = []
    for texts in text_parts:
        for t in texts:
            h = hashlib.blake2b(t.encode(), digest_size=16).digest()
            keep.append(h not in seen)
            seen.add(h)
    return np.array(keep, dtype=bool)
