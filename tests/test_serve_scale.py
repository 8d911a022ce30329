"""benchmarks/serve_scale.py on tiny stores: a store set whose shards live on a local Ray cluster (started on
127.0.0.1 by the fixture of test_ray_executor, stopped by its pid) serves the same top-k as one store over the
same corpus; the fault part kills one of two replicas under load (failover: every request answered) and
restarts the service (drained: nothing lost, back within the window); the disk part reads RSS and recall@10
(an exact index: 1.0); the outcome counting itself on a made-up timeline."""

from __future__ import annotations

import argparse
import sys

import pytest

from bench_module import load_benchmark
from conftest import write_corpus
from ralm.datastore.build import build
from ralm.datastore.store_set import create_store_set
from test_ray_executor import pytestmark, ray_cluster  # noqa: F401  (the skip mark and the cluster fixture)

QS = ["river mountain", "music", "a long question about a city", "stone bridge", "the old king"]


@pytest.fixture(scope="module")
def scale():
    load_benchmark("serve.py", "serve_bench_for_scale")  # puts benchmarks/ on sys.path for its siblings
    return sys.modules["serve_scale"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_tokenizer, tiny_encoder):
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("serve-scale")

    def make(docs, out):
        build(BuildConfig(inputs=[str(d) for d in docs], out=str(out), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(chunk_tokens=16), encoder=EncoderConfig(name=tiny_encoder,
                                                                                          dtype="fp32")),
              progress=False)
        return out

    a = write_corpus(root / "a.jsonl", n_docs=6, seed=1, prefix="a")
    b = write_corpus(root / "b.jsonl", n_docs=6, seed=2, prefix="b")
    one = make([a, b], root / "one")
    create_store_set(root / "set", [make([a], root / "A"), make([b], root / "B")], dedup=False)
    return root, one, root / "set"


def args(root, **kw):
    return argparse.Namespace(**{"seconds": 0.5, "max_requests": 400, "k": 4, "cache_dir": root,
                                 "fault_seconds": 60.0, "settle_s": 1.5, **kw})


def test_outcomes_are_counted_from_the_timeline(scale):
    tl = [(0.0, 0.5, "ok"), (1.0, 1.2, 503), (1.1, 1.4, "lost"), (1.2, 1.3, "refused"), (1.2, 1.3, "dropped"),
          (1.5, 2.0, "ok")]
    o = scale._outcomes(tl, fault_at=1.0)
    assert (o["requests"], o["answered"], o["errors_returned"], o["lost"], o["refused"], o["dropped"]) == \
        (6, 2, 1, 1, 1, 1)
    assert o["recover_s"] == pytest.approx(0.4) and o["answered_after_fault"] == 1 and o["statuses"] == \
        ["503", "dropped", "lost", "refused"]
    assert scale._outcomes([(0.0, 0.1, "ok")], 1.0)["recover_s"] == 0.0  # nothing failed: recovered at once


def test_ray_shards_serve_the_one_store_top_k_and_survive_faults(scale, stores, ray_cluster):  # noqa: F811
    root, one, shards = stores
    r = scale.ray_part(one, shards, QS, args(root, max_requests=40), ray_cluster)
    assert r["same_top10"] == r["queries"] == len(QS) and r["max_score_diff"] < 1e-4 and r["shards"] == 2
    assert r["ray_over_one_store"] > 0 and all(x["errors"] == 0 for v in r["runs"].values() for x in v)
    f = scale.faults_part(one, shards, QS, args(root), ray_cluster)
    killed = f["actor_killed"]
    assert killed["actors"] == 4 and killed["answered_after_fault"] > 0  # 2 shards x 2 replicas; one killed
    assert killed["errors_returned"] == 0 and killed["lost"] == 0  # the shard's other replica answered
    restarted = f["service_restarted"]
    assert restarted["lost"] == 0 and restarted["errors_returned"] == 0  # SIGTERM drained what was in flight
    assert restarted["dropped"] <= 8  # at most the race on each client's idle keep-alive connection
    for fault in (killed, restarted):  # a method's client retried through both: no failed call
        assert fault["method_client"]["calls"] > 1 and fault["method_client"]["failed"] == 0
    assert restarted["answered_after_fault"] > 0 and 0 <= restarted["recover_s"] < 60.0


def test_disk_part_reads_memory_and_recall(scale, stores):
    root, one, _ = stores
    d = scale.disk_part(one, one, QS, args(root))
    for name in ("flat_in_ram", "on_disk"):
        m = d[name]
        assert m["server_peak_rss_mb"] >= m["server_rss_mb_after_warmup"] > 50 and m["keys_mb"] > 0
        assert m["errors"] == 0 and m["store_in_a_process"]["added_peak_mb"] >= 0
        assert m["recall_at_10_vs_exact"] == 1.0  # an exact (Flat) index against exact search of its own keys
