"""--add appends without re-encoding; --dedup / --near-dup drop duplicates; domains are tagged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_corpus
from ralm import Datastore
from ralm.data.corpus import CorpusConfig
from ralm.datastore.build import build
from ralm.datastore.dedup import jaccard, near_duplicate_ordinals


def test_add_appends_new_domain_without_touching_old_parts(tmp_path, build_config):
    a = write_corpus(tmp_path / "a.jsonl", n_docs=12, seed=1, prefix="a")
    b = write_corpus(tmp_path / "b.jsonl", n_docs=8, seed=2, prefix="b")
    ds_path = tmp_path / "ds"
    first = build(build_config([a], ds_path, shard_docs=5, corpus=CorpusConfig(domain="wiki")), progress=False)
    old_parts = {p: p.stat().st_mtime_ns for p in (ds_path / "keys").glob("*.npy")}
    old_index = json.loads((ds_path / "manifest.json").read_text())["index"]["path"]
    second = build(build_config([b], ds_path, shard_docs=5, add=True, corpus=CorpusConfig(domain="news")),
                   progress=False)
    assert second["documents"] == 20 and second["appended_documents"] == 8
    assert second["chunks"] > first["chunks"]
    # old key parts were neither rewritten nor re-encoded
    assert {p: p.stat().st_mtime_ns for p in old_parts} == old_parts
    ds = Datastore.open(ds_path, verify=True)
    assert set(ds.info()["domains"]) == {"wiki", "news"}
    assert ds.manifest["index"]["path"] != old_index and not (ds_path / old_index).exists()
    hits = ds.search(["alpha"], k=len(ds))[0]
    assert {h.domain for h in hits} == {"wiki", "news"}
    assert {h.doc_id[0] for h in hits} == {"a", "b"}


def test_add_refuses_other_chunking(tmp_path, build_config):
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.errors import RalmError

    a = write_corpus(tmp_path / "a.jsonl", n_docs=4)
    build(build_config([a], tmp_path / "ds"), progress=False)
    with pytest.raises(RalmError, match="chunking"):
        build(build_config([a], tmp_path / "ds", add=True, chunking=ChunkingConfig(chunk_tokens=32)), progress=False)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "bm25"])
def test_dedup_drops_exact_duplicate_chunks(tmp_path, build_config, sparse):
    from ralm.datastore.encoders import EncoderConfig

    extra = {"encoder": EncoderConfig(name="bm25")} if sparse else {}
    src = write_corpus(tmp_path / "a.jsonl", n_docs=6, seed=3)
    lines = src.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    # the same texts again under new ids: every chunk is an exact duplicate of an earlier one
    dup.write_text("\n".join(lines + [json.dumps({**json.loads(x), "id": json.loads(x)["id"] + "-copy"})
                                      for x in lines]) + "\n")
    plain = build(build_config([dup], tmp_path / "plain", shard_docs=4, **extra), progress=False)
    dedup = build(build_config([dup], tmp_path / "dedup", shard_docs=4, dedup=True, **extra), progress=False)
    assert plain["indexed_chunks"] == plain["chunks"]
    assert dedup["chunks"] == plain["chunks"]
    assert dedup["indexed_chunks"] == plain["chunks"] // 2
    assert dedup["skipped"]["duplicate_chunks"] == plain["chunks"] // 2
    ds = Datastore.open(tmp_path / "dedup")
    hits = ds.search(["alpha beta"], k=len(ds))[0]
    assert not any(h.doc_id.endswith("-copy") for h in hits)  # first occurrence wins


def test_near_dup_drops_near_duplicate_documents(tmp_path, build_config):
    src = write_corpus(tmp_path / "a.jsonl", n_docs=5, seed=4, words=300)
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    words = recs[0]["text"].split()
    near = " ".join(words[:-3] + ["zebra", "yak", "xylophone"])  # a few words changed: Jaccard > 0.8
    assert jaccard(recs[0]["text"], near) >= 0.8
    recs.append({"id": "near0", "text": near})
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    summary = build(build_config([path], tmp_path / "ds", near_dup=True), progress=False)
    assert summary["documents"] == 5 and summary["skipped"]["near_duplicate_documents"] == 1
    assert near_duplicate_ordinals([r["text"] for r in recs]) == {5}


def test_multibyte_text_chunks_are_exact_substrings(tmp_path, build_config):
    text = "Zürich — 東京 and São Paulo: naïve café 🙂 " * 20
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"id": "u", "text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    build(build_config([path], tmp_path / "ds"), progress=False)
    ds = Datastore.open(tmp_path / "ds")
    rows = [ds.chunk(r) for r in range(len(ds))]
    assert "".join(r["text"] for r in rows) == text.rstrip()
    assert all(text[r["char_start"]:r["char_start"] + len(r["text"])] == r["text"] for r in rows)
    assert np.isfinite(ds.search(["café"], k=2)[0][0].score)
