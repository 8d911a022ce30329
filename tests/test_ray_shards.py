"""Issue 16, shards on Ray: a store set whose shards are held by Ray actors on a local cluster (started by the
fixture of test_ray_executor on 127.0.0.1, stopped by its process id) answers exactly as the same set searched
here, a dead replica's searches go to the next (also when it dies during the call), and a shard with no live
actor is one clear error, not a hang.

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


# A shard actor killed while it runs the call: its searches are made slow (DELAY s, a subclass defined in
# __main__, so Ray ships it by value to the workers, put where ray_shards makes its actors), each announced by a
# file named by the actor's pid when it starts, and a thread kills that actor (ray.kill) while the call waits.
MIDCALL = textwrap.dedent("""
    import json, os, sys, threading, time
    from pathlib import Path
    import numpy as np
    import ray
    import ralm.datastore.ray_shards as rs
    from ralm.datastore.store_set import StoreSet
    from ralm.errors import RalmError

    path, address, marks = sys.argv[1:4]
    MARKS, DELAY = Path(marks), 4.0

    class SlowShardActor(rs.ShardActor):
        def search_rows(self, *args):
            (MARKS / str(os.getpid())).write_text("searching")
            time.sleep(DELAY)
            return rs.ShardActor.search_rows(self, *args)

    rs.ShardActor = SlowShardActor
    local = StoreSet.open(path)
    remote = StoreSet.open(path, ray_address=address, replicas=3, timeout_s=30)
    shard = remote.shards[0]
    by_pid = {d["pid"]: a for d, a in zip(ray.get([a.describe.remote() for a in shard.actors]), shard.actors)}
    q = ["music river", local.chunk(2)["text"]]
    D0, I0 = local.search_rows(q, 5)

    def search_killing_the_busy_actor(timeout_s, kill_after=0.0):
        for m in MARKS.iterdir():
            m.unlink()
        shard.timeout_s = timeout_s
        rec, t0 = {}, time.monotonic()

        def kill():
            while not list(MARKS.iterdir()):
                time.sleep(0.02)
            time.sleep(kill_after)
            pid = int(next(MARKS.iterdir()).name)
            ray.kill(by_pid[pid], no_restart=True)
            rec.update(killed=pid, killed_at=time.monotonic() - t0)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        try:
            D, I = remote.search_rows(q, 5)
            rec.update(error=None, same=I.tolist() == I0.tolist() and float(np.abs(D - D0).max()) < 1e-5)
        except RalmError as e:
            rec.update(error=str(e))
        rec["seconds"] = time.monotonic() - t0
        killer.join(10)
        rec["replicas_left"] = len(shard.actors)
        rec["killed_a_replica"] = rec.get("killed") in by_pid
        return rec

    out = {"delay": DELAY}
    out["failover"] = search_killing_the_busy_actor(30)  # 3 replicas: the call goes on to the next
    # killed 2.5 s into the call: the next replica would need DELAY s more, past the 5 s the call has in all
    out["deadline"] = search_killing_the_busy_actor(5, kill_after=2.5)
    ray.get(shard.actors[0].describe.remote(), timeout=60)  # let the survivor finish the abandoned search
    out["last"] = search_killing_the_busy_actor(30)  # the one replica left dies mid-call: nothing to go to
    print(json.dumps(out))
""")


def test_a_shard_actor_killed_mid_request_fails_over_or_errs_in_time(ray_cluster, tmp_path, build_config):  # noqa: F811
    """The call in flight in an actor that is killed goes on to the next replica (right answer), within one
    timeout_s in all (a retry past it is a timeout error, not a longer wait); with no replica left it is the
    one error naming the shard, at once rather than at the timeout."""
    a = write_corpus(tmp_path / "a.jsonl", n_docs=8, seed=1, prefix="a")
    build(build_config([a], tmp_path / "A"), progress=False)
    create_store_set(tmp_path / "set", [tmp_path / "A"], dedup=False)
    (tmp_path / "marks").mkdir()
    env = ray_cluster.client_env(tmp_path / "driver-home")
    r = subprocess.run([sys.executable, "-c", MIDCALL, str(tmp_path / "set"), ray_cluster.address,
                        str(tmp_path / "marks")], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, f"driver failed:\n{r.stderr[-4000:]}\nray start log:\n{ray_cluster.log.read_text()[-2000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])
    delay, fail, dead, last = out["delay"], out["failover"], out["deadline"], out["last"]
    for rec in (fail, dead, last):  # each kill hit a replica while it ran the call
        assert rec["killed_a_replica"] and rec["killed_at"] < rec["seconds"] and rec["killed_at"] < delay, rec
    assert fail["error"] is None and fail["same"] and fail["replicas_left"] == 2, fail
    assert delay < fail["seconds"] < 30, fail  # answered by the next replica, after the first one died
    assert dead["error"] is not None and "no answer from its Ray actor within 5 s" in dead["error"], dead
    assert str(tmp_path / "A") in dead["error"] and 4.5 < dead["seconds"] < 8 and dead["replicas_left"] == 1, dead
    assert last["error"] is not None and "every Ray actor holding it died" in last["error"], last
    assert str(tmp_path / "A") in last["error"] and last["seconds"] < 10 and last["replicas_left"] == 0, last


def test_ray_shards_need_an_address(tmp_path):
    from ralm.datastore.ray_shards import ray_shards
    from ralm.errors import RalmError

    with pytest.raises(RalmError, match="--ray-address is required"):
        ray_shards([tmp_path], "")
    with pytest.raises(RalmError, match="--replicas 0"):
        ray_shards([tmp_path], "127.0.0.1:1", replicas=0)
