"""Issue 16, sharded search: a store set answers as one store over the union of its shards (ids mapped, scores
equal), deduplicates identical chunks across shards, applies same-document exclusion in every shard, and refuses
shards that disagree or changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_corpus
from ralm.cli import app as cli_app
from ralm.datastore.build import build
from ralm.datastore.chunking import ChunkingConfig
from ralm.datastore.store import Datastore
from ralm.datastore.store_set import FILE, StoreSet, create_store_set, is_store_set
from ralm.errors import IncompatibleError, RalmError, StoreError
from ralm.serve.client import open_store
from test_eval_cli import setup  # noqa: F401  (its tiny store and held-out documents, built once)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_tokenizer, tiny_encoder):
    """Shards A and B (different documents) and U, one store over both corpora."""
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("sets")
    a = write_corpus(root / "a.jsonl", n_docs=8, seed=1, prefix="a")
    b = write_corpus(root / "b.jsonl", n_docs=8, seed=2, prefix="b")

    def make(inputs, name, chunk_tokens=16):
        cfg = BuildConfig(inputs=[str(i) for i in inputs], out=str(root / name), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(chunk_tokens=chunk_tokens),
                          encoder=EncoderConfig(name=tiny_encoder, dtype="fp32"))
        build(cfg, progress=False)
        return root / name

    return root, make([a], "A"), make([b], "B"), make([a, b], "U"), make([a], "A12", chunk_tokens=12)


def records(store, I):  # noqa: E741
    return [[(store.chunk(int(r))["doc_id"], store.chunk(int(r))["text"]) for r in row if r >= 0] for row in I]


def test_set_equals_one_store_over_the_union(stores):
    root, a, b, u, _ = stores
    create_store_set(root / "set", [a, b], dedup=False)
    assert is_store_set(root / "set") and not is_store_set(a)
    ss, one = open_store(root / "set"), Datastore.open(u)
    assert isinstance(ss, StoreSet) and len(ss) == len(one) == len(Datastore.open(a)) + len(Datastore.open(b))
    q = [one.chunk(r)["text"] for r in (0, 7, len(one) - 1)] + ["music river"]
    D1, I1 = one.search_rows(q, 10)  # noqa: E741
    D2, I2 = ss.search_rows(q, 10)  # noqa: E741
    np.testing.assert_allclose(D2, D1, rtol=1e-5, atol=1e-5)
    assert records(ss, I2) == records(one, I1)  # same chunks, by their set rows
    assert I2.max() < len(ss) and (I2 >= len(Datastore.open(a))).any()  # rows of B are offset past A's
    assert ss.chunks(I2[0].tolist())[0]["text"] == q[0]  # the query's own chunk first


def test_exclusion_applies_in_every_shard(stores):
    root, a, b, _, _ = stores
    ss = StoreSet.open(create_store_set(root / "excl", [a, b], dedup=False).parent)
    q = ["music river mountain"]
    _, I = ss.search_rows(q, 6)  # noqa: E741
    banned = {ss.chunk(int(r))["doc_id"] for r in I[0][:3]}
    assert any(d.startswith("a") for d in banned) or any(d.startswith("b") for d in banned)
    _, J = ss.search_rows(q, 6, exclude_doc_ids=banned)  # noqa: E741
    assert (J >= 0).all() and not banned & {ss.chunk(int(r))["doc_id"] for r in J[0]}


def test_dedup_drops_identical_chunks_across_shards(stores):
    root, a, _, _, _ = stores
    alone = Datastore.open(a)
    q = [alone.chunk(3)["text"], "river"]
    D0, I0 = alone.search_rows(q, 5)  # noqa: E741
    dup = StoreSet.open(create_store_set(root / "dup", [a, a]).parent)  # the same store twice
    D, I = dup.search_rows(q, 5)  # noqa: E741
    np.testing.assert_allclose(D, D0, rtol=1e-5, atol=1e-5)
    assert [[t for _, t in row] for row in records(dup, I)] == [[t for _, t in row] for row in records(alone, I0)]
    kept = StoreSet.open(create_store_set(root / "dup-kept", [a, a], dedup=False).parent)
    texts = [t for _, t in records(kept, kept.search_rows(q, 6)[1])[0]]
    assert texts[0] == texts[1] and len(set(texts)) == 3  # without dedup each chunk comes twice


def test_a_shard_built_with_dedup_keeps_its_row_numbers(stores, tmp_path, build_config):
    """A --dedup store indexes only some of its chunks, under their own row numbers: the set offsets the next
    shard's rows by the chunk count (not the indexed count), and its length is what a search can return."""
    root, _, b, _, _ = stores
    text = (root / "a.jsonl").read_text()
    dup = tmp_path / "dup.jsonl"
    dup.write_text(text + text.replace('"id": "a', '"id": "c'))  # every document twice, under other ids
    build(build_config([dup], tmp_path / "D", dedup=True), progress=False)
    d, sb = Datastore.open(tmp_path / "D"), Datastore.open(b)
    assert len(d) < d.manifest["counts"]["chunks"]
    one = StoreSet.open(create_store_set(tmp_path / "one", [tmp_path / "D"], dedup=False).parent)
    q = [d.chunk(r)["text"] for r in (0, d.manifest["counts"]["chunks"] - 1)] + ["music river"]
    D0, I0 = d.search_rows(q, 6)  # noqa: E741
    D1, I1 = one.search_rows(q, 6)  # noqa: E741
    np.testing.assert_array_equal(I1, I0)
    ss = StoreSet.open(create_store_set(tmp_path / "two", [tmp_path / "D", b], dedup=False).parent)
    assert len(ss) == len(d) + len(sb) and ss.offsets[1] == d.manifest["counts"]["chunks"]
    q = [sb.chunk(len(sb) - 1)["text"], d.chunk(d.manifest["counts"]["chunks"] - 1)["text"]]
    _, I = ss.search_rows(q, 3)  # noqa: E741
    assert ss.chunk(int(I[0, 0])) == sb.chunk(len(sb) - 1) and ss.chunk(int(I[1, 0]))["text"] == q[1]


