"""The retrieval service's scale-out figures (issue 16), run by benchmarks/serve.py; loopback only.

- ``ray``: a store set of 4 shards of one corpus (``ralm build --shards 4``), its shards held by actors on a
  local Ray cluster (benchmarks/ray_local.py: 127.0.0.1, stopped by pid), served by ``ralm serve --ray-address``,
  vs ``ralm serve`` of one store built over the same corpus: the same top-10 (chunk texts and scores) for the
  same questions, and the throughput ratio (alternated rounds, same load).
- ``disk``: the same corpus built with ``--memory-budget`` below its index + keys, so ``--index auto`` keeps the
  IVF-PQ lists and the fp16 keys on disk (memory-mapped, exact re-rank): the server's peak RSS under load vs the
  files' size, next to serving the in-RAM Flat store; recall@10 vs exact search over the same keys.
- ``faults``: under load (8 clients), one of two replicas of a shard killed (by pid); and the service restarted
  (SIGTERM, a new ``ralm serve`` on the same port): requests answered, errors returned (HTTP), requests lost
  (sent, no HTTP answer), dropped (a keep-alive connection the stopping server closed as the request went
  out), connections refused while nothing listened (clients retry every 0.2 s), and the time to recover (from
  the fault to the end of the last request that failed); and meanwhile what a method's client (``RemoteStore``,
  which retries calls that were not answered) saw: failed calls and its longest call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import ray_local  # sibling: the loopback Ray cluster
from ralm.datastore.store_set import read_store_set
from serve_load import Server, load, log, search

BATCHED = ("--max-batch", "64", "--max-wait-ms", "5")


def _top10_agree(a: dict[str, Any], b: dict[str, Any], tol: float = 1e-4) -> dict[str, Any]:
    """Per query: the same scores (to ``tol``) and the same chunk texts, order aside (ties may swap)."""
    same, diffs = 0, []
    for ta, tb, sa, sb in zip(a["texts"], b["texts"], a["scores"], b["scores"], strict=True):
        d = float(np.max(np.abs(np.sort(sa) - np.sort(sb))))
        diffs.append(d)
        same += int(d <= tol and sorted(ta) == sorted(tb))
    return {"queries": len(diffs), "same_top10": same, "max_score_diff": round(max(diffs), 6)}


def _rounds(servers: dict[str, Server], qs: list[str], args: Any, rounds: int = 2) -> dict[str, Any]:
    """Each server in turn under the same load, ``rounds`` times (a load change hits both)."""
    out: dict[str, list] = {n: [] for n in servers}
    for _ in range(rounds):
        for name, srv in servers.items():
            r = load(srv.url, qs, 8, args.seconds, args.max_requests, args.k)
            log(f"{name}: {r['requests_per_second']} req/s at 8 clients, p99 {r['p99_ms']} ms, {r['errors']} errors")
            out[name].append(r)
    return out


def _driver_env(cluster: ray_local.RayCluster, args: Any) -> dict[str, str]:
    """The service's environment as a Ray driver of ``cluster`` (its token), with the user's HOME (models)."""
    return {**cluster.client_env(args.cache_dir / "ray-driver"), "HOME": str(Path.home())}


def ray_part(one: Path, shards: Path, qs: list[str], args: Any, cluster: ray_local.RayCluster) -> dict[str, Any]:
    env = _driver_env(cluster, args)
    with Server(one, *BATCHED) as local, \
            Server(shards, *BATCHED, "--ray-address", cluster.address, "--replicas", "1", env=env) as on_ray:
        agree = _top10_agree(search(local.url, qs[:100], args.k), search(on_ray.url, qs[:100], args.k))
        log(f"ray: {agree['same_top10']}/{agree['queries']} queries with the same top-{args.k}")
        runs = _rounds({"one_store": local, "ray_shards": on_ray}, qs, args)
    ratios = [b["requests_per_second"] / max(a["requests_per_second"], 1e-9)
              for a, b in zip(runs["one_store"], runs["ray_shards"], strict=True)]
    return {"shards": len(read_store_set(shards)[1]), "replicas": 1, "clients": 8, **agree, "runs": runs,
            "ray_over_one_store": round(float(np.median(ratios)), 3), "ratios": [round(r, 3) for r in ratios]}


def files_mb(store: Path) -> dict[str, float]:
    def mb(paths: list[Path]) -> float:
        return round(sum(p.stat().st_size for p in paths) / 2**20, 2)

    return {"index_mb": mb([p for p in (store / "index").rglob("*") if p.is_file()]),
            "keys_mb": mb(sorted((store / "keys").glob("*.npy")))}


# What the store itself adds to a process, apart from Python, torch and the encoder (which dwarf a small store):
# a fresh process opens the store, loads its index, searches the given query vectors; RSS (and its anonymous and
# file-backed parts) read from /proc at each step.
STORE_PROBE = """
import json, os, sys
import faiss  # noqa: F401  (imported before the first reading: the library's own pages are not the store's)
import numpy as np
import ralm.datastore.index  # noqa: F401
from ralm.datastore.store import Datastore

