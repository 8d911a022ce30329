"""kNN-LM end to end on a tiny random LM: store build, eval, λ sweep, exclusion, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from badinput import fails, runner, write_jsonl
from conftest import write_corpus
from ralm.cli import app
from ralm.core.targets import make_targets
from ralm.data.corpus import CorpusConfig, iter_documents
from ralm.datastore.index import IndexConfig
from ralm.datastore.knn_store import KNNStore
from ralm.errors import IncompatibleError, RalmError, StoreError
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.eval.runner import EvalLMConfig, run_eval_lm
from ralm.methods.knnlm import KNNLMConfig, KNNScorer
from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

CTX, STRIDE = 32, 16


@pytest.fixture(scope="module")
def knn_setup(tmp_path_factory, tiny_lm):
    tmp = tmp_path_factory.mktemp("knn")
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=6, words=60)
    held = write_corpus(tmp / "held.jsonl", n_docs=2, seed=9, words=60, prefix="h")
    out = tmp / "knn"
    summary = build_knn_store(KNNBuildConfig([str(corpus)], str(out), model=tiny_lm, context=CTX, window_stride=STRIDE,
                                             index=IndexConfig("flat", metric="l2")), progress=False)
    return corpus, held, out, summary


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


def test_store_holds_one_key_per_target_with_next_token_values(knn_setup, lm):
    corpus, _, out, summary = knn_setup
    _, tok = lm
    docs = list(iter_documents([str(corpus)], CorpusConfig()))
    targets = [make_targets(d, tok) for d in docs]
    store = KNNStore.open(out, verify=True)
    assert summary["keys"] == len(store) == sum(t.n_targets for t in targets)
    np.testing.assert_array_equal(store.values, np.concatenate([t.ids[1:].numpy() for t in targets]))
    assert store.doc_ids == [d.id for d in docs]
    assert np.all(np.diff(store.docs) >= 0) and store.docs[-1] == len(docs) - 1


def test_stored_keys_are_the_eval_time_states(knn_setup, lm):
    """A stored document queried with eval-lm's own windows finds itself at distance ~0, next token right."""
    corpus, _, out, _ = knn_setup
    model, tok = lm
    store = KNNStore.open(out)
    doc = next(iter_documents([str(corpus)], CorpusConfig()))
    t = make_targets(doc, tok)
    scorer = KNNScorer(model, store, KNNLMConfig(k=4, lmbda=1.0), STRIDE, exclude_same_doc=False)
    nll, _ = scorer(t, CTX)
    assert nll.shape == (t.n_targets,)
    D, I = store.search(store.keys.get(np.arange(t.n_targets)), 1)  # noqa: E741
    assert np.all(D[:, 0] < 1e-2)
    # with λ = 1 the probability comes from neighbours alone; its own state is the nearest
    assert float(torch.exp(-nll).mean()) > 0.5


