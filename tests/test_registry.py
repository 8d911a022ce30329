"""The method registry (issue 12, item 1/4): every registered method scores exactly the targets of ``none``
and, with retrieval off or an empty store (``EmptyRetriever``), gives ``none``'s NLL; a toy method registered
here runs through ``ralm eval-lm`` without touching any other module; an unknown method is one line listing
the names. These fail at b165b45 (no ``ralm.core.registry``, no ``EmptyRetriever``, no ``scale`` for retro).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from badinput import fails, runner
from conftest import write_corpus
from ralm.cli import app
from ralm.core.registry import Method, Session, get_method, method_names, register_method, unregister_method
from ralm.core.retriever import EmptyRetriever, KNNRetriever, StoreRetriever
from ralm.datastore.build import build
from ralm.datastore.chunking import ChunkingConfig
from ralm.datastore.index import IndexConfig
from ralm.errors import RalmError
from ralm.eval.lm import LMEvalConfig
from ralm.eval.runner import EvalLMConfig, run_eval_lm
from ralm.methods.in_context import InContextConfig
from ralm.methods.knnlm import KNNLMConfig
from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store
from ralm.methods.retro.method import RetroRunConfig
from ralm.methods.retro.model import RetroConfig
from ralm.tuning.retrofit import RetrofitConfig, retrofit

M, CTX, STRIDE = 16, 33, 8  # in-context blocks equal the plain windows when CTX - 1 is a multiple of STRIDE
LMBDA = 0.25


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("registry")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=8, words=80)
    held = write_corpus(root / "held.jsonl", n_docs=2, words=80, seed=7, prefix="h")
    ds, knn, ckpt = root / "ds", root / "knn", root / "ckpt"
    build(_build_cfg(corpus, ds, tiny_tokenizer, tiny_encoder, EncoderConfig), progress=False)
    build_knn_store(KNNBuildConfig([str(corpus)], str(knn), model=tiny_lm, context=CTX, window_stride=16,
                                   index=IndexConfig("flat", metric="l2")), progress=False)
    retro = RetroConfig(chunk_size=M, neighbour_len=2 * M, enc_dim=16, enc_layers=1, enc_heads=2, cca_dim=16,
                        cca_heads=2)
    retrofit(RetrofitConfig(datastore=str(ds), train=[str(corpus)], out=str(ckpt), model=tiny_lm, retro=retro,
                            steps=2, batch_size=2, seq_len=64, warmup=1, eval_every=0, save_every=2, lr=1e-2,
                            bf16=False), progress=False)
    return held, ds, knn, ckpt


def _build_cfg(corpus, ds, tokenizer, encoder, EncoderConfig):
    from ralm.datastore.build import BuildConfig

    return BuildConfig(inputs=[str(corpus)], out=str(ds), tokenizer=tokenizer, chunking=ChunkingConfig(M),
                       encoder=EncoderConfig(name=encoder, dtype="fp32"))


def settings(name: str, stores) -> tuple[dict, dict, float]:
    """Per method: its options with retrieval on, its options with retrieval off (or on an empty store), and
    the exact NLL offset per target from ``none``'s with retrieval off. A new method must be added here."""
    held, ds, knn, ckpt = stores
    ic = InContextConfig(stride=STRIDE, query_len=16, docs=2, doc_tokens=8)
    table = {
        "none": ({}, {}, 0.0),
        # no passage: a block is scored from the last CTX tokens, the plain window of stride STRIDE
        "in-context": (dict(datastore=str(ds), options={"in_context": ic}),
                       dict(datastore=str(ds), options={"in_context": ic}), 0.0),
        "replug": (dict(datastore=str(ds), options={"in_context": ic}),
                   dict(datastore=str(ds), options={"in_context": ic}), 0.0),
        # an empty store leaves p = (1 - λ) p_LM: NLL + (-log(1 - λ)), exactly (λ = 0 would be p_LM itself)
        "knn-lm": (dict(datastore=str(knn), options={"knn": KNNLMConfig(k=8, lmbda=LMBDA)}),
                   dict(datastore=str(knn), options={"knn": KNNLMConfig(k=8, lmbda=LMBDA)}), -math.log1p(-LMBDA)),
        # retrieval off: no hook runs, the frozen model bit for bit
        "retro": (dict(options={"retro": RetroRunConfig(str(ckpt))}, datastore=str(ds)),
                  dict(options={"retro": RetroRunConfig(str(ckpt), retrieval="off")}), 0.0),
    }
    assert name in table, f"method {name!r}: say here how its retrieval is switched off"
    return table[name]


