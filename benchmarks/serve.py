"""Retrieval service benchmark (issue 16), loopback only, bounded in count and time.

On one real store (MiniLM keys of real text, built once and cached; ``--store`` to use another):

- ``ralm serve`` started as a subprocess on a free 127.0.0.1 port (stopped by SIGTERM to its own pid), once with
  micro-batching (``--max-batch 64 --max-wait-ms 5``) and once without (``--max-batch 1 --max-wait-ms 0``);
  for 1, 8 and 32 concurrent clients, each sending single-question ``POST /search`` requests for
  ``--seconds`` (at most ``--max-requests`` in all): throughput and p50/p99 latency. Target: with batching at 32
  clients >= 3x the throughput without.
- batch 64: one client sending 64-question requests vs ``Datastore.search_rows`` on the same 64 questions in
  this process, alternated, same run. Target: the service >= 0.8x in-process.

Queries are SQuAD dev questions (texts: the service encodes them, as a method's requests make it). Prints one
JSON object; ratios are measured in the same run, as the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def questions(n: int) -> list[str]:
    squad = json.loads((DATA / "squad_dev_v1.1.json").read_text())
    qs = [q["question"] for a in squad["data"] for p in a["paragraphs"] for q in p["qas"]]
    return qs[:n]


def build_store(cache: Path, docs: int) -> Path:
    """A MiniLM store over the first ``docs`` wiki_en articles (64-token chunks), built once."""
    out = cache / f"wiki-{docs}"
    if (out / "manifest.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    corpus = cache / f"wiki-{docs}.jsonl"
    with open(DATA / "wiki_en.jsonl") as src, open(corpus, "w") as dst:
        for i, line in enumerate(src):
            if i >= docs:
                break
            dst.write(line)
    log(f"building {out} from {docs} wiki_en articles")
    subprocess.run([sys.executable, "-m", "ralm.cli", "build", str(corpus), "--out", str(out), "--encoder",
                    "minilm", "--chunk-tokens", "64", "--quiet"], check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ralm serve STORE`` on a free loopback port, with extra flags; stopped by SIGTERM to its own pid."""

    def __init__(self, store: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "ralm.cli", "serve", str(store), "--host", "127.0.0.1", "--port",
                    str(self.port), *flags]

    def __enter__(self) -> Server:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise SystemExit(f"ralm serve did not start: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(url: str, qs: list[str], clients: int, seconds: float, max_requests: int, k: int,
         batch: int = 1) -> dict:
    """``clients`` threads, each sending ``batch``-question requests back to back until the time or the request
    budget is spent: requests/s, questions/s, p50/p99 latency (ms), errors."""
    import httpx

    lat: list[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        with httpx.Client(timeout=60) as http:
            i = c
            while time.monotonic() < stop:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                body = {"queries": [qs[(i + j) % len(qs)] for j in range(batch)], "k": k}
                i += clients
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/search", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt) if ok else None
                    errors[0] += 0 if ok else 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([np.nan])
    return {"clients": clients, "batch": batch, "requests": len(lat), "errors": errors[0],
            "seconds": round(wall, 2), "requests_per_second": round(len(lat) / wall, 1),
            "questions_per_second": round(len(lat) * batch / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def in_process(ds: Any, qs: list[str], seconds: float, k: int, batch: int) -> dict:
    """``ds.search_rows`` on ``batch`` questions at a time for ``seconds`` (``ds`` already warm)."""
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds.search_rows([qs[(i + j) % len(qs)] for j in range(batch)], k)
        n, i = n + 1, i + batch
    wall = time.perf_counter() - t0
    return {"batch": batch, "requests": n, "questions_per_second": round(n * batch / wall, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--store", type=Path, help="a finished store to serve (default: a wiki_en store, built once)")
    ap.add_argument("--docs", type=int, default=300, help="wiki_en articles in the default store")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent client counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="load per client count and server setting")
    ap.add_argument("--max-requests", type=int, default=2000, help="most requests per load (the bound)")
    ap.add_argument("--questions", type=int, default=2000, help="SQuAD dev questions to cycle through")
    ap.add_argument("-k", type=int, default=10, help="neighbours per question")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache" / "serve", help="where the store is built")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    store = args.store or build_store(args.cache_dir, args.docs)
    qs = questions(args.questions)
    counts = [int(c) for c in args.clients.split(",")]
    settings = {"batched": ("--max-batch", "64", "--max-wait-ms", "5"), "unbatched": ("--max-batch", "1",
                                                                                      "--max-wait-ms", "0")}
    out: dict = {"store": str(store), "k": args.k, "questions": len(qs), "load": {}}
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
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
