"""`--executor ray` on a real local Ray cluster: same chunks, keys and search results as a local build.

The module fixture starts its own head (benchmarks/ray_local.py: ``ray start --head --block`` in a new session,
bound to 127.0.0.1 only, a throw-away HOME and temp dir, a fresh auth token); teardown kills that process group
(and any worker left in its session) by id, never by name, and fails if anything is left.

The Ray build runs the ``ralm build`` CLI in a driver subprocess (so this pytest process never imports
Ray), with the token in RAY_AUTH_TOKEN and RAY_AUTH_MODE left unset: the executor must set it itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench_module import load_benchmark
from conftest import write_corpus
from ralm.errors import RalmError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'ralm[ray]'); "
                                       "the Ray executor test needs it to start a local cluster")

ray_local = load_benchmark("ray_local.py", "ray_local")  # the loopback cluster, shared with benchmarks/serve.py
CHUNK_COLUMNS = ["chunk_id", "doc_id", "domain", "position", "char_start", "text", "tokens", "continuation"]


@pytest.fixture(scope="module")
def ray_cluster():
    try:
        with ray_local.local_cluster(num_cpus=2) as cluster:
            yield cluster
    except ray_local.ClusterError as e:
        pytest.fail(str(e))


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
    assert ray_local.accepts(int(ray_cluster.address.rsplit(":", 1)[1]))


def test_ray_cluster_only_on_loopback(ray_cluster):
    import psutil

    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    for pid in ray_local.session_pids(ray_cluster.proc.pid):
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