def _eval(tiny_lm, held, stride, per_target=None, **kw):
    cfg = EvalLMConfig(model=tiny_lm, data=[str(held)], lm=LMEvalConfig(context=CTX, window_stride=stride), **kw)
    return run_eval_lm(cfg, progress=False, **(per_target or {}))


BUILT_IN = ("none", "in-context", "replug", "knn-lm", "retro")


def test_built_in_methods_are_registered():
    assert set(BUILT_IN) <= set(method_names())
    assert {get_method(n).store for n in BUILT_IN} == {"none", "retrieval", "knn"}
    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("none"))


@pytest.mark.parametrize("name", method_names())
def test_method_scores_nones_targets_and_gives_its_nll_without_retrieval(stores, tiny_lm, name):
    held = stores[0]
    on, off, offset = settings(name, stores)
    stride = STRIDE if get_method(name).options == "in_context" else None
    none = _eval(tiny_lm, held, stride)
    r = _eval(tiny_lm, held, stride, method=name, **on)
    assert (r["tokens"], r["bytes"], r["documents"]) == (none["tokens"], none["bytes"], none["documents"])
    if get_method(name).store != "none":  # retrieval on does change the scores (the check below is not vacuous)
        assert r["ppl"] != none["ppl"]
    empty = _eval(tiny_lm, held, stride, {"wrap_retriever": EmptyRetriever}, method=name, **off)
    assert (empty["tokens"], empty["bytes"]) == (none["tokens"], none["bytes"])
    want = math.log(none["ppl"]) + offset  # mean NLL per target
    # float32 logits either way; the same windows, so only the summation order can differ
    assert math.log(empty["ppl"]) == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_empty_retriever_finds_nothing_for_either_kind_of_query(stores):
    from ralm.datastore.knn_store import KNNStore
    from ralm.datastore.store import Datastore

    held, ds, knn, ckpt = stores
    store = Datastore.open(ds)
    e = EmptyRetriever(StoreRetriever(store))
    assert store.hits(*e.search(["a query", "another"], k=3)) == [[], []] and len(e) == len(Datastore.open(ds))
    d, i = EmptyRetriever(KNNRetriever(KNNStore.open(knn))).search(torch.zeros(2, 4).numpy(), 5)
    assert d.shape == i.shape == (2, 5) and (i == -1).all()


def test_toy_method_runs_through_the_cli(stores, tiny_lm):
    """A method is one registration: a uniform distribution over the vocabulary has perplexity V."""
    held = stores[0]

    def open_toy(ctx):
        vocab = ctx.model.config.vocab_size
        return Session(scorer=lambda t, context: (torch.full((t.n_targets,), math.log(vocab)), 0.0),
                       info={"toy_vocab": vocab})

    register_method(Method(name="toy", help="uniform over the vocabulary", store="none", open=open_toy))
    try:
        res = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "toy",
                                  "--context", str(CTX), "--json", "-q"])
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["method"] == "toy" and out["ppl"] == pytest.approx(out["toy_vocab"], rel=1e-5)
        assert "toy" in runner.invoke(app, ["methods"]).stdout
    finally:
        unregister_method("toy")
    assert "toy" not in method_names()


def test_unknown_method_lists_the_registered_names(stores, tiny_lm):
    held = stores[0]
    res = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "magic", "-q"])
    fails(res, "--method", "magic", *method_names())
    with pytest.raises(RalmError, match="expected one of"):
        get_method("magic")


def test_foreign_options_are_refused(stores, tiny_lm):
    held, ds, knn, ckpt = stores
    with pytest.raises(RalmError, match="--checkpoint is for --method retro"):
        EvalLMConfig(model=tiny_lm, data=[str(held)], options={"retro": RetroRunConfig(str(ckpt))})
    with pytest.raises(RalmError, match="--validation is for --method knn-lm"):
        EvalLMConfig(model=tiny_lm, data=[str(held)], method="in-context", datastore=str(ds),
                     options={"knn": KNNLMConfig(validation=[str(held)])})


def test_scale_runs_retro_with_its_checkpoint_store(stores, tiny_lm, tmp_path):
    """``ralm scale`` scales every method with a store, retro included (its store from the checkpoint)."""
    held, ds, knn, ckpt = stores
    res = runner.invoke(app, ["scale", "--model", tiny_lm, "--data", str(held), "--out", str(tmp_path / "o"),
                              "--methods", "retro", "--checkpoint", str(ckpt), "--fractions", "0.5,1",
                              "--context", str(CTX), "--json", "-q"])
    assert res.exit_code == 0, res.output
    points = json.loads(res.stdout)["points"]
    assert [p["method"] for p in points] == ["retro", "retro"]
    assert 0 < points[0]["store_tokens"] < points[1]["store_tokens"]
