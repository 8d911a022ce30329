#!/usr/bin/env python
"""The quick-start demo: real corpus -> datastore -> neighbours of a few queries.

Fetches English Wikipedia articles with `ralm data get wiki-en` (from ``$RALM_DATA_DIR`` when they are
already there), builds a RETRO-style store (64-token chunks + continuations, MiniLM keys, FAISS index)
from the first ``--docs`` articles, and prints the top neighbours of a few natural-language queries.
Rerunning it reuses the finished store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

QUERIES = [
    "Which flightless birds live only in New Zealand?",
    "Who wrote science fiction novels and edited anthologies?",
    "Beatles album released with a film",
    "What do the trigonometric functions relate?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="folder for the subset corpus and the datastore")
    ap.add_argument("--docs", type=int, default=120, help="how many Wikipedia articles to index")
    ap.add_argument("-k", type=int, default=3, help="neighbours per query")
    args = ap.parse_args()

    from ralm import Datastore, RalmError
    from ralm.data import registry
    from ralm.data.corpus import CorpusConfig
    from ralm.datastore.build import BuildConfig, build

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        wiki = registry.get("wiki-en", log=lambda m: print(m, file=sys.stderr))
        subset = out / f"wiki_en.first{args.docs}.jsonl"
        if not subset.exists():
            with open(wiki, encoding="utf-8") as f:
                lines = [line for _, line in zip(range(args.docs), f, strict=False)]
            subset.write_text("".join(lines), encoding="utf-8")
        t0 = time.perf_counter()
        cfg = BuildConfig(inputs=[str(subset)], out=str(out / "wiki-ds"), corpus=CorpusConfig(domain="wiki"),
                          shard_docs=40)
        summary = build(cfg)
        print(f"\nDatastore {out / 'wiki-ds'}: {summary['documents']} documents, {summary['chunks']:,} chunks of "
              f"64 tokens, {summary['tokens']:,} tokens, index {summary['index']} "
              f"(recall@10 {summary['recall_at_10']}); {time.perf_counter() - t0:.0f} s\n")
        ds = Datastore.open(out / "wiki-ds")
        for query, hits in zip(QUERIES, ds.search(QUERIES, k=args.k), strict=True):
            print(f"Q: {query}")
            for h in hits:
                text = " ".join(h.text.split())
                print(f"  {h.rank}. {h.score:.3f} [{h.doc_id}] {text[:140]}")
                if h.rank == 1 and h.continuation:
                    print(f"     continuation: {' '.join(h.continuation.split())[:110]}")
            print()
        print(json.dumps({"store": str(out / "wiki-ds"), **ds.info()}, default=str)[:400])
    except RalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
