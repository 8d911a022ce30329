"""``ralm scale``: nested subsets, one point per (method, fraction), JSON + markdown + PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from badinput import fails, runner
from conftest import write_corpus
from ralm.cli import app
from ralm.datastore.subset import nested_rows
from ralm.errors import RalmError


def test_nested_rows_are_nested_and_sized():
    small, big = nested_rows(1000, 0.1, seed=3), nested_rows(1000, 0.3, seed=3)
    assert len(small) == 100 and len(big) == 300 and np.isin(small, big).all()
    assert np.all(np.diff(big) > 0)
    assert len(nested_rows(10, 0.01)) == 1  # never empty
    assert not np.array_equal(nested_rows(1000, 0.1, seed=4), small)
    for bad in (0.0, 1.5, -1):
        with pytest.raises(RalmError, match="fraction"):
            nested_rows(10, bad)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    tmp = tmp_path_factory.mktemp("scale")
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=12, words=80)
    held = write_corpus(tmp / "held.jsonl", n_docs=1, seed=7, words=60, prefix="h")
    ds, knn = tmp / "ds", tmp / "knn"
    r = runner.invoke(app, ["build", str(corpus), "--out", str(ds), "--tokenizer", tiny_lm, "--encoder", tiny_encoder,
                            "--encoder-dtype", "fp32", "--chunk-tokens", "16", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(knn), "--model", tiny_lm, "--context", "32",
                            "--index", "flat", "-q"])
    assert r.exit_code == 0, r.output
    return held, ds, knn


def test_scale_writes_points_table_and_plot(stores, tmp_path, tiny_lm):
    held, ds, knn = stores
    out = tmp_path / "scale"
    r = runner.invoke(app, ["scale", "--model", tiny_lm, "--data", str(held), "--datastore", str(ds),
                            "--knn-store", str(knn), "--methods", "in-context,knn-lm", "--fractions", "0.1,0.5,1",
                            "--context", "32", "--doc-tokens", "8", "--k", "8", "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res == json.loads((out / "scale.json").read_text())
    assert [(p["method"], p["fraction"]) for p in res["points"]] == [
        ("in-context", 0.1), ("in-context", 0.5), ("in-context", 1.0), ("knn-lm", 0.1), ("knn-lm", 0.5), ("knn-lm", 1.0)]
    for method in ("in-context", "knn-lm"):
        sizes = [p["store_tokens"] for p in res["points"] if p["method"] == method]
        assert sizes[0] < sizes[1] < sizes[2]
    knn_points = [p for p in res["points"] if p["method"] == "knn-lm"]
    assert knn_points[-1]["store_tokens"] == json.loads((knn / "manifest.json").read_text())["summary"]["keys"]
    assert len({p["tokens"] for p in res["points"]} | {res["none"]["tokens"]}) == 1  # same scored tokens
    assert len({round(p["ppl"], 6) for p in res["points"]}) > 1  # the store size changes the result
    png = (out / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| knn-lm | 0.1 |" in (out / "scale.md").read_text()


def test_scale_bad_input(stores, tmp_path, tiny_lm):
    held, ds, knn = stores
    base = ["scale", "--model", tiny_lm, "--data", str(held), "--out", str(tmp_path / "o"), "-q"]
    fails(runner.invoke(app, [*base, "--datastore", str(ds), "--fractions", "0,0.5"]), "--fractions")
    fails(runner.invoke(app, [*base, "--datastore", str(ds), "--fractions", "a,b"]), "--fractions")
    fails(runner.invoke(app, [*base, "--methods", "knn-lm"]), "--knn-store")
    fails(runner.invoke(app, [*base, "--datastore", str(ds), "--methods", "magic"]), "--methods", "magic")
    fails(runner.invoke(app, [*base, "--knn-store", str(ds), "--methods", "knn-lm"]), "not a ralm kNN-LM store")
    assert not (tmp_path / "o").exists()
