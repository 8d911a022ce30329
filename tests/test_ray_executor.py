"""`--executor ray` on a real local Ray cluster: same chunks, keys and search results as a local build.

The module fixture starts its own head with ``ray start --head --block`` in a new session, bound to
127.0.0.1 only (every port picked free on loopback, no dashboard, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0),
with HOME and Ray's temp dir in a throw-away folder and a fresh auth token. Teardown kills that process
group (and any worker left in its session) by id, never by name, and checks that nothing is left.

The Ray build runs the ``ralm build`` CLI in a driver subprocess (so this pytest process never imports
Ray), with the token in RAY_AUTH_TOKEN and RAY_AUTH_MODE left unset: the executor must set it itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_corpus
from ralm.errors import RalmError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'ralm[ray]'); "
                                       "the Ray executor test needs it to start a local cluster")

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90
CHUNK_COLUMNS = ["chunk_id", "doc_id", "domain", "position", "char_start", "text", "tokens", "continuation"]


@dataclass
class RayCluster:
    address: str
    token: str
    proc: subprocess.Popen
    root: Path
    log: Path

    def client_env(self, home: Path) -> dict[str, str]:
        """Environment of a driver: own HOME (the token travels in RAY_AUTH_TOKEN), loopback only."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
        home.mkdir(parents=True, exist_ok=True)
        env.update(HOME=str(home), RAY_AUTH_TOKEN=self.token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   RAY_USAGE_STATS_ENABLED="0", TMPDIR=str(self.root / "tmp"))
        return env


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 (all sockets held open until every port is picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``: the head's group plus workers in their own groups."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> list[int]:
    """Stop the head's process group by id (SIGTERM, wait, SIGKILL), then any straggler of its session."""
    sid = proc.pid  # start_new_session=True: pid == pgid == sid
    _kill(sid, signal.SIGTERM, group=True)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill(sid, signal.SIGKILL, group=True)
    for pid in _session_pids(sid):  # workers run in their own process groups inside the session
        _kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _session_pids(sid)


@pytest.fixture(scope="module")
def ray_cluster():
    root = Path(tempfile.mkdtemp(prefix="ralm-ray-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    for sub in ("home", "tmp", "ray"):
        (root / sub).mkdir()
    (gcs, node_manager, object_manager, client_server, agent, agent_grpc, runtime_env, metrics,
     autoscaler_metrics, dashboard_metrics) = _free_ports(10)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop at once instead of draining 30 s
               # head-only metrics servers default to fixed ports 44217 / 44227 (on loopback, as the node IP is)
               AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics),
               # what the workers (children of the head, with its environment) need for the tiny models
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RALM_CACHE_DIR=str(root / "ralm-cache"))
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else sys.executable, *([] if ray_bin.exists() else
                                                                     ["-m", "ray.scripts.scripts"]),
           "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--metrics-export-port={metrics}", "--include-dashboard=false", "--num-cpus=2",
           f"--object-store-memory={200 * 1024 * 1024}", f"--temp-dir={root / 'ray'}", "--disable-usage-stats"]
    log = root / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root)
    cluster = RayCluster(f"{LOOPBACK}:{gcs}", token, proc, root, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if "Ray runtime started" in log.read_text() and _accepts(gcs) and _accepts(node_manager):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Ray head not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        left = _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes still running after teardown: {left}"


# The driver: the `ralm build` CLI, with the shard step wrapped so each task also records the pid that ran it.
# The wrapper lives in __main__, so Ray ships it by value to the workers.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import ralm.datastore.build as build_mod
    from ralm.cli import main
    from ralm.datastore.shard import process_shard

    TRACE = Path(os.environ["RALM_TEST_TRACE"])

    def traced_process_shard(task):
        record = process_shard(task)
        (TRACE / f"part-{task.part}.json").write_text(json.dumps({"pid": os.getpid()}))
        return record

    build_mod.process_shard = traced_process_shard
    (TRACE / "driver.json").write_text(json.dumps({"pid": os.getpid()}))
    sys.argv = ["ralm", *sys.argv[1:]]
    main()
""")


def _chunks(root: Path) -> list[dict]:
    return [pq.read_table(p, columns=CHUNK_COLUMNS).to_pydict() for p in sorted((root / "chunks").glob("*.parquet"))]


def _keys(root: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted((root / "keys").glob("*.npy"))]


def test_ray_build_equals_local_build(ray_cluster, tmp_path, build_config, build_args):
    from ralm import Datastore
    from ralm.datastore.build import build

    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=40, seed=3)
    build(build_config([corpus], tmp_path / "local", shard_docs=5), progress=False)

    trace = tmp_path / "trace"
    trace.mkdir()
    env = ray_cluster.client_env(tmp_path / "driver-home")
    env["RALM_TEST_TRACE"] = str(trace)
    cmd = [sys.executable, "-c", DRIVER, "build", str(corpus), "--out", str(tmp_path / "ray"), *build_args,
           "--shard-docs", "5", "--executor", "ray", "--ray-address", ray_cluster.address, "--json"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, f"ray build failed:\n{r.stderr[-4000:]}\nray start log:\n" \
                              f"{ray_cluster.log.read_text()[-2000:]}"
    summary = json.loads(r.stdout)

    # every shard ran as a Ray task in a worker process, not in the driver
    driver_pid = json.loads((trace / "driver.json").read_text())["pid"]
    task_pids = {p.name: json.loads(p.read_text())["pid"] for p in trace.glob("part-*.json")}
    assert sorted(task_pids) == [f"part-{i}.json" for i in range(8)]
    assert driver_pid not in task_pids.values()

    local, ray = tmp_path / "local", tmp_path / "ray"
    m_local = json.loads((local / "manifest.json").read_text())
    m_ray = json.loads((ray / "manifest.json").read_text())
    assert m_ray["counts"] == m_local["counts"]
    assert m_ray["counts"]["documents"] == summary["documents"] == 40
    assert m_ray["build"]["params"] == m_local["build"]["params"]
    assert [(p["part"], p["documents"], p["chunks"], p["tokens"]) for p in m_ray["parts"]] == \
           [(p["part"], p["documents"], p["chunks"], p["tokens"]) for p in m_local["parts"]]
    assert len(m_ray["parts"]) == 8

    chunks_local, chunks_ray = _chunks(local), _chunks(ray)
    assert len(chunks_ray) == len(chunks_local) == 8
    for a, b in zip(chunks_local, chunks_ray, strict=True):
        assert a == b  # chunk ids, doc ids, positions, text, tokens, continuations: identical

    keys_local, keys_ray = _keys(local), _keys(ray)
    assert len(keys_ray) == len(keys_local) == 8
    for a, b in zip(keys_local, keys_ray, strict=True):
        assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=0, atol=2e-3)

    queries = ["alpha beta gamma river", "music ocean planet", "election market energy", "winter garden"]
    hits_local = Datastore.open(local, verify=True).search(queries, k=5)
    hits_ray = Datastore.open(ray, verify=True).search(queries, k=5)
    for hl, hr in zip(hits_local, hits_ray, strict=True):
        assert [h.chunk_id for h in hr] == [h.chunk_id for h in hl]
        assert [h.text for h in hr] == [h.text for h in hl]
        np.testing.assert_allclose([h.score for h in hr], [h.score for h in hl], rtol=0, atol=2e-3)

    # the executor's close() only disconnected the driver: the cluster is still up
    assert ray_cluster.proc.poll() is None
    assert _accepts(int(ray_cluster.address.rsplit(":", 1)[1]))


def test_ray_cluster_only_on_loopback(ray_cluster):
    import psutil

    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    for pid in _session_pids(ray_cluster.proc.pid):
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for c in conns:
            assert c.laddr.ip in loopback, f"pid {pid} bound {c.laddr} ({c.status})"
            if c.raddr:
                assert c.raddr.ip in loopback, f"pid {pid} talks to {c.raddr}"


def test_ray_executor_requires_an_address():
    from ralm.datastore.executors import make_executor

    for address in (None, ""):
        with pytest.raises(RalmError, match="--ray-address is required with --executor ray"):
            make_executor("ray", address)
