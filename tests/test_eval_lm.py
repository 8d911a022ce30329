"""Sliding-window perplexity and bits per byte on a tiny random causal LM."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_text
from ralm.core.targets import make_targets, window_plan
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.methods.plain import token_nll


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


def reference_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every target 1..n-1 from one full forward pass (no windows)."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="none")


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (10, 4, 4), (50, 16, 5), (7, 32, 16), (2, 2, 1), (33, 8, 1)])
def test_window_plan_scores_every_target_once(n, context, stride):
    scored = []
    for begin, end, first in window_plan(n, context, stride):
        assert end - begin <= context and begin <= first - 1 < end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_single_window_equals_full_forward(lm):
    model, tok = lm
    t = make_targets(Document("d", make_text(random.Random(0), 40), "x"), tok)
    assert t.ids[0] == tok.bos_token_id and t.n_targets == len(t.ids) - 1
    got = token_nll(model, t, context=len(t.ids), stride=len(t.ids))
    torch.testing.assert_close(got, reference_nll(model, t.ids), rtol=1e-5, atol=1e-5)


def test_sliding_windows_match_reference_within_first_window(lm):
    model, tok = lm
    t = make_targets(Document("d", make_text(random.Random(1), 120), "x"), tok)
    assert len(t.ids) > 60
    got = token_nll(model, t, context=32, stride=8)
    assert got.shape == (t.n_targets,) and torch.isfinite(got).all()
    ref = reference_nll(model, t.ids)
    torch.testing.assert_close(got[:31], ref[:31], rtol=1e-5, atol=1e-5)  # same context in window 1
    # later targets see a truncated context, so they differ from the full-context reference
    assert not torch.allclose(got[40:], ref[40:])


def test_evaluate_reports_ppl_and_true_bpb(lm):
    model, tok = lm
    docs = [Document("a", "Zürich café — naïve 東京 river alpha beta.", "x"), Document("b", "Gamma delta music.", "x")]
    r = evaluate_lm(model, tok, docs, LMEvalConfig(context=16, window_stride=4), progress=False)
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    assert r["bytes"] == n_bytes > sum(len(d.text) for d in docs)  # bytes, not characters
    assert r["tokens"] == sum(make_targets(d, tok).n_targets for d in docs)
    assert math.isclose(r["bpb"], r["nll"] * r["tokens"] / math.log(2) / n_bytes, rel_tol=1e-9)
    assert math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-9)
    assert r["ppl"] > 1 and {"seconds", "tokens_per_second"} <= set(r)


def test_without_bos_the_first_token_is_context_only(lm):
    model, tok = lm
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.bos_token = None
    t = make_targets(Document("d", "alpha beta gamma", "x"), tok2)
    assert t.ids[0] != tok.bos_token_id
    first_len = len(tok2.convert_ids_to_tokens([int(t.ids[0])])[0])
    assert t.scored_bytes == len(b"alpha beta gamma") - first_len


def test_bad_input(lm):
    model, tok = lm
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.bos_token = None
    with pytest.raises(RalmError, match="nothing to score"):
        make_targets(Document("short", "a", "x"), tok2)
    with pytest.raises(RalmError, match="at most 128"):
        evaluate_lm(model, tok, [Document("d", "alpha beta", "x")], LMEvalConfig(context=512), progress=False)
    with pytest.raises(RalmError, match="--window-stride"):
        LMEvalConfig(context=8, window_stride=9)
    with pytest.raises(RalmError, match="no documents"):
        evaluate_lm(model, tok, [], progress=False)