def test_restrict_searches_only_the_given_rows(stores):
    root, a, b, _, _ = stores
    ss = StoreSet.open(create_store_set(root / "sub", [a, b], dedup=False).parent)
    rows = np.arange(0, len(ss), 3)
    view = ss.restrict(rows)
    assert len(view) == len(rows)
    _, I = view.search_rows(["music"], 5)  # noqa: E741
    assert set(I[0].tolist()) <= set(rows.tolist())
    with pytest.raises(RalmError, match="outside"):
        ss.restrict(np.array([len(ss)]))


def test_bad_sets_are_refused(stores):
    root, a, b, _, a12 = stores
    with pytest.raises(IncompatibleError, match="chunking.chunk_tokens"):
        create_store_set(root / "mixed", [a, a12])
    assert not (root / "mixed" / FILE).exists()
    with pytest.raises(RalmError, match="--force"):
        create_store_set(root / "set2", [a]) and create_store_set(root / "set2", [b])
    (root / "broken").mkdir()
    (root / "broken" / FILE).write_text("{not json")
    with pytest.raises(StoreError, match="not a readable store set"):
        StoreSet.open(root / "broken")
    (root / "other").mkdir()
    (root / "other" / FILE).write_text(json.dumps({"format": "ralm-storeset", "version": 1, "shards": []}))
    with pytest.raises(StoreError, match="non-empty"):
        StoreSet.open(root / "other")
    ss = StoreSet.open(root / "set2")
    with pytest.raises(RalmError, match="larger than the store set"):
        ss.search_rows(["x"], len(ss) + 1)


def test_a_changed_shard_is_refused(stores, tmp_path):
    root, a, _, _, _ = stores
    import shutil

    copy = tmp_path / "A"
    shutil.copytree(a, copy)
    create_store_set(tmp_path / "set", [copy])
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text() + "\n")
    with pytest.raises(StoreError, match="changed since the set was made"):
        StoreSet.open(tmp_path / "set")