def test_lambda_zero_equals_plain_lm_exactly(knn_setup, lm):
    _, held, out, _ = knn_setup
    model, tok = lm
    docs = list(iter_documents([str(held)], CorpusConfig()))
    cfg = LMEvalConfig(context=CTX, window_stride=STRIDE)
    plain = evaluate_lm(model, tok, docs, cfg, progress=False)
    scorer = KNNScorer(model, KNNStore.open(out), KNNLMConfig(k=8, lmbda=0.0), STRIDE)
    knn = evaluate_lm(model, tok, docs, cfg, scorer=scorer, method="knn-lm", progress=False)
    assert knn["tokens"] == plain["tokens"] and knn["bytes"] == plain["bytes"]
    assert knn["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)


def test_query_blocks_do_not_change_the_result(knn_setup, lm):
    """Searching a document's positions in blocks (bounded memory) gives the same p_kNN as one search."""
    _, held, out, _ = knn_setup
    model, tok = lm
    t = make_targets(next(iter_documents([str(held)], CorpusConfig())), tok)
    whole = KNNScorer(model, KNNStore.open(out), KNNLMConfig(k=8, lmbda=0.5), STRIDE)
    blocked = KNNScorer(model, KNNStore.open(out), KNNLMConfig(k=8, lmbda=0.5), STRIDE)
    blocked.query_block = 7
    assert t.n_targets > 3 * blocked.query_block
    torch.testing.assert_close(whole(t, CTX)[0], blocked(t, CTX)[0])


def test_same_document_exclusion_and_leakage(knn_setup, tiny_lm):
    corpus, _, out, _ = knn_setup
    base = dict(model=tiny_lm, data=[str(corpus)], datastore=str(out), lm=LMEvalConfig(CTX, STRIDE, max_docs=2))
    none = run_eval_lm(EvalLMConfig(method="none", **{k: v for k, v in base.items() if k != "datastore"}),
                       progress=False)
    leak = run_eval_lm(EvalLMConfig(method="knn-lm", options={"knn": KNNLMConfig(k=8, lmbda=0.5)},
                                    exclude_same_doc=False, **base), progress=False)
    clean = run_eval_lm(EvalLMConfig(method="knn-lm", options={"knn": KNNLMConfig(k=8, lmbda=0.5)}, **base),
                        progress=False)
    assert leak["ppl"] < 0.6 * none["ppl"]  # its own states are in the store: a near copy
    assert clean["ppl"] > leak["ppl"] * 1.5
    assert leak["tokens"] == clean["tokens"] == none["tokens"]


def test_decontamination_drops_overlapping_neighbours(knn_setup, tiny_lm):
    corpus, _, out, _ = knn_setup
    base = dict(model=tiny_lm, data=[str(corpus)], datastore=str(out), method="knn-lm",
                lm=LMEvalConfig(CTX, STRIDE, max_docs=1), options={"knn": KNNLMConfig(k=8, lmbda=0.5)},
                exclude_same_doc=False)
    leak = run_eval_lm(EvalLMConfig(**base), progress=False)
    decont = run_eval_lm(EvalLMConfig(decontaminate=8, **base), progress=False)
    assert decont["ppl"] > leak["ppl"] * 1.5


def test_lambda_sweep_on_validation_picks_the_best_lambda(knn_setup, tiny_lm):
    corpus, held, out, _ = knn_setup
    r = run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], datastore=str(out), method="knn-lm",
                                 lm=LMEvalConfig(CTX, STRIDE, max_docs=2), exclude_same_doc=False,
                                 options={"knn": KNNLMConfig(k=8, validation=[str(corpus)],
                                                             lmbda_grid=(0.0, 0.3, 0.9))}),
                    progress=False)
    sweep = {float(k): v for k, v in r["lmbda_sweep_validation"].items()}
    assert r["lmbda"] == min(sweep, key=sweep.get) and r["lmbda"] > 0  # leaked validation: retrieval wins
    assert r["ppl"] == pytest.approx(r["lmbda_sweep_test"][str(r["lmbda"])], rel=1e-3)
    temps = {float(k): v for k, v in r["temperature_sweep_validation"].items()}
    assert set(temps) == {1.0, 3.0, 10.0, 30.0, 100.0}
    assert r["temperature"] == min(temps, key=temps.get) and temps[r["temperature"]] == min(sweep.values())


def test_temperature_sweep_equals_scoring_at_that_temperature(knn_setup, tiny_lm):
    corpus, held, out, _ = knn_setup
    base = dict(model=tiny_lm, data=[str(held)], datastore=str(out), method="knn-lm",
                lm=LMEvalConfig(CTX, STRIDE, max_docs=1), exclude_same_doc=False)
    swept = run_eval_lm(EvalLMConfig(options={"knn": KNNLMConfig(k=8, validation=[str(held)], lmbda_grid=(0.5,),
                                                                 temperature_grid=(1.0, 7.0))}, **base),
                        progress=False)
    for temp in (1.0, 7.0):
        direct = run_eval_lm(EvalLMConfig(options={"knn": KNNLMConfig(k=8, lmbda=0.5, temperature=temp,
                                                                      lmbda_grid=(0.5,))}, **base), progress=False)
        assert swept["temperature_sweep_validation"][str(temp)] == pytest.approx(direct["ppl"], rel=1e-4)
    with pytest.raises(RalmError, match="--temperature-grid"):
        EvalLMConfig(options={"knn": KNNLMConfig(temperature_grid=(0.0,), lmbda_grid=(0.5,))}, **base)


def test_subset_view_searches_only_its_rows(knn_setup):
    _, _, out, _ = knn_setup
    store = KNNStore.open(out)
    rows = np.arange(0, len(store), 3)
    view = store.restrict(rows)
    _, I = view.search(store.keys.get(np.arange(10)), 5)  # noqa: E741
    assert len(view) == len(rows) and np.isin(I, rows).all()
    assert len(store) > len(view)  # the parent is untouched


def test_rebuild_is_a_no_op_and_other_params_are_refused(knn_setup, tiny_lm):
    corpus, _, out, _ = knn_setup
    cfg = KNNBuildConfig([str(corpus)], str(out), model=tiny_lm, context=CTX, window_stride=STRIDE,
                         index=IndexConfig("flat", metric="l2"))
    assert build_knn_store(cfg, progress=False)["already_complete"]
    with pytest.raises(RalmError, match="other inputs or parameters"):
        build_knn_store(KNNBuildConfig([str(corpus)], str(out), model=tiny_lm, context=CTX, window_stride=8,
                                       index=IndexConfig("flat", metric="l2")), progress=False)


