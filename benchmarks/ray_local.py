"""A throw-away single-node Ray cluster on 127.0.0.1 for the tests and benchmarks that need a real one.

``ray start --head --block`` in a new session, bound to 127.0.0.1 only (every port picked free on loopback, no
dashboard, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), with HOME and Ray's temp dir in a throw-away folder and a fresh
auth token. ``stop`` kills that process group (and any worker left in its session) by id, never by name, and
returns what is still alive. Ray itself has no "start a loopback head and stop exactly it" call, hence this.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90


class ClusterError(RuntimeError):
    """The head did not start (the message holds the end of its log)."""


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


def free_ports(n: int) -> list[int]:
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


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def session_pids(sid: int) -> list[int]:
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


def stop(proc: subprocess.Popen) -> list[int]:
    """Stop the head's process group by id (SIGTERM, wait, SIGKILL), then any straggler of its session."""
    sid = proc.pid  # start_new_session=True: pid == pgid == sid
    _kill(sid, signal.SIGTERM, group=True)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    _kill(sid, signal.SIGKILL, group=True)
    for pid in session_pids(sid):  # workers run in their own process groups inside the session
        _kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_pids(sid)


def start(num_cpus: int = 2, object_store_mb: int = 200) -> RayCluster:
    """A head on 127.0.0.1, ready to accept drivers; raises ClusterError (with its log) if it does not come up."""
    root = Path(tempfile.mkdtemp(prefix="ralm-ray-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    for sub in ("home", "tmp", "ray"):
        (root / sub).mkdir()
    (gcs, node_manager, object_manager, client_server, agent, agent_grpc, runtime_env, metrics,
     autoscaler_metrics, dashboard_metrics) = free_ports(10)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(root / "home"), TMPDIR=str(root / "tmp"), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM: stop at once instead of draining 30 s
               # head-only metrics servers default to fixed ports 44217 / 44227 (on loopback, as the node IP is)
               AUTOSCALER_METRIC_PORT=str(autoscaler_metrics), DASHBOARD_METRIC_PORT=str(dashboard_metrics),
               # what the workers (children of the head, with its environment) need for the tiny models
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RALM_CACHE_DIR=os.environ.get("RALM_CACHE_DIR", str(root / "ralm-cache")))
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else sys.executable, *([] if ray_bin.exists() else
                                                                     ["-m", "ray.scripts.scripts"]),
           "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs}",
           f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
           f"--ray-client-server-port={client_server}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--metrics-export-port={metrics}", "--include-dashboard=false", f"--num-cpus={num_cpus}",
           f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={root / 'ray'}",
           "--disable-usage-stats"]
    log = root / "ray-start.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=root)
    cluster = RayCluster(f"{LOOPBACK}:{gcs}", token, proc, root, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        why = None
        if proc.poll() is not None:
            why = f"`ray start` exited with {proc.returncode}"
        elif "Ray runtime started" in log.read_text() and accepts(gcs) and accepts(node_manager):
            return cluster
        elif time.monotonic() > deadline:
            why = f"Ray head not ready after {START_TIMEOUT_S} s"
        if why:
            tail = log.read_text()[-3000:]
            stop(proc)
            shutil.rmtree(root, ignore_errors=True)
            raise ClusterError(f"{why}:\n{tail}")
        time.sleep(0.5)


@contextlib.contextmanager
def local_cluster(num_cpus: int = 2, object_store_mb: int = 200) -> Iterator[RayCluster]:
    """``start``, yield, then ``stop`` by pid; raises ClusterError if a Ray process outlived the stop."""
    cluster = start(num_cpus, object_store_mb)
    try:
        yield cluster
    finally:
        left = stop(cluster.proc)
        shutil.rmtree(cluster.root, ignore_errors=True)
        if left:
            raise ClusterError(f"Ray processes still running after teardown: {left}")


def actor_pids(cluster: RayCluster, actor_class: str) -> list[int]:
    """Pids of the cluster's worker processes running an actor of ``actor_class`` (Ray titles them
    ``ray::<Class>...``): found through the head's own session, so only this cluster's processes."""
    out = []
    for pid in session_pids(cluster.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(f"ray::{actor_class}"):
            out.append(pid)
    return sorted(out)
