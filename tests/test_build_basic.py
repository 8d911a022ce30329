"""End-to-end build and search with tiny models."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from typer.testing import CliRunner

from ralm import Datastore
from ralm.cli import app
from ralm.datastore.build import build
from ralm.datastore.keys import KeyParts, exact_search

runner = CliRunner()


def test_build_then_search_returns_k_hits_with_fields(tmp_path, corpus, build_config):
    summary = build(build_config([corpus], tmp_path / "ds", shard_docs=7), progress=False)
    assert summary["documents"] == 30
    assert summary["chunks"] == summary["indexed_chunks"] > 30
    ds = Datastore.open(tmp_path / "ds", verify=True)
    hits = ds.search(["alpha beta gamma river"], k=5)[0]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(hits[i].score >= hits[i + 1].score for i in range(4))
    assert all(h.doc_id.startswith("d") and h.text and h.domain == "default" for h in hits)


def test_chunk_texts_reassemble_documents_exactly(tmp_path, corpus, build_config):
    build(build_config([corpus], tmp_path / "ds"), progress=False)
    table = pq.read_table(tmp_path / "ds" / "chunks" / "part-00000.parquet").to_pylist()
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in corpus.read_text().splitlines()}
    by_doc: dict[str, list] = {}
    for row in table:
        by_doc.setdefault(row["doc_id"], []).append(row)
    for doc_id, rows in by_doc.items():
        rows.sort(key=lambda r: r["position"])
        assert "".join(r["text"] for r in rows) == docs[doc_id].rstrip()
        assert all(len(r["tokens"]) == 16 for r in rows[:-1])
        # continuation = the next chunk's tokens
        for a, b in zip(rows, rows[1:], strict=False):
            assert a["continuation"] == b["tokens"]
        assert rows[-1]["continuation"] == []


def test_exact_search_equals_numpy_bruteforce(tmp_path, corpus, build_config):
    build(build_config([corpus], tmp_path / "ds", shard_docs=5), progress=False)
    ds = Datastore.open(tmp_path / "ds")
    keys = KeyParts(sorted((tmp_path / "ds" / "keys").glob("*.npy")))
    rng = np.random.default_rng(0)
    xq = keys.get(rng.choice(len(keys), 20, replace=False)) + rng.normal(0, 0.05, (20, keys.dim)).astype(np.float32)
    hits = ds.search(xq, k=10)
    xb = np.concatenate([np.asarray(p, dtype=np.float32) for p in keys.parts])
    ref = xq @ xb.T
    D_np, _ = exact_search(keys, xq, 10)
    for q in range(20):
        got = np.array([h.score for h in hits[q]])
        expect = np.sort(ref[q])[::-1][:10]
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(D_np[q], expect, rtol=1e-4, atol=1e-5)
        # ties aside, the rows are the brute-force rows
        for h in hits[q]:
            assert abs(ref[q, h.row] - h.score) < 1e-4


def test_exclude_doc_ids_still_returns_k(tmp_path, corpus, build_config):
    build(build_config([corpus], tmp_path / "ds"), progress=False)
    ds = Datastore.open(tmp_path / "ds")
    first = ds.search(["alpha beta"], k=5)[0]
    banned = {h.doc_id for h in first}
    again = ds.search(["alpha beta"], k=5, exclude_doc_ids=[banned])[0]
    assert len(again) == 5
    assert not banned & {h.doc_id for h in again}


def test_cli_search_json_schema(tmp_path, corpus, build_args):
    r = runner.invoke(app, ["build", str(corpus), "--out", str(tmp_path / "ds"), *build_args])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", str(tmp_path / "ds"), "alpha river", "music ocean", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["query"] for o in out] == ["alpha river", "music ocean"]
    for o in out:
        assert [h["rank"] for h in o["hits"]] == [1, 2, 3]
        assert set(o["hits"][0]) == {"rank", "score", "chunk_id", "doc_id", "domain", "text", "continuation"}
    r = runner.invoke(app, ["info", str(tmp_path / "ds"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["documents"] == 30


def test_bm25_store(tmp_path, corpus, build_config):
    from ralm.datastore.encoders import EncoderConfig

    build(build_config([corpus], tmp_path / "ds", encoder=EncoderConfig(name="bm25")), progress=False)
    ds = Datastore.open(tmp_path / "ds", verify=True)
    hits = ds.search(["football election"], k=3)[0]
    assert len(hits) == 3
    assert all("football" in h.text.lower() or "election" in h.text.lower() for h in hits)


def test_rerun_on_finished_store_changes_nothing(tmp_path, corpus, build_config):
    build(build_config([corpus], tmp_path / "ds"), progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*")}
    again = build(build_config([corpus], tmp_path / "ds"), progress=False)
    assert again["already_complete"] is True
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ds").rglob("*")} == before