store, qfile, k, here = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, here)
from serve_load import proc_memory

def mem():
    return proc_memory(os.getpid())

xq = np.load(qfile)
ds = Datastore.open(store)
before = mem()
ds._get_index()
loaded = mem()
for s in range(0, len(xq), 16):
    ds.search_rows(xq[s:s + 16], k)
searched = mem()
print(json.dumps({"before": before, "loaded": loaded, "searched": searched}))
"""


def store_memory(store: Path, qfile: Path, k: int) -> dict[str, float]:
    """``STORE_PROBE`` in a fresh process: MB the index adds at load, and after searching, over the open store."""
    r = subprocess.run([sys.executable, "-c", STORE_PROBE, str(store), str(qfile), str(k),
                        str(Path(__file__).resolve().parent)], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    b = m["before"]
    return {"added_at_load_mb": round(m["loaded"]["VmRSS"] - b["VmRSS"], 1),
            "added_after_search_mb": round(m["searched"]["VmRSS"] - b["VmRSS"], 1),
            "added_peak_mb": round(m["searched"]["VmHWM"] - b["VmRSS"], 1),
            "added_file_backed_mb": round(m["searched"]["RssFile"] - b["RssFile"], 1),
            "added_anonymous_mb": round(m["searched"]["RssAnon"] - b["RssAnon"], 1)}


def disk_part(flat: Path, on_disk: Path, qs: list[str], args: Any) -> dict[str, Any]:
    import httpx

    from ralm.datastore.keys import exact_search, tie_recall
    from ralm.datastore.store import Datastore

    out: dict[str, Any] = {}
    opened = {"flat_in_ram": Datastore.open(flat), "on_disk": Datastore.open(on_disk)}
    xq = opened["on_disk"].encode(qs[:200])  # both stores share the encoder
    qfile = args.cache_dir / "disk-queries.npy"
    np.save(qfile, xq)
    for name, ds in opened.items():
        store = ds.root
        meta = ds.manifest["index"]["meta"]
        out[name] = {"index": meta["factory"], "params": meta.get("params"), "chunks": len(ds), **files_mb(store),
                     "store_in_a_process": store_memory(store, qfile, args.k)}
        with Server(store, *BATCHED) as srv:
            load(srv.url, qs, 1, 1.0, 20, args.k)  # warm: the index is loaded
            before = srv.memory()
            r = load(srv.url, qs, 8, args.seconds, args.max_requests, args.k)
            after = srv.memory()
            out[name].update({"server_rss_mb_after_warmup": before["VmRSS"], "server_peak_rss_mb": after["VmHWM"],
                              "requests_per_second": r["requests_per_second"], "p99_ms": r["p99_ms"],
                              "errors": r["errors"]})
            res = httpx.post(srv.url + "/search", json={"vectors": xq.tolist(), "k": 10}, timeout=120).json()
            keys = ds._keys()  # noqa: SLF001 (the store's own fp16 keys: the ground truth)
            D, I = exact_search(keys, xq, 10, metric=ds.metric)  # noqa: E741
            out[name]["recall_at_10_vs_exact"] = round(tie_recall(keys, xq, np.array(res["ids"]), D, I, ds.metric), 4)
            out[name]["build_recall_at_10"] = meta.get("recall_at_10")  # held-out keys as queries, at build
        log(f"disk {name}: {out[name]}")
    out["budget_mb"] = round(opened["on_disk"].manifest["index"]["meta"]["memory_budget_bytes"] / 2**20, 2)
    f, d = out["flat_in_ram"], out["on_disk"]
    out["on_disk_files_mb"] = round(d["index_mb"] + d["keys_mb"], 2)
    out["store_peak_added_on_disk_over_files"] = round(d["store_in_a_process"]["added_peak_mb"] /
                                                       out["on_disk_files_mb"], 3)
    out["store_peak_added_flat_over_files"] = round(f["store_in_a_process"]["added_peak_mb"] /
                                                    (f["index_mb"] + f["keys_mb"]), 3)
    return out


def _outcomes(timeline: list, fault_at: float) -> dict[str, Any]:
    after = [t for t in timeline if t[1] >= fault_at]
    failed = [t for t in timeline if t[2] != "ok"]
    return {"requests": len(timeline), "answered": sum(t[2] == "ok" for t in timeline),
            "errors_returned": sum(t[2] not in ("ok", "lost", "dropped", "refused") for t in timeline),
            **{k: sum(t[2] == k for t in timeline) for k in ("lost", "dropped", "refused")},
            "statuses": sorted({str(t[2]) for t in failed}),
            "recover_s": round(max((t[1] for t in failed), default=fault_at) - fault_at, 3),
            "answered_after_fault": sum(t[2] == "ok" for t in after)}


def _under_load(url: str, qs: list[str], args: Any, fault, at_s: float) -> dict[str, Any]:
    """8 clients; ``fault()`` runs ``at_s`` seconds in, and the load goes on ``args.settle_s`` after it returns
    (at most ``args.fault_seconds`` in all; every request counts toward the bound): each request's outcome."""
    timeline: list = []
    done = threading.Event()
    t = threading.Thread(target=load, args=(url, qs, 8, args.fault_seconds, 4 * args.max_requests, args.k),
                         kwargs={"timeline": timeline, "request_timeout_s": 30, "stop_event": done})
    method = threading.Thread(target=_method_client, args=(url, qs, args.k, done, seen := {}))
    t.start()
    method.start()
    time.sleep(at_s)
    fault_at = time.monotonic()
    extra = fault() or {}
    time.sleep(args.settle_s)
    done.set()
    t.join()
    method.join()
    return {**_outcomes(timeline, fault_at), **extra, "fault_at_s": at_s, "settle_s": args.settle_s,
            "method_client": seen}


