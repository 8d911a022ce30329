#!/usr/bin/env python
"""Build throughput and memory on real text (issue: datastore benchmarks, item 1).

Claims measured, in one run:
- whole-build chunks/s (reading, LM tokenization, chunking, encoding, writing, indexing, manifest) is
  >= 0.85 of the encoder's raw throughput (tokenize + forward) on the same chunk texts;
- peak RSS building the corpus at 8x size (copies with new ids) is <= 1.3 x the peak at 1x, i.e. memory is
  bounded by the shard, not the corpus.

Each build runs in a fresh subprocess so its peak RSS (VmHWM) is its own. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("RALM_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def worker(corpus: str, out: str, shard_docs: int, raw: bool) -> dict:
    """Build one store and (optionally) time the raw encoder on its chunk texts; runs in a subprocess."""
    import pyarrow.parquet as pq

    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.encoders import EncoderConfig, load_encoder

    t0 = time.perf_counter()
    summary = build(BuildConfig(inputs=[corpus], out=out, shard_docs=shard_docs), progress=False)
    wall = time.perf_counter() - t0
    result = {"chunks": summary["chunks"], "documents": summary["documents"], "build_seconds": round(wall, 2),
              "build_chunks_per_s": round(summary["chunks"] / wall, 2), "encoder_dtype": None,
              # peak of the build alone, before the raw-encoder timing below; VmHWM because Linux carries
              # ru_maxrss across fork + exec (a child would report its parent's peak when that is higher)
              "peak_rss_mb": round(_vm_hwm_kb() / 1024, 1)}
    if raw:
        texts = [t for p in sorted(Path(out, "chunks").glob("*.parquet"))
                 for t in pq.read_table(p, columns=["text"])["text"].to_pylist()]
        enc = load_encoder(EncoderConfig())
        t1 = time.perf_counter()
        enc.encode(texts)
        raw_s = time.perf_counter() - t1
        result.update(raw_encode_seconds=round(raw_s, 2), raw_chunks_per_s=round(len(texts) / raw_s, 2),
                      encoder_dtype=enc.dtype)
    return result


def run_worker(corpus: Path, out: Path, shard_docs: int, raw: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(corpus), "--out", str(out), "--shard-docs", str(shard_docs)]
    if raw:
        cmd.append("--raw")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"build worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_corpus(src: Path, dest: Path, n_docs: int, copies: int) -> None:
    lines = [json.loads(line) for _, line in zip(range(n_docs), open(src, encoding="utf-8"), strict=False)]
    with open(dest, "w", encoding="utf-8") as f:
        for c in range(copies):
            for rec in lines:
                f.write(json.dumps({"id": f"{rec['id']}-copy{c}", "text": rec["text"]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=100, help="Wikipedia articles in the 1x corpus")
    ap.add_argument("--copies", type=int, default=8, help="size multiple of the large corpus")
    ap.add_argument("--shard-docs", type=int, default=50, help="documents per shard")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.out, args.shard_docs, args.raw)))
        return

    wiki = DATA / "wiki_en.jsonl"
    if not wiki.exists():
        sys.exit(f"{wiki}: not found; set RALM_DATA_DIR or run `ralm data get wiki-en`")
    with tempfile.TemporaryDirectory(prefix="ralm-bench-build-") as tmp:
        tmp = Path(tmp)
        write_corpus(wiki, tmp / "x1.jsonl", args.docs, 1)
        write_corpus(wiki, tmp / f"x{args.copies}.jsonl", args.docs, args.copies)
        print(f"building 1x ({args.docs} docs) ...", file=sys.stderr)
        one = run_worker(tmp / "x1.jsonl", tmp / "ds1", args.shard_docs, raw=True)
        print(f"building {args.copies}x ...", file=sys.stderr)
        big = run_worker(tmp / f"x{args.copies}.jsonl", tmp / "ds8", args.shard_docs, raw=False)
    ratio = one["build_chunks_per_s"] / one["raw_chunks_per_s"]
    rss_ratio = big["peak_rss_mb"] / one["peak_rss_mb"]
    print(json.dumps({
        "benchmark": "build", "corpus": f"wiki_en first {args.docs} articles", "nproc": os.cpu_count(),
        "shard_docs": args.shard_docs, "x1": one, f"x{args.copies}": big,
        "targets": {
            "build_vs_raw_encoder_throughput": {"value": round(ratio, 3), "target": ">= 0.85", "pass": ratio >= 0.85},
            f"peak_rss_x{args.copies}_over_x1": {"value": round(rss_ratio, 3), "target": "<= 1.3",
                                                  "pass": rss_ratio <= 1.3},
        },
    }, indent=2))


if __name__ == "__main__":
    main()
