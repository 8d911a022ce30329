"""``ralm diagnose --run RP`` over a RetroPrompt run (issue 15 on issue 14's method): the knowledge store's
searches go through the one retriever interface, so every store ablation reaches RetroPrompt; the real wrap
changes nothing (off = baseline), each ablation does what it says per channel (p_kNN over all rows, each class's
demonstrations), the CLI runs end to end with a prompt-tuning baseline, and bad input is one line.
Tiny random Llama, generated texts (tests/test_retroprompt_train.py's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ralm.tuning.retroprompt as rp
from badinput import fails, runner
from ralm.cli import app
from ralm.core.ablations import RecordingRetriever, RetrievalLog, ablation_wrap
from ralm.core.retriever import EmptyRetriever
from ralm.errors import RalmError
from ralm.eval.diagnose import DiagnoseConfig, Units, measure_conditions
from ralm.methods.retroprompt.knn import KNNConfig, store_knn_probs
from ralm.methods.retroprompt.store import KnowledgeRetriever, KnowledgeStore
from ralm.tuning.retroprompt_diagnose import RetroPromptSubject, random_texts
from test_retroprompt_train import config, data  # noqa: F401  (the generated data fixture)


@pytest.fixture(scope="module")
def run(data, tiny_lm, tmp_path_factory):  # noqa: F811
    """A finished 4-step RetroPrompt run (LoRA, 2 demonstrations, 8 test examples)."""
    out = tmp_path_factory.mktemp("rp-diag") / "run"
    rp.train_retroprompt(config(data, tiny_lm, out, peft="lora", lr=1e-2), progress=False)
    return out


@pytest.fixture(scope="module")
def subject(run):
    return RetroPromptSubject(run, "test")


def test_real_wrap_equals_the_run_and_a_saved_run_reproduces_it(subject, run):
    plain = subject.measure(None)
    log = RetrievalLog()
    recorded = subject.measure(lambda r: RecordingRetriever(r, log))
    assert np.array_equal(plain, recorded)  # the recording wrap changes nothing
    assert set(plain) <= {0.0, 100.0}  # accuracy points per example, as the task runs' metrics
    assert plain.mean() == pytest.approx(100 * rp.evaluate_retroprompt(run, "test")["accuracy"])
    # every search was made through the wrapper: per example its p_kNN and one demonstration search per class
    assert len(log) == len(subject.examples) * (1 + subject.store.n_classes)


def test_channels_get_their_own_logs_and_ablations(subject):
    seen: dict = {}

    def measure(wrap):
        def spy(r):
            w = wrap(r)
            seen.setdefault(r.channel, []).append(type(w).__name__)
            return w
        return Units(subject.measure(spy))

    units, real_log, _ = measure_conditions(measure, ("shuffled", "fixed", "random", "none"), seed=0, perturb=None)
    assert set(seen) == {None, 0, 1}  # p_kNN and one demonstration search per class
    assert len(real_log) == len(subject.examples) and all(len(r) == subject.r.cfg.knn.k for r in real_log.I)
    assert {len(u.values) for u in units.values()} == {len(subject.examples)}


def test_class_channel_ablations_stay_inside_their_class(subject):
    store = subject.store
    for c in range(store.n_classes):
        log = RetrievalLog()
        q = store.raw[:6]
        rec = RecordingRetriever(KnowledgeRetriever(store, c), log)
        rec.search(q.numpy(), 2)
        for name in ("random", "fixed", "shuffled"):
            _, I = ablation_wrap(name, log, seed=1)(KnowledgeRetriever(store, c)).search(q.numpy(), 2)  # noqa: E741
            assert np.isin(I, store.members[c]).all(), name  # a class's demonstrations come from its own rows


def test_no_retrieval_gives_uniform_knn_and_zero_demonstrations(subject):
    store = subject.store
    q = store.raw[:3]
    with store.wrapped(EmptyRetriever):
        p = store_knn_probs(store, q, KNNConfig(k=3))
        from ralm.methods.retroprompt.demos import neural_demos

        d = neural_demos(store, q, 2)
    assert torch.allclose(p, torch.full_like(p, 1 / store.n_classes))
    assert torch.count_nonzero(d) == 0
    assert store._wrapped is None  # unwrapped on exit  # noqa: SLF001


def test_wrapped_unwraps_after_an_error(subject):
    store = subject.store
    with pytest.raises(ValueError), store.wrapped(EmptyRetriever):
        raise ValueError
    assert store._wrapped is None  # noqa: SLF001
    _, ids = store.search(store.raw[:2], 2)
    assert (ids >= 0).all()


def test_random_text_keeps_word_counts_and_labels(subject):
    train = subject.r.draw.split.train
    fake = random_texts(train, 0)
    assert [len(e.text.split()) for e in fake] == [len(e.text.split()) for e in train]
    assert [e.label for e in fake] == [e.label for e in train]
    assert [e.text for e in fake] != [e.text for e in train]
    words = {w for e in train for w in e.text.split()}
    assert all(w in words for e in fake for w in e.text.split())
    view = subject.store.random_text_view(0)
    assert view.raw.shape == subject.store.raw.shape and not torch.equal(view.raw, subject.store.raw)
    assert view.keys is subject.store.keys  # the search is the real one; only what is summed changes


def test_random_text_of_a_store_without_an_encoder_is_refused():
    store = KnowledgeStore(torch.randn(4, 3), [0, 0, 1, 1], 2)
    with pytest.raises(RalmError, match="no random-text encoder"):
        store.random_text_view(0)


def test_cli_over_a_retroprompt_run(run, tmp_path):
    out = tmp_path / "diag"
    res = runner.invoke(app, ["diagnose", "--run", str(run), "--out", str(out), "--n-virtual", "2",
                              "--baseline-lrs", "0.01", "--baseline-steps", "2", "--n-boot", "50", "--json", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["subject"]["method"] == "retroprompt" and r["metric"] == "acc"
    assert set(r["conditions"]) >= {"real", "none", "shuffled", "random", "random-text", "fixed", "base",
                                    "prompt-tuning"}
    assert r["conditions"]["prompt-tuning"]["trained_parameters"] == 2 * 32  # 2 virtual tokens x hidden 32
    assert r["verdict"] in ("retrieval-dependent", "acts as a soft prompt", "no gain")
    assert r["context_variance"]["inputs"] == 8
    assert (out / "diagnose.md").is_file() and (out / "diagnose.png").is_file()


def test_bad_input_is_one_line(run, tmp_path):
    fails(runner.invoke(app, ["diagnose", "--run", str(run), "--out", str(tmp_path / "d"), "--split", "train"]),
          "--split", "dev or test")
    with pytest.raises(RalmError, match="at least 2"):
        RetroPromptSubject(run, "test", limit=1)
    DiagnoseConfig(out=str(tmp_path / "ok"), run=str(run))  # a RetroPrompt run is accepted as --run