def _method_client(url: str, qs: list[str], k: int, done: threading.Event, seen: dict[str, Any]) -> None:
    """What a method sees meanwhile: ``RemoteStore`` (the ``--datastore URL`` client, which retries calls that
    could not have been answered) searching one question at a time until ``done``."""
    from ralm.errors import RalmError
    from ralm.serve.client import RemoteStore

    remote, n, failed, longest = RemoteStore(url), 0, [], 0.0
    while not done.is_set():
        t0 = time.monotonic()
        try:
            remote.search_rows([qs[n % len(qs)]], k)
        except RalmError as e:
            failed.append(str(e)[:200])
        longest = max(longest, time.monotonic() - t0)
        n += 1
    seen.update(calls=n, failed=len(failed), first_failure=failed[0] if failed else None,
                longest_call_s=round(longest, 2))


def faults_part(one: Path, shards: Path, qs: list[str], args: Any, cluster: ray_local.RayCluster) -> dict[str, Any]:
    out: dict[str, Any] = {}
    before = set(ray_local.actor_pids(cluster, "ShardActor"))  # actors of earlier parts, not this service's
    with Server(shards, *BATCHED, "--ray-address", cluster.address, "--replicas", "2", "--timeout-s", "10",
                env=_driver_env(cluster, args)) as srv:
        load(srv.url, qs, 1, 1.0, 20, args.k)
        pids = sorted(set(ray_local.actor_pids(cluster, "ShardActor")) - before)

        def kill() -> dict[str, Any]:
            os.kill(pids[0], signal.SIGKILL)  # one replica of one shard, by its pid
            return {"actors": len(pids), "killed_pid": pids[0]}

        out["actor_killed"] = {"replicas": 2, **_under_load(srv.url, qs, args, kill, 2.0)}
        log(f"faults, actor killed: {out['actor_killed']}")
    servers = [Server(one, *BATCHED).__enter__()]  # the live one last

    def restart() -> dict[str, Any]:
        servers[-1].__exit__()  # SIGTERM: in-flight requests drain, then it exits
        t0 = time.monotonic()
        servers.append(Server(one, *BATCHED, port=servers[-1].port).__enter__())  # the same port, as a supervisor
        return {"restart_s": round(time.monotonic() - t0, 2)}

    try:
        load(servers[0].url, qs, 1, 1.0, 20, args.k)
        out["service_restarted"] = _under_load(servers[0].url, qs, args, restart, 2.0)
        log(f"faults, service restarted: {out['service_restarted']}")
    finally:
        for srv in servers:
            srv.__exit__()
    return out
