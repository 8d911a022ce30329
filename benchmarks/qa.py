#!/usr/bin/env python
"""Open-book vs closed-book question answering on SQuAD v1.1 dev with the default LM.

Claim measured: with the gold-paragraph store (every SQuAD dev paragraph, encoded with the default
encoder, chunked with the LM's tokenizer into 256-token passages without continuations), retrieving
--docs passage(s) per question and putting them in the prompt raises SQuAD F1 of the default LM
(smollm2-135m, an instruct model) by at least --target-gain points over answering the same questions
closed book. Also reported: EM, recall@1 and recall@K of the gold paragraph, and throughput.

The store is built once under benchmarks/.cache/ (``ralm.datastore.build``; a rerun finds it complete).
The questions are a fixed-seed random sample of --limit (default 500) dev questions. Prints one JSON
object; exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_DIR = Path(os.environ.get("RALM_DATA_DIR", HERE.parent.parent / "shared" / "data"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_store(squad: Path, out: Path, tokenizer: str, chunk_tokens: int, progress: bool) -> dict:
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.chunking import ChunkingConfig

    cfg = BuildConfig(inputs=[str(squad)], out=str(out), tokenizer=tokenizer,
                      chunking=ChunkingConfig(chunk_tokens=chunk_tokens, continuation=False))
    return build(cfg, log=log, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR / "squad_dev_v1.1.json", help="SQuAD v1.1 dev file")
    ap.add_argument("--model", default="smollm2-135m", help="LM (and store tokenizer)")
    ap.add_argument("--limit", type=int, default=500, help="questions sampled (fixed seed)")
    ap.add_argument("--seed", type=int, default=0, help="sample seed")
    ap.add_argument("--docs", type=int, default=1, help="passages retrieved per question (K)")
    ap.add_argument("--recall-k", type=int, default=5, help="also report gold-paragraph recall at this depth")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="passage length in LM tokens")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); on a machine shared with other jobs 1 is "
                         "much faster than oversubscribed threads")
    ap.add_argument("--target-gain", type=float, default=10.0, help="required open - closed F1 (points)")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="where the store is built")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data}: no such file (set RALM_DATA_DIR or --data)", file=sys.stderr)
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ralm.data.squad import load_squad
    from ralm.datastore.store import Datastore
    from ralm.eval.qa import EvalQAConfig, recall_at_k, run_eval_qa, select_questions

    store = args.cache_dir / f"squad-dev-{args.model}-minilm-{args.chunk_tokens}"
    t0 = time.perf_counter()
    summary = build_store(args.data, store, args.model, args.chunk_tokens, not args.quiet)
    build_s = time.perf_counter() - t0
    log(f"store {store}: {summary['documents']} paragraphs, {summary['chunks']} chunks")

    # recall at a deeper K than the prompt uses (retrieval only; the same sample as the evaluation)
    questions = select_questions(load_squad(args.data), args.limit, args.seed)
    depth = max(args.recall_k, args.docs)
    hits = Datastore.open(store).search([q.question for q in questions], k=depth)
    hit_ids = [[h.doc_id for h in per_q] for per_q in hits]
    gold = [q.paragraph_id for q in questions]
    recall = {str(k): recall_at_k(gold, hit_ids, k) for k in sorted({1, args.docs, depth})}

    log(f"evaluating {len(questions)} questions closed book and open book with {args.model}")
    r = run_eval_qa(EvalQAConfig(data=str(args.data), model=args.model, datastore=str(store), docs=args.docs,
                                 limit=args.limit, seed=args.seed, batch_size=args.batch_size),
                    progress=not args.quiet)
    assert r["recall_at_k"] == recall[str(args.docs)]  # the evaluation's own retrieval agrees
    gain = r["f1_gain"]
    out = {
        "benchmark": "qa", "data": args.data.name, "model": args.model, "questions": r["n"], "seed": args.seed,
        "store": {"paragraphs": summary["documents"], "chunks": summary["chunks"], "encoder": "minilm",
                  "chunk_tokens": args.chunk_tokens, "continuation": False,
                  "build_seconds": round(build_s, 1), "already_built": bool(summary.get("already_complete"))},
        "docs_in_prompt": args.docs, "prompt_style": r["prompt_style"],
        "closed_book": {k: round(v, 2) for k, v in r["closed_book"].items()},
        "open_book": {k: round(v, 2) for k, v in r["open_book"].items()},
        "f1_gain": round(gain, 2),
        "recall_at": recall,
        "open_book_questions_per_second": r["questions_per_second"],
        "eval_seconds": r["seconds"], "torch_threads": torch.get_num_threads(),
        "target": f"open-book F1 >= closed-book F1 + {args.target_gain:g}",
        "pass": gain >= args.target_gain,
        "examples": r["examples"],
    }
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
