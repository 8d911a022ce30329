"""In-Context RALM scoring on a tiny random LM and a tiny store."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_text, write_corpus
from ralm import Datastore
from ralm.core.targets import make_targets
from ralm.data.document import Document
from ralm.datastore.build import build
from ralm.errors import RalmError
from ralm.methods.in_context import InContextConfig, Passage, block_input, in_context_nll, replug_nll, store_retriever
from ralm.methods.plain import token_nll


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture
def doc_targets(lm):
    return make_targets(Document("d0", make_text(random.Random(5), 150), "x"), lm[1])


def test_no_retrieval_equals_plain_sliding_window(lm, doc_targets):
    model, tok = lm
    assert len(doc_targets.ids) > 80
    cfg = InContextConfig(stride=8)
    got, seconds = in_context_nll(model, tok, doc_targets, None, cfg, context=33)  # (33 - 1) % 8 == 0
    ref = token_nll(model, doc_targets, context=33, stride=8)
    assert seconds == 0.0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_empty_passages_equal_plain_lm(lm, doc_targets):
    model, tok = lm
    cfg = InContextConfig(stride=8)
    got, _ = in_context_nll(model, tok, doc_targets, lambda qs, d: [[] for _ in qs], cfg, context=33)
    torch.testing.assert_close(got, token_nll(model, doc_targets, context=33, stride=8), rtol=1e-5, atol=1e-5)


def test_passages_change_scores_but_not_targets(lm, doc_targets):
    model, tok = lm
    seen = []

    def retrieve(queries, doc_id):
        seen.extend(queries)
        return [[Passage(tok("river mountain city forest music")["input_ids"], 1.0)] for _ in queries]

    cfg = InContextConfig(stride=8, query_len=4)
    got, _ = in_context_nll(model, tok, doc_targets, retrieve, cfg, context=64)
    ref = token_nll(model, doc_targets, context=64, stride=8)
    assert got.shape == ref.shape and not torch.allclose(got, ref)
    torch.testing.assert_close(got[:8], ref[:8])  # the first block has no query yet
    assert len(seen) == len(range(1, len(doc_targets.ids), 8)) - 1
    assert all(len(tok(q, add_special_tokens=False)["input_ids"]) <= 5 for q in seen)


def test_block_input_layout():
    ids = torch.arange(100, 140)
    inp = block_input(ids, 20, 24, [7, 8, 9], context=10, bos=1)
    assert inp.tolist() == [1, 7, 8, 9, 100 + 18, 100 + 19, 100 + 20, 100 + 21, 100 + 22, 100 + 23]
    assert block_input(ids, 20, 24, [], context=10, bos=1).tolist() == list(range(114, 124))
    with pytest.raises(RalmError, match="--doc-tokens"):
        block_input(ids, 20, 24, list(range(9)), context=10, bos=1)


def test_store_retriever_excludes_same_doc_and_decontaminates(tmp_path, build_config, lm):
    model, tok = lm
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=10, seed=9)
    build(build_config([corpus], tmp_path / "ds"), progress=False)
    ds = Datastore.open(tmp_path / "ds")
    first = ds.chunk(0)
    doc_tokens = {first["doc_id"]: torch.tensor(list(first["tokens"]) * 2)}
    query = [ds.chunk(0)["text"]]
    leaky = store_retriever(ds, k=3, exclude_same_doc=False)(query, "other")
    assert list(ds.chunk(0)["tokens"]) == leaky[0][0].tokens[:len(first["tokens"])]  # the chunk finds itself
    clean = store_retriever(ds, k=3)(query, first["doc_id"])
    kept_rows = [r for r in range(len(ds)) if ds.chunk(r)["doc_id"] != first["doc_id"]]
    assert len(clean[0]) == 3 and kept_rows
    for passage in clean[0]:
        assert passage.tokens[:16] != list(first["tokens"])
    decon = store_retriever(ds, k=3, exclude_same_doc=False, decontaminate=8, doc_tokens=doc_tokens)(
        query, first["doc_id"])
    grams = {tuple(first["tokens"][i:i + 8]) for i in range(len(first["tokens"]) - 7)}
    for p in decon[0]:
        assert not {tuple(p.tokens[i:i + 8]) for i in range(len(p.tokens) - 7)} & grams


def test_bad_config():
    with pytest.raises(RalmError, match="--stride"):
        InContextConfig(stride=0)
    with pytest.raises(RalmError, match="--doc-tokens"):
        InContextConfig(doc_tokens=0)


def test_replug_mixes_per_passage_probabilities(lm, doc_targets):
    model, tok = lm
    a = Passage(tok("river mountain city")["input_ids"], 2.0)
    b = Passage(tok("ocean planet garden winter")["input_ids"], 0.5)
    cfg = InContextConfig(stride=8, docs=2)
    got, _ = replug_nll(model, tok, doc_targets, lambda qs, d: [[a, b] for _ in qs], cfg, context=64)
    only_a, _ = in_context_nll(model, tok, doc_targets, lambda qs, d: [[a] for _ in qs], InContextConfig(stride=8), 64)
    only_b, _ = in_context_nll(model, tok, doc_targets, lambda qs, d: [[b] for _ in qs], InContextConfig(stride=8), 64)
    w = torch.softmax(torch.tensor([2.0, 0.5]), 0)
    expect = -torch.log(w[0] * torch.exp(-only_a) + w[1] * torch.exp(-only_b))
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    # with one passage REPLUG is in-context RALM; with none it is the plain LM
    one, _ = replug_nll(model, tok, doc_targets, lambda qs, d: [[a] for _ in qs], InContextConfig(stride=8), 64)
    torch.testing.assert_close(one, only_a)
    none, _ = replug_nll(model, tok, doc_targets, None, InContextConfig(stride=8), 65)  # (65 - 1) % 8 == 0
    torch.testing.assert_close(none, token_nll(model, doc_targets, context=65, stride=8), rtol=1e-5, atol=1e-5)
