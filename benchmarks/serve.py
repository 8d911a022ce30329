"""Retrieval service benchmark (issue 16), loopback only, bounded in count and time.

On real stores (MiniLM keys of wiki_en articles, built once and cached; ``--store`` for the load part's):

- ``ralm serve`` started as a subprocess on a free 127.0.0.1 port (stopped by SIGTERM to its own pid), once with
  micro-batching (``--max-batch 64 --max-wait-ms 5``) and once without (``--max-batch 1 --max-wait-ms 0``);
  for 1, 8 and 32 concurrent clients, each sending single-question ``POST /search`` requests for
  ``--seconds`` (at most ``--max-requests`` in all): throughput and p50/p99 latency. Target: with batching at 32
  clients >= 3x the throughput without.
- batch 64: one client sending 64-question requests vs ``Datastore.search_rows`` on the same 64 questions in
  this process, alternated, same run. Target: the service >= 0.8x in-process.

With ``--parts`` (default all): ``load`` is the two items above; ``ray`` (4 shards on a local Ray cluster vs one
store), ``disk`` (an over-budget store served from memory-mapped files) and ``faults`` (a shard actor killed,
the service restarted, under load) are benchmarks/serve_scale.py's, on the default wiki_en stores.

Queries are SQuAD dev questions (texts: the service encodes them, as a method's requests make it). Prints one
JSON object; ratios are measured in the same run, as the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_local  # noqa: E402  (sibling: the loopback Ray cluster)
import serve_scale  # noqa: E402  (sibling: the Ray, larger-than-memory and fault parts)
from serve_load import HERE, Server, build_store, load, log, questions  # noqa: E402  (sibling: the plumbing)


def in_process(ds: Any, qs: list[str], seconds: float, k: int, batch: int) -> dict:
    """``ds.search_rows`` on ``batch`` questions at a time for ``seconds`` (``ds`` already warm)."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds.search_rows([qs[(i + j) % len(qs)] for j in range(batch)], k)
        n, i = n + 1, i + batch
    wall = time.perf_counter() - t0
    return {"batch": batch, "requests": n, "questions_per_second": round(n * batch / wall, 1)}


def load_part(store: Path, qs: list[str], args: argparse.Namespace) -> dict:
    """Micro-batching at 1/8/32 clients, and batch 64 over HTTP vs in-process."""
    counts = [int(c) for c in args.clients.split(",")]
    settings = {"batched": ("--max-batch", "64", "--max-wait-ms", "5"), "unbatched": ("--max-batch", "1",
                                                                                      "--max-wait-ms", "0")}
    out: dict = {"load": {}}
    for name, flags in settings.items():
        with Server(store, *flags) as srv:
            load(srv.url, qs, 1, 1.0, 20, args.k)  # warm-up: the first requests pay for lazy loads
            out["load"][name] = []
            for c in counts:
                r = load(srv.url, qs, c, args.seconds, args.max_requests, args.k)
                log(f"{name} {c} clients: {r['requests_per_second']} req/s, p50 {r['p50_ms']} ms, "
                    f"p99 {r['p99_ms']} ms, {r['errors']} errors")
                out["load"][name].append(r)
            if name == "batched":  # batch 64 over HTTP vs in this process, alternated twice
                from ralm.datastore.store import Datastore

                ds = Datastore.open(store)
                ds.search_rows(qs[:64], args.k)  # warm: index and encoder loaded
                rounds = []
                for _ in range(2):
                    svc = load(srv.url, qs, 1, args.seconds / 2, args.max_requests, args.k, batch=64)
                    local = in_process(ds, qs, args.seconds / 2, args.k, 64)
                    rounds.append(svc["questions_per_second"] / max(local["questions_per_second"], 1e-9))
                    log(f"batch 64: service {svc['questions_per_second']} q/s, in-process "
                        f"{local['questions_per_second']} q/s")
                out["batch64"] = {"service_over_in_process": round(float(np.median(rounds)), 3),
                                  "rounds": [round(r, 3) for r in rounds], "target": ">= 0.8"}
    top = max(counts)
    b = next(r for r in out["load"]["batched"] if r["clients"] == top)["requests_per_second"]
    u = next(r for r in out["load"]["unbatched"] if r["clients"] == top)["requests_per_second"]
    out["micro_batching"] = {"clients": top, "batched_over_unbatched": round(b / max(u, 1e-9), 2),
                             "target": ">= 3"}
    return out


PARTS = ("load", "ray", "disk", "faults")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--store", type=Path, help="a finished store for the load part (default: the wiki_en store, "
                    "built once)")
    ap.add_argument("--docs", type=int, default=300, help="wiki_en articles in the stores built here")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per client count and server setting")
    ap.add_argument("--fault-seconds", type=float, default=90.0, help="most seconds of load around each fault "
                    "(a restarted service must come back within it)")
    ap.add_argument("--settle-s", type=float, default=5.0, help="load kept on after a fault was dealt with")
    ap.add_argument("--max-requests", type=int, default=2000, help="most requests per load (the bound)")
    ap.add_argument("--questions", type=int, default=2000, help="SQuAD dev questions to cycle through")
    ap.add_argument("-k", type=int, default=10, help="neighbours per question")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache" / "serve", help="where the stores are built")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if bad := sorted(set(parts) - set(PARTS)):
        ap.error(f"--parts {bad[0]!r}: choose from {', '.join(PARTS)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    qs = questions(args.questions)
    one = build_store(args.cache_dir, args.docs) if set(parts) - {"load"} or not args.store else None
    out: dict = {"k": args.k, "questions": len(qs), "docs": args.docs}
    if "load" in parts:
        out["store"] = str(args.store or one)
        out.update(load_part(args.store or one, qs, args))
    if {"ray", "faults"} & set(parts):
        shards = build_store(args.cache_dir, args.docs, f"wiki-{args.docs}-4-shards", "--shards", "4")
    if "disk" in parts:
        f = serve_scale.files_mb(one)
        budget = f"{max(0.25, (f['index_mb'] + f['keys_mb']) / 4):.2f}MB"  # a quarter of what Flat holds
        on_disk = build_store(args.cache_dir, args.docs, f"wiki-{args.docs}-on-disk", "--memory-budget", budget)
        out["disk"] = serve_scale.disk_part(one, on_disk, qs, args)
    if {"ray", "faults"} & set(parts):
        with ray_local.local_cluster(num_cpus=2) as cluster:  # 127.0.0.1, stopped by its pid
            if "ray" in parts:
                out["ray"] = serve_scale.ray_part(one, shards, qs, args, cluster)
            if "faults" in parts:
                out["faults"] = serve_scale.faults_part(one, shards, qs, args, cluster)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