# ---- bad input ---------------------------------------------------------------------------------------
def test_lambda_outside_unit_interval_is_one_line(knn_setup, tiny_lm):
    _, held, out, _ = knn_setup
    for bad in ("1.5", "-0.1"):
        r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "knn-lm",
                                "--datastore", str(out), "--lmbda", bad, "-q"])
        fails(r, "--lmbda", "[0, 1]")
    r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "knn-lm",
                            "--datastore", str(out), "--lmbda-grid", "0,2", "-q"])
    fails(r, "--lmbda-grid")


def test_store_of_another_tokenizer_is_refused(knn_setup, tmp_path, tiny_lm, tiny_tokenizer):
    """A store whose values are another tokenizer's ids: eval must refuse, not score garbage."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    _, held, out, _ = knn_setup
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer)
    tok.add_tokens(["zzqx"])  # one more token: another vocabulary, same hidden size
    tok.bos_token = "[CLS]"
    other = tmp_path / "other-lm"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(other)
    tok.save_pretrained(other)
    r = runner.invoke(app, ["eval-lm", "--model", str(other), "--data", str(held), "--method", "knn-lm",
                            "--datastore", str(out), "-q"])
    fails(r, str(out), "tokeniz")


def test_store_of_another_model_is_refused(knn_setup, tmp_path, tiny_lm):
    _, held, out, _ = knn_setup
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # same tokenizer and size, other hidden states
    other = tmp_path / "other-lm"
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(other)
    with pytest.raises(IncompatibleError, match="rebuild the store"):
        run_eval_lm(EvalLMConfig(model=str(other), data=[str(held)], datastore=str(out), method="knn-lm"),
                    progress=False)


def test_retrieval_store_is_not_a_knn_store(tmp_path, corpus, build_args, tiny_lm):
    ds = tmp_path / "ds"
    assert runner.invoke(app, ["build", str(corpus), "--out", str(ds), *build_args]).exit_code == 0
    r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(corpus), "--method", "knn-lm",
                            "--datastore", str(ds), "-q"])
    fails(r, "not a ralm kNN-LM store", "ralm knnlm build")
    with pytest.raises(StoreError, match="no such"):
        KNNStore.open(tmp_path / "missing")


def test_knnlm_build_cli_and_bad_input(tmp_path, tiny_lm):
    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=3, words=40)
    out = tmp_path / "knn"
    r = runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(out), "--model", tiny_lm, "--context", "32",
                            "--index", "flat", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["keys"] == len(KNNStore.open(out))
    fails(runner.invoke(app, ["knnlm", "build", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "k2"),
                              "--model", tiny_lm, "-q"]), "nope.jsonl")
    assert not (tmp_path / "k2").exists()
    fails(runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(tmp_path / "k3"), "--model", "no-such-model",
                              "-q"]), "no-such-model")
    fails(runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(tmp_path / "k4"), "--model", tiny_lm,
                              "--batch-size", "0", "-q"]), "--batch-size")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"id": "b", "text": "   "}])
    fails(runner.invoke(app, ["knnlm", "build", str(blank), "--out", str(tmp_path / "k5"), "--model", tiny_lm, "-q"]),
          "blank.jsonl")
    assert not (tmp_path / "k5").exists()


def test_leakage_report_for_knnlm_and_in_context(knn_setup, tmp_path, tiny_lm, build_args):
    """Leaked neighbours land in the full-overlap bucket; the buckets cover every scored token."""
    corpus, _, out, _ = knn_setup
    r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(corpus), "--method", "knn-lm",
                            "--datastore", str(out), "--no-exclude-same-doc", "--max-docs", "1", "--context", "32",
                            "--window-stride", "16", "--k", "8", "--leakage-report", "--json", "-q"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    buckets = res["leakage"]["buckets"]
    assert sum(b["tokens"] for b in buckets) == res["tokens"]
    assert buckets[-1]["tokens"] > 0.5 * res["tokens"]  # its own windows are in the store
    ds = tmp_path / "ds"
    assert runner.invoke(app, ["build", str(corpus), "--out", str(ds), *build_args]).exit_code == 0
    r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(corpus), "--method", "in-context",
                            "--datastore", str(ds), "--max-docs", "1", "--context", "64", "--doc-tokens", "16",
                            "--leakage-report", "-q"])
    assert r.exit_code == 0, r.output
    assert "|" in r.stdout and "none" in r.stdout  # the markdown table, with the plain-LM column
    fails(runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(corpus), "--leakage-report", "-q"]),
          "--leakage-report")
