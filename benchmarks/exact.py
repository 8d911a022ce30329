#!/usr/bin/env python
"""Exact-search check: ralm's Flat index returns what a numpy brute force returns (tolerating ties).

Claim measured: on a real-text store (the first --n cached MiniLM window embeddings of benchmarks/search.py)
and --queries held-out SQuAD questions, ralm's ``flat`` index at k=10 (searched as one batch, and one
query at a time, which takes ralm's own single-query path) gives the same scores as
``xq @ xb.T`` + argsort within --tol, and the same id sets except where an id differs only because its
score ties the 10th score (within --tol). Prints one JSON object; exits 1 when the check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ralm.datastore.index import IndexConfig, build_index, load_index
from ralm.datastore.keys import KeyParts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import HERE, embeddings, log  # noqa: E402  (sibling benchmark: shared corpus and cache)


def compare(D: np.ndarray, I: np.ndarray, S: np.ndarray, k: int, tol: float) -> dict:
    """Compare ralm's (D, I) with brute-force scores S (nq, n): score diffs and non-tie id mismatches."""
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    D_ref = np.take_along_axis(S, order, 1)
    own = np.take_along_axis(S, I, 1)  # reference score of each id ralm returned
    mismatched_queries, mismatched_ids, tie_only = 0, 0, 0
    for q in range(len(S)):
        diff = set(I[q].tolist()) ^ set(order[q].tolist())
        if not diff:
            continue
        kth = D_ref[q, k - 1]
        bad = [i for i in diff if abs(S[q, i] - kth) > tol]
        if bad:
            mismatched_queries += 1
            mismatched_ids += len(bad)
        else:
            tie_only += 1
    return {
        "max_abs_score_diff": float(np.abs(D - D_ref).max()),
        "max_abs_score_vs_own_id": float(np.abs(D - own).max()),
        "id_mismatches_excluding_ties": mismatched_ids,
        "queries_with_mismatches_excluding_ties": mismatched_queries,
        "queries_differing_only_by_ties": tie_only,
        "duplicate_ids": int(sum(len(set(r.tolist())) < k for r in I)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000, help="store rows (the first n cached embeddings)")
    ap.add_argument("--queries", type=int, default=500, help="held-out question queries")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query")
    ap.add_argument("--tol", type=float, default=1e-4, help="score tolerance (and tie width)")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="embedding cache of search.py")
    ap.add_argument("--source-n", type=int, default=200_000, help="--n of the search.py cache to reuse")
    args = ap.parse_args(argv)

    src = argparse.Namespace(n=args.source_n, queries=2048, window=10, stride=8, max_length=32, dtype="fp32",
                             batch=256, workers=2, cache_dir=args.cache_dir)
    keys_path, xq_all, _, desc = embeddings(src)
    if args.n > args.source_n or args.queries > len(xq_all):
        raise SystemExit("--n / --queries exceed the cached embeddings")
    keys = KeyParts([keys_path])
    rows = np.arange(args.n, dtype=np.int64)
    xq = np.ascontiguousarray(xq_all[:args.queries])
    with tempfile.TemporaryDirectory(prefix="ralm-exact-") as tmp:
        meta = build_index(keys, rows, IndexConfig(kind="flat"), Path(tmp) / "flat.faiss", log=log)
        index = load_index(Path(tmp) / "flat.faiss", meta, keys)
    xb = keys.get(rows)  # the same fp16 keys as float32
    S = xq @ xb.T
    # ralm searches a batch through FAISS and a single query through its own gemv path: check both
    batch = compare(*index.search(xq, args.k), S, args.k, args.tol)
    single = compare(*(np.concatenate(a) for a in zip(*(index.search(q[None], args.k) for q in xq), strict=True)),
                     S, args.k, args.tol)
    res = {
        "max_abs_score_diff": max(batch["max_abs_score_diff"], single["max_abs_score_diff"]),
        "id_mismatches_excluding_ties": batch["id_mismatches_excluding_ties"] + single["id_mismatches_excluding_ties"],
        "batch_search": batch, "single_query_search": single,
    }
    ok = all(r["max_abs_score_diff"] <= args.tol and r["max_abs_score_vs_own_id"] <= args.tol
             and r["id_mismatches_excluding_ties"] == 0 and r["duplicate_ids"] == 0 for r in (batch, single))
    out = {"benchmark": "exact", "n": args.n, "dim": keys.dim, "queries": len(xq), "k": args.k, "tol": args.tol,
           "factory": meta["factory"], "reference": "numpy float32 xq @ xb.T, stable argsort",
           "queries_note": "SQuAD dev questions, not in the store", "data": desc["source"], **res, "pass": ok}
    print(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
