#!/usr/bin/env python
"""The quick-start demo (the main job): real corpus -> datastores -> the default LM with and without retrieval.

1. Fetches BBC News articles with `ralm data get bbc-news` (from ``$RALM_DATA_DIR`` when already there) and
   splits them: held-out test and validation articles, the rest is the corpus.
2. Builds a retrieval store (64-token chunks + continuations, MiniLM keys, FAISS) of ``--store-docs``
   articles and a kNN-LM store (SmolLM2 hidden states at every position) of ``--knn-docs`` articles.
3. Evaluates SmolLM2-135M on the held-out articles with no retrieval, In-Context RALM and kNN-LM (λ chosen
   on the validation articles), all on the same scored tokens, and prints a table of perplexity and bits
   per byte, then the passage retrieved for one block of a held-out article.

Reruns reuse the finished stores. Everything runs on CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def split_corpus(src: Path, out: Path, n_store: int, n_test: int, n_valid: int) -> tuple[Path, Path, Path]:
    """Held-out articles from the end of the file (mid-length ones), the store from its start."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    tail = [line for line in lines[-400:] if 1500 <= len(json.loads(line)["text"]) <= 2500]
    paths = out / "store.jsonl", out / "test.jsonl", out / "valid.jsonl"
    for path, chosen in zip(paths, (lines[:n_store], tail[:n_test], tail[n_test:n_test + n_valid]), strict=True):
        if not path.exists():
            path.write_text("".join(chosen), encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="folder for the corpus splits, the stores and results")
    ap.add_argument("--store-docs", type=int, default=300, help="articles in the retrieval store")
    ap.add_argument("--knn-docs", type=int, default=40, help="articles in the kNN-LM store (one key per token)")
    ap.add_argument("--test-docs", type=int, default=2, help="held-out articles evaluated")
    ap.add_argument("--context", type=int, default=256, help="LM context for every method")
    ap.add_argument("--stride", type=int, default=32, help="In-Context RALM: tokens scored between retrievals")
    args = ap.parse_args()

    from ralm import RalmError
    from ralm.data import registry
    from ralm.data.corpus import CorpusConfig
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.index import IndexConfig
    from ralm.datastore.knn_store import KNNBuildConfig, build_knn_store
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig, run_eval_lm
    from ralm.lm.in_context import InContextConfig
    from ralm.lm.models import load

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        bbc = registry.get("bbc-news", log=lambda m: print(m, file=sys.stderr))
        store_file, test_file, valid_file = split_corpus(bbc, out, args.store_docs, args.test_docs, 2)
        ds, knn = out / "bbc-ds", out / "bbc-knn"
        s = build(BuildConfig(inputs=[str(store_file)], out=str(ds), corpus=CorpusConfig(domain="news"),
                              shard_docs=100))
        print(f"retrieval store {ds}: {s['documents']} articles, {s['chunks']:,} chunks, index {s['index']}",
              file=sys.stderr)
        knn_corpus = out / "knn-store.jsonl"
        if not knn_corpus.exists():
            knn_corpus.write_text("".join(store_file.read_text(encoding="utf-8").splitlines(True)[:args.knn_docs]),
                                  encoding="utf-8")
        k = build_knn_store(KNNBuildConfig([str(knn_corpus)], str(knn), context=args.context,
                                           index=IndexConfig("flat", metric="l2")))
        print(f"kNN-LM store {knn}: {k['keys']:,} keys of dim {k['dim']}", file=sys.stderr)

        lm = load("smollm2-135m")
        base = dict(model="smollm2-135m", data=[str(test_file)], lm=LMEvalConfig(context=args.context))
        rows = [("none", run_eval_lm(EvalLMConfig(method="none", **base), loaded=lm), "")]
        ic = run_eval_lm(EvalLMConfig(method="in-context", datastore=str(ds),
                                      in_context=InContextConfig(stride=args.stride), **base), loaded=lm)
        rows.append(("in-context RALM", ic, f"{s['chunks']:,} chunks, stride {args.stride}, top-1 passage"))
        kn = run_eval_lm(EvalLMConfig(method="knn-lm", datastore=str(knn), validation=[str(valid_file)], **base),
                         loaded=lm)
        rows.append(("kNN-LM", kn, f"{k['keys']:,} keys, k {kn['k']}, λ {kn['lmbda']} (chosen on validation)"))

        tokens, n_bytes = rows[0][1]["tokens"], rows[0][1]["bytes"]
        print(f"\nSmolLM2-135M on {args.test_docs} held-out BBC articles ({tokens:,} tokens, {n_bytes:,} bytes; "
              f"context {args.context}; neighbours from the evaluated article excluded)\n")
        print("| method | perplexity | bits per byte | tokens/s | store |")
        print("|---|---:|---:|---:|---|")
        for name, r, note in rows:
            print(f"| {name} | {r['ppl']:.2f} | {r['bpb']:.4f} | {r['tokens_per_second']} | {note} |")
        _show_neighbour(ds, test_file, args.stride)
        results = {name: {k: r[k] for k in ("ppl", "bpb", "tokens", "bytes", "tokens_per_second")}
                   for name, r, _ in rows}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults: {out / 'results.json'}; {time.perf_counter() - t_start:.0f} s in all")
    except RalmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _show_neighbour(ds_path: Path, test_file: Path, stride: int) -> None:
    """The passage In-Context RALM retrieves for one block of the first held-out article."""
    from ralm import Datastore
    from ralm.data.corpus import CorpusConfig, iter_documents
    from ralm.lm.presets import load_tokenizer

    doc = next(iter_documents([str(test_file)], CorpusConfig()))
    tok = load_tokenizer("smollm2-135m")
    ids = tok(doc.text, add_special_tokens=False)["input_ids"]
    at = min(len(ids), 4 * stride)
    query = tok.decode(ids[max(0, at - 32):at])
    hit = Datastore.open(ds_path).search([query], k=1, exclude_doc_ids={doc.id})[0][0]
    print(f"\nquery (the 32 tokens before position {at} of {doc.id}): {' '.join(query.split())!r}")
    print(f"top passage ({hit.score:.3f}, {hit.doc_id}): {' '.join(hit.text.split())[:200]}")
    print(f"  its continuation: {' '.join(hit.continuation.split())[:160]}")
    print(f"what the article says next: {' '.join(tok.decode(ids[at:at + 32]).split())!r}")


if __name__ == "__main__":
    main()
