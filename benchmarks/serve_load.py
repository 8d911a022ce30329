"""The serve benchmarks' plumbing (benchmarks/serve.py, benchmarks/serve_scale.py): the real store and queries,
``ralm serve`` as a subprocess on a free loopback port (stopped by SIGTERM to its own pid), and loopback clients
bounded in count and time. Nothing here measures by itself."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
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


def wiki_corpus(cache: Path, docs: int) -> Path:
    """The first ``docs`` wiki_en articles as one JSONL file, written once."""
    corpus = cache / f"wiki-{docs}.jsonl"
    if not corpus.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = corpus.with_suffix(".tmp")
        with open(DATA / "wiki_en.jsonl") as src, open(tmp, "w") as dst:
            for i, line in enumerate(src):
                if i >= docs:
                    break
                dst.write(line)
        tmp.replace(corpus)
    return corpus


def build_store(cache: Path, docs: int, name: str | None = None, *flags: str) -> Path:
    """A MiniLM store over the first ``docs`` wiki_en articles (64-token chunks) with extra build flags, built
    once (a finished store has its manifest; a killed build resumes)."""
    out = cache / (name or f"wiki-{docs}")
    if (out / "manifest.json").exists() or (out / "storeset.json").exists():
        return out
    corpus = wiki_corpus(cache, docs)
    log(f"building {out} from {docs} wiki_en articles {' '.join(flags)}")
    subprocess.run([sys.executable, "-m", "ralm.cli", "build", str(corpus), "--out", str(out), "--encoder",
                    "minilm", "--chunk-tokens", "64", "--quiet", *flags], check=True, stdout=sys.stderr)  # stdout: JSON
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory(pid: int) -> dict[str, float]:
    """The process's resident memory in MB from /proc: now (VmRSS, anonymous and file-backed) and its peak."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(val.split()[0]) / 1024, 1)
    return out


class Server:
    """``ralm serve STORE`` on a loopback port (free, or ``port``), with extra flags and environment; stopped by
    SIGTERM to its own pid."""

    def __init__(self, store: Path, *flags: str, env: dict[str, str] | None = None, port: int | None = None,
                 start_timeout_s: float = 180) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env, self.start_timeout_s = env, start_timeout_s
        self.cmd = [sys.executable, "-m", "ralm.cli", "serve", str(store), "--host", "127.0.0.1", "--port",
                    str(self.port), *flags]

    def __enter__(self) -> Server:
        import httpx

        self.started = time.monotonic()
        self.stderr = tempfile.TemporaryFile()  # kept for the error message if it does not start
        self.proc = subprocess.Popen(self.cmd, stderr=self.stderr, stdout=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                self.stderr.seek(0)
                tail = self.stderr.read().decode(errors="replace")[-2000:]
                raise SystemExit(f"ralm serve did not start: {' '.join(self.cmd)}\n{tail}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.ready_s = time.monotonic() - self.started
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)

    def memory(self) -> dict[str, float]:
        return proc_memory(self.proc.pid)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def search(url: str, qs: list[str], k: int, timeout: float = 120) -> dict[str, Any]:
    """One ``POST /search`` of ``qs`` with their chunk texts (``POST /chunks``): ids, scores, texts per query."""
    import httpx

    r = httpx.post(url + "/search", json={"queries": qs, "k": k}, timeout=timeout)
    r.raise_for_status()
    res = r.json()
    rows = sorted({i for row in res["ids"] for i in row if i >= 0})
    texts = {}
    for s in range(0, len(rows), 256):
        c = httpx.post(url + "/chunks", json={"rows": rows[s:s + 256]}, timeout=timeout)
        c.raise_for_status()
        texts.update(zip(rows[s:s + 256], (ch["text"] for ch in c.json()["chunks"]), strict=True))
    res["texts"] = [[texts.get(i) for i in row] for row in res["ids"]]
    return res


def load(url: str, qs: list[str], clients: int, seconds: float, max_requests: int, k: int,
         batch: int = 1, timeline: list | None = None, request_timeout_s: float = 60,
         stop_event: threading.Event | None = None) -> dict:
    """``clients`` threads, each sending ``batch``-question requests back to back until the time or the request
    budget is spent: requests/s, questions/s, p50/p99 latency (ms), errors. ``timeline`` collects
    (sent at, answered at, outcome) per request: 'ok', an HTTP status, 'refused' (no server listening),
    'dropped' (the connection closed or reset under the request) or 'lost' (no HTTP answer in time). ``stop_event``:
    stop sooner, when it is set."""
    import httpx

    lat: list[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        with httpx.Client(timeout=request_timeout_s) as http:
            i = c
            while time.monotonic() < stop and not (stop_event and stop_event.is_set()):
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                body = {"queries": [qs[(i + j) % len(qs)] for j in range(batch)], "k": k}
                i += clients
                t0 = time.perf_counter()
                m0 = time.monotonic()
                try:
                    r = http.post(url + "/search", json=body)
                    outcome: Any = "ok" if r.status_code == 200 else r.status_code
                except httpx.ConnectError:  # nothing listening: the request never left (a client retries)
                    outcome = "refused"
                    time.sleep(0.2)  # a refused connection returns at once: do not spin
                except httpx.TimeoutException:  # sent, and no HTTP answer in time
                    outcome = "lost"
                except httpx.TransportError:  # the connection closed or reset under the request: a stopping
                    outcome = "dropped"  # server's race on an idle keep-alive connection; clients retry these
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt) if outcome == "ok" else None
                    errors[0] += 0 if outcome == "ok" else 1
                    if timeline is not None:
                        timeline.append((m0, time.monotonic(), outcome))

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
