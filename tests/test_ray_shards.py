"""Issue 16, shards on Ray: a store set whose shards are held by Ray actors on a local cluster (started by the
fixture of test_ray_executor on 127.0.0.1, stopped by its process id) answers exactly as the same set searched
here, a dead replica's searches go to the next, and a shard with no live actor is one clear error, not a hang.

The driver runs in a subprocess, so this pytest process never imports Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import write_corpus
from ralm.datastore.build import build
from ralm.datastore.store_set import create_store_set
from test_ray_executor import pytestmark, ray_cluster  # noqa: F401  (the skip mark and the cluster fixture)

DRIVER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import ray
    from ralm.datastore.store_set import StoreSet
    from ralm.errors import RalmError

    path, address = sys.argv[1:3]
    local = StoreSet.open(path)
    remote = StoreSet.open(path, ray_address=address, replicas=2, timeout_s=20)
    q = ["music river", local.chunk(3)["text"], local.chunk(len(local) - 1)["text"]]
    D1, I1 = local.search_rows(q, 8, exclude_doc_ids={"a2"})
    D2, I2 = remote.search_rows(q, 8, exclude_doc_ids={"a2"})
    rows = np.arange(0, len(local), 2)
    out = {"ids": I1.tolist() == I2.tolist(), "scores": float(np.abs(D1 - D2).max()),
           "texts": [r["text"] for r in local.chunks(I1[1].tolist())] == [r["text"] for r in remote.chunks(I2[1].tolist())],
           "restricted": local.restrict(rows).search_rows(q, 5)[1].tolist()
                         == remote.restrict(rows).search_rows(q, 5)[1].tolist(),
           "actor_pids": [a.describe.remote() for a in remote.shards[0].actors] and
                         [d["pid"] for d in ray.get([a.describe.remote() for a in remote.shards[0].actors])]}
    shard = remote.shards[0]
    ray.kill(shard.actors[0])
    same = [remote.search_rows(q, 8, exclude_doc_ids={"a2"})[1].tolist() == I1.tolist() for _ in range(3)]
    out["after_one_killed"] = same
    out["replicas_left"] = len(shard.actors)
    ray.kill(shard.actors[0])
    t0 = time.monotonic()
    try:
        remote.search_rows(q, 8)
        out["error"] = None
    except RalmError as e:
        out["error"] = str(e)
    out["error_seconds"] = time.monotonic() - t0
    print(json.dumps(out))
""")


def test_ray_shards_equal_local_shards(ray_cluster, tmp_path, build_config):  # noqa: F811
    a = write_corpus(tmp_path / "a.jsonl", n_docs=8, seed=1, prefix="a")
    b = write_corpus(tmp_path / "b.jsonl", n_docs=8, seed=2, prefix="b")
    build(build_config([a], tmp_path / "A"), progress=False)
    build(build_config([b], tmp_path / "B"), progress=False)
    create_store_set(tmp_path / "set", [tmp_path / "A", tmp_path / "B"])
    env = ray_cluster.client_env(tmp_path / "driver-home")
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "set"), ray_cluster.address], env=env,
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, f"driver failed:\n{r.stderr[-4000:]}\nray start log:\n{ray_cluster.log.read_text()[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ids"] and out["scores"] < 1e-5 and out["texts"] and out["restricted"]
    assert len(set(out["actor_pids"])) == 2  # two replicas, two processes
    assert out["after_one_killed"] == [True, True, True] and out["replicas_left"] == 1
    assert out["error"] is not None and "every Ray actor holding it died" in out["error"]
    assert str(tmp_path / "A") in out["error"] and out["error_seconds"] < 20


def test_ray_shards_need_an_address(tmp_path):
    from ralm.datastore.ray_shards import ray_shards
    from ralm.errors import RalmError

    with pytest.raises(RalmError, match="--ray-address is required"):
        ray_shards([tmp_path], "")
    with pytest.raises(RalmError, match="--replicas 0"):
        ray_shards([tmp_path], "127.0.0.1:1", replicas=0)