def test_storeset_command(stores, tmp_path):
    root, a, b, _, a12 = stores
    r = CliRunner().invoke(cli_app, ["storeset", str(tmp_path / "s"), str(a), str(b)])
    assert r.exit_code == 0, r.output
    assert "2 shards" in r.output and is_store_set(tmp_path / "s")
    r = CliRunner().invoke(cli_app, ["search", str(tmp_path / "s"), "music", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.output)[0]["hits"]) == 3
    r = CliRunner().invoke(cli_app, ["storeset", str(tmp_path / "bad"), str(a), str(a12)])
    assert r.exit_code != 0 and "chunk_tokens" in r.output and not (tmp_path / "bad" / FILE).exists()


def test_a_served_set_answers_as_the_local_set(stores):
    from ralm.serve.app import create_app, open_stores
    from ralm.serve.client import RemoteStore
    from ralm.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    root, a, b, _, _ = stores
    create_store_set(root / "served", [a, b])
    served = open_stores([str(root / "served")])
    local = served["served"]
    with ThreadServer(create_app(served, ServeConfig())) as srv:
        remote = RemoteStore(srv.url)
        assert len(remote) == len(local) and remote.name == "served"
        q = ["music river", local.chunk(len(local) - 2)["text"]]
        D1, I1 = local.search_rows(q, 7, exclude_doc_ids={"a1"})  # noqa: E741
        D2, I2 = remote.search_rows(q, 7, exclude_doc_ids={"a1"})  # noqa: E741
        np.testing.assert_array_equal(I2, I1)
        np.testing.assert_allclose(D2, D1, rtol=1e-6)
        assert remote.chunk(int(I1[1, 0]))["text"] == q[1] and remote.manifest_sha256 == local.manifest_sha256


@pytest.mark.parametrize("method,subset", [("in-context", None), ("replug", 0.5)])
def test_a_method_over_a_one_shard_set_equals_its_store(setup, tiny_lm, tmp_path, method, subset):  # noqa: F811
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig, run_eval_lm
    from ralm.lm.models import load
    from ralm.methods.in_context import InContextConfig
    from test_serve import Recorder

    base, held = setup
    create_store_set(tmp_path / "set", [base / "ds"])
    lm, runs = load(tiny_lm), []
    for where in (str(base / "ds"), str(tmp_path / "set")):
        seen: list = []
        cfg = EvalLMConfig(model=tiny_lm, data=[str(held)], method=method, datastore=where, decontaminate=8,
                           subset=subset, options={"in_context": InContextConfig(stride=8, docs=2, doc_tokens=16)},
                           lm=LMEvalConfig(context=64))
        runs.append((run_eval_lm(cfg, progress=False, loaded=lm, wrap_retriever=lambda r, s=seen: Recorder(r, s)),
                     seen))
    (one, seen_one), (many, seen_set) = runs
    assert len(seen_one) == len(seen_set) > 0
    for (D, I), (Ds, Is) in zip(seen_one, seen_set, strict=True):  # noqa: E741
        assert np.array_equal(I, Is) and np.allclose(D, Ds, atol=1e-6)
    assert one["ppl"] == pytest.approx(many["ppl"], rel=1e-6) and one["tokens"] == many["tokens"]


def test_served_stores_restricted_to_the_same_rows_each_search_their_own(stores):
    """Two served stores asked for the same ``rows``: each request searches its own store's view (views are
    kept per store, not by the rows alone)."""
    from ralm.serve.app import create_app
    from ralm.serve.client import RemoteStore
    from ralm.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    _, a, b, _, _ = stores
    local = {"A": Datastore.open(a), "B": Datastore.open(b)}
    rows = np.arange(0, min(len(s) for s in local.values()), 2)
    with ThreadServer(create_app(local, ServeConfig())) as srv:
        for name, ds in local.items():
            remote = RemoteStore(f"{srv.url}/{name}").restrict(rows)
            D, I = remote.search_rows(["music river"], 5)  # noqa: E741
            D0, I0 = ds.restrict(rows).search_rows(["music river"], 5)  # noqa: E741
            np.testing.assert_array_equal(I, I0)
            np.testing.assert_allclose(D, D0, rtol=1e-6)
