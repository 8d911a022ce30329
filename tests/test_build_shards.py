"""`ralm build --shards N`: one corpus split by documents into N stores written as a store set, which searches
as one store of the whole corpus would (same chunks, same scores), with every document in exactly one shard,
same-document exclusion through the set, one-line refusals of bad values that leave no OUT, and a resumable
build (finished shards kept, the set written last)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from badinput import cli_build, fails, no_store, summary_of
from conftest import write_corpus
from ralm.datastore import layout
from ralm.datastore.build import BuildConfig, build
from ralm.datastore.store import Datastore
from ralm.datastore.store_set import FILE, StoreSet
from ralm.errors import RalmError, StoreError
from ralm.serve.client import open_store
from test_store_set import records

N_DOCS = 33


def _corpus(path):
    """30 generated documents, then copies of d0 and d1 under other ids in the next shards (shards 1 and 2 of 3:
    chunks that two shards both hold)."""
    write_corpus(path, n_docs=30, seed=5)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    extra = [{"id": "filler", "text": "Music river mountain. " * 20}, {"id": "copy0", "text": docs[0]["text"]},
             {"id": "copy1", "text": docs[1]["text"]}]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in extra)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_encoder):
    """The same corpus built as one store and as --shards 3, each without and with --dedup."""
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("shards")
    corpus = _corpus(root / "corpus.jsonl")
    out = {}
    for name, shards, dedup in (("one", 1, False), ("three", 3, False), ("one-d", 1, True), ("three-d", 3, True)):
        cfg = BuildConfig(inputs=[str(corpus)], out=str(root / name), tokenizer=tiny_tokenizer, shards=shards,
                          chunking=ChunkingConfig(chunk_tokens=16), shard_docs=4, dedup=dedup,
                          encoder=EncoderConfig(name=tiny_encoder, dtype="fp32"))
        out[name] = (build(cfg, log=lambda m: None, progress=False), root / name)
    return corpus, out


def _queries(store):
    return [store.chunk(r)["text"] for r in (0, 11, len(store) - 1)] + ["music river", "election market energy"]


def assert_same_hits(one, D1, I1, many, D2, I2):  # noqa: E741
    """Scores equal to 1e-5 and, rank by rank, the same chunk texts; tied ranks may come in either order, and a
    tie reaching the cut at k may be cut differently."""
    np.testing.assert_allclose(D2, D1, rtol=0, atol=1e-5)
    k = D1.shape[1]
    for q, (r1, r2) in enumerate(zip(records(one, I1), records(many, I2), strict=True)):
        t1, t2 = [t for _, t in r1], [t for _, t in r2]
        assert len(t1) == len(t2) == k
        j = 0
        while j < k:
            e = j
            while e + 1 < k and abs(D1[q, e + 1] - D1[q, j]) < 1e-5:
                e += 1
            if e == k - 1 and e > j:
                break
            assert sorted(t1[j:e + 1]) == sorted(t2[j:e + 1]), (q, j)
            j = e + 1


@pytest.mark.parametrize("dedup", [False, True])
def test_a_sharded_build_searches_as_one_store(built, dedup):
    _, out = built
    summary, path = out["three-d" if dedup else "three"]
    one = Datastore.open(out["one-d" if dedup else "one"][1])
    ss = open_store(path)
    assert isinstance(ss, StoreSet) and len(ss.shards) == 3 and ss.dedup is dedup
    assert summary["shards"] == 3 and summary["documents"] == N_DOCS == one.manifest["counts"]["documents"]
    assert summary["indexed_chunks"] == len(ss)
    if not dedup:
        assert len(ss) == len(one) and summary["chunks"] == one.manifest["counts"]["chunks"]
    q = _queries(one)
    for k in (1, 5, 10):
        D1, I1 = one.search_rows(q, k)  # noqa: E741
        D2, I2 = ss.search_rows(q, k)  # noqa: E741
        assert_same_hits(one, D1, I1, ss, D2, I2)
    first = one.chunk(0)  # d0's first chunk: copy0 (in the next shard) holds it too
    assert first["doc_id"] == "d0"
    top = [(d, t) for d, t in records(ss, ss.search_rows([first["text"]], 2)[1])[0]]
    if dedup:
        assert top[0] == ("d0", first["text"]) and top[1][1] != first["text"]  # the copy dropped by the set
    else:
        assert sorted(top) == [("copy0", first["text"]), ("d0", first["text"])]
    hits = ss.search(["music river"], k=3)[0]  # every command's path: records and hits through the set
    assert [h.rank for h in hits] == [1, 2, 3] and all(h.text for h in hits)


def test_every_document_lands_in_exactly_one_shard(built):
    corpus, out = built
    _, path = out["three"]
    ids = [json.loads(line)["id"] for line in corpus.read_text().splitlines()]
    shards = layout.shard_paths(path)
    assert [p.name for p in shards] == ["shard-00000", "shard-00001", "shard-00002"]
    held = []
    for i, p in enumerate(shards):
        docs = {d for f in sorted((p / "chunks").glob("*.parquet")) for d in pq.read_table(f, columns=["doc_id"])
                ["doc_id"].to_pylist()}
        assert docs == set(ids[i::3])  # round-robin over the reading order, a document never split
        assert json.loads((p / "manifest.json").read_text())["build"]["params"]["shard_of"] == [i, 3]
        held.append(docs)
    assert sum(len(h) for h in held) == len(ids) and set().union(*held) == set(ids)
    assert json.loads((path / FILE).read_text())["dedup"] is False
    assert "shard_of" not in json.loads((out["one"][1] / "manifest.json").read_text())["build"]["params"]


def test_same_document_exclusion_through_the_set(built):
    _, out = built
    one, ss = Datastore.open(out["one"][1]), open_store(out["three"][1])
    q = ["music river mountain", one.chunk(5)["text"]]
    _, I = ss.search_rows(q, 6)  # noqa: E741
    banned = [{ss.chunk(int(r))["doc_id"] for r in row[:3]} for row in I]
    assert len(set().union(*banned)) >= 2
    D2, I2 = ss.search_rows(q, 6, exclude_doc_ids=banned)  # noqa: E741
    D1, I1 = one.search_rows(q, 6, exclude_doc_ids=banned)  # noqa: E741
    for b, row in zip(banned, records(ss, I2), strict=True):
        assert len(row) == 6 and not b & {d for d, _ in row}
    assert_same_hits(one, D1, I1, ss, D2, I2)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_shards_below_one_is_one_line_and_leaves_nothing(tmp_path, corpus, build_args, value):
    out = tmp_path / "ds"
    fails(cli_build([corpus], out, build_args, "--shards", value), f"--shards {value}: must be >= 1")
    no_store(out)
    assert not out.exists()
    with pytest.raises(RalmError, match=f"--shards {value}: must be >= 1"):
        BuildConfig(inputs=[str(corpus)], out=str(out), shards=int(value))


def test_more_shards_than_documents_is_one_line_and_leaves_nothing(tmp_path, corpus, build_args):
    out = tmp_path / "ds"
    fails(cli_build([corpus], out, build_args, "--shards", "31"), "--shards 31: more shards than documents",
          "only 30 documents")
    assert not out.exists()
    fails(cli_build([corpus], out, build_args, "--shards", "2", "--add"), "--add with --shards 2")
    assert not out.exists()


def test_a_failed_sharded_build_leaves_no_out(tmp_path, corpus, build_args):
    out = tmp_path / "ds"
    fails(cli_build([corpus], out, build_args, "--shards", "2", "--index", "PQ7"), "--index PQ7", only=False)
    assert not out.exists()


def test_cli_sharded_build_search_info_rerun_and_force(tmp_path, corpus, build_args):
    from badinput import runner
    from ralm.cli import app

    out = tmp_path / "ds"
    s = summary_of(cli_build([corpus], out, build_args, "--shards", "3", "--json"))
    assert s["shards"] == 3 and s["documents"] == 30 and s["shard_documents"] == [10, 10, 10]
    r = runner.invoke(app, ["search", str(out), "music river", "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)[0]["hits"]) == 4
    r = runner.invoke(app, ["info", str(out), "--json"])
    assert r.exit_code == 0 and str(out) in r.stdout, r.output
    again = summary_of(cli_build([corpus], out, build_args, "--shards", "3", "--json"))
    assert again["already_complete"] and again["chunks"] == s["chunks"]
    r = cli_build([corpus], out, build_args, "--shards", "3")
    assert r.exit_code == 0 and "a store set of 3 shards" in r.stdout, r.output
    # another layout in the same OUT: refused without --force, rebuilt with it
    fails(cli_build([corpus], out, build_args, "--shards", "2"), "is a store set of 3 shards", "--force")
    fails(cli_build([corpus], out, build_args), "holds a store set of a --shards build", "--force")
    s2 = summary_of(cli_build([corpus], out, build_args, "--shards", "2", "--force", "--json"))
    assert s2["shard_documents"] == [15, 15] and [p.name for p in layout.shard_paths(out)] == \
        ["shard-00000", "shard-00001"]
    assert len(StoreSet.open(out).shards) == 2
    one = summary_of(cli_build([corpus], out, build_args, "--force", "--json"))
    assert "shards" not in one and not layout.shard_paths(out) and not (out / FILE).exists()
    fails(cli_build([corpus], out, build_args, "--shards", "2"), "holds a single store", "--force")


def test_a_killed_sharded_build_resumes(tmp_path, corpus, build_config, monkeypatch):
    import ralm.datastore.build as build_mod

    out = tmp_path / "ds"
    real = build_mod.process_shard

    def dying(task):
        if task.root.endswith("shard-00001"):
            raise KeyboardInterrupt  # killed while building the second shard
        return real(task)

    monkeypatch.setattr(build_mod, "process_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build(build_config([corpus], out, shards=3), log=lambda m: None, progress=False)
    assert (out / "shard-00000" / "manifest.json").exists() and not (out / FILE).exists()
    with pytest.raises(StoreError):
        open_store(out)  # no set yet: nothing opens a half-built one
    monkeypatch.setattr(build_mod, "process_shard", real)
    logs: list[str] = []
    s = build(build_config([corpus], out, shards=3), log=logs.append, progress=False)
    assert s["documents"] == 30 and "already_complete" not in s
    assert any("shard-00000: already complete" in m for m in logs)
    assert len(open_store(out).shards) == 3


def test_near_dup_and_bm25_apply_to_every_shard(tmp_path, build_config):
    """--near-dup is decided once over the whole corpus (a near-duplicate is dropped whichever shard it would go
    to) and the kept documents are dealt round-robin; a BM25 set searches through every shard."""
    from ralm.datastore.dedup import jaccard
    from ralm.datastore.encoders import EncoderConfig

    src = write_corpus(tmp_path / "a.jsonl", n_docs=5, seed=4, words=300)
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    near = " ".join(recs[0]["text"].split()[:-3] + ["zebra", "yak", "xylophone"])
    assert jaccard(recs[0]["text"], near) >= 0.8
    recs.insert(1, {"id": "near0", "text": near})  # ordinal 1: would be shard 1's first document
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    logs: list[str] = []
    cfg = build_config([path], tmp_path / "ds", near_dup=True, shards=2, encoder=EncoderConfig(name="bm25"))
    s = build(cfg, log=logs.append, progress=False)
    assert s["documents"] == 5 and s["skipped"]["near_duplicate_documents"] == 1 and s["shard_documents"] == [3, 2]
    assert sum("finding near-duplicate" in m for m in logs) == 1  # found once, before the shards, not per shard
    held = [{r["doc_id"] for r in pq.read_table(f, columns=["doc_id"]).to_pylist()}
            for p in layout.shard_paths(tmp_path / "ds") for f in sorted((p / "chunks").glob("*.parquet"))]
    assert held == [{"d0", "d2", "d4"}, {"d1", "d3"}]
    ss = open_store(tmp_path / "ds")
    assert ss.sparse and {h.doc_id for h in ss.search([recs[4]["text"][:200]], k=3)[0]} >= {"d3"}
    with pytest.raises(RalmError, match=r"--shards 6: more shards than documents .*only 5 documents after "
                                        "dropping near-duplicates"):
        build(build_config([path], tmp_path / "six", near_dup=True, shards=6), log=lambda m: None, progress=False)
    assert not (tmp_path / "six").exists()
