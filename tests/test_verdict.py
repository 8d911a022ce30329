"""The ``ralm diagnose`` verdict (issue 15) on hand-made intervals and per-unit values: each of the three
outcomes, for a lower-is-better metric (ppl) and a higher-is-better one (F1), with its rule and numbers."""

from __future__ import annotations

import numpy as np
import pytest

from ralm.errors import RalmError
from ralm.eval.bootstrap import Interval
from ralm.eval.verdict import DEPENDENT, NO_GAIN, RULE, SOFT_PROMPT, better_sign, decide, verdict_from_units

BELOW, ABOVE, COVERS = Interval(-2.0, -3.0, -1.0), Interval(2.0, 1.0, 3.0), Interval(0.1, -0.5, 0.7)


def flip(iv: Interval) -> Interval:
    return Interval(-iv.estimate, -iv.high, -iv.low, iv.level)


def cases(good: Interval, bad: Interval):
    """(real - X intervals, X - none intervals, expected verdict); ``good``: the better side of 0."""
    req = ("shuffled", "random", "fixed")
    return [
        ({**{a: good for a in req}, "prompt-tuning": good}, {"real": good, "random": COVERS}, DEPENDENT),
        # real beats the ablations but not prompt tuning: the gain is a learnt prefix's
        ({**{a: good for a in req}, "prompt-tuning": bad}, {"real": good}, SOFT_PROMPT),
        # the ablations keep the gain over no retrieval and real is no better than them
        ({a: COVERS for a in (*req, "prompt-tuning")}, {"real": good, "shuffled": good, "fixed": good}, SOFT_PROMPT),
        ({a: COVERS for a in (*req, "prompt-tuning")}, {"real": COVERS, "random-text": COVERS}, NO_GAIN),
        # beats every ablation but one, and no gain anywhere
        ({"shuffled": good, "random": good, "fixed": COVERS, "prompt-tuning": good}, {"real": COVERS}, NO_GAIN),
        # no baseline run: cannot be called retrieval-dependent, but the gain is there
        ({a: good for a in req}, {"real": good}, SOFT_PROMPT),
    ]


@pytest.mark.parametrize("metric,good,bad", [("ppl", BELOW, ABOVE), ("f1", ABOVE, BELOW)])
def test_three_outcomes_in_both_directions(metric, good, bad):
    for vs, none_vs, want in cases(good, bad):
        v = decide(metric, vs, none_vs)
        assert v.verdict == want, (metric, vs, none_vs)
        assert v.rule == RULE and v.text().startswith(f"verdict: {want}\nrule: ")
    # the same intervals read in the other direction: what is good for ppl is bad for F1
    flipped = decide(metric, {a: flip(good) for a in ("shuffled", "random", "fixed", "prompt-tuning")},
                     {"real": flip(good)})
    assert flipped.verdict == NO_GAIN


def test_the_printed_rule_names_the_numbers():
    v = decide("ppl", {"shuffled": BELOW, "random": BELOW, "fixed": COVERS}, {"real": BELOW, "random-text": COVERS})
    text = v.text()
    assert "ppl: lower is better" in text
    assert "real beats shuffled: real - shuffled = -2 [-3, -1] (95% CI)" in text
    assert "real does not beat fixed: real - fixed = 0.1 [-0.5, 0.7] (95% CI)" in text
    assert "no baseline run" in text and "random-text does not beat none" in text
    assert v.verdict == SOFT_PROMPT  # real beats none, not the (absent) baseline


def test_verdict_refuses_missing_comparisons_and_unknown_metrics():
    with pytest.raises(RalmError, match="no paired interval of real against random, fixed"):
        decide("ppl", {"shuffled": BELOW}, {"real": BELOW})
    with pytest.raises(RalmError, match="against no retrieval"):
        decide("ppl", {"shuffled": BELOW, "random": BELOW, "fixed": BELOW}, {})
    with pytest.raises(RalmError, match="metric 'auc': unknown direction"):
        better_sign("auc")
    with pytest.raises(RalmError, match="no per-unit values for 'none'"):
        verdict_from_units("f1", {"real": [1.0]})
    assert better_sign("ppl") == -1 and better_sign("rougeL") == 1


def test_verdict_from_per_unit_values():
    """Synthetic per-document NLL sums: retrieval cuts the loss only with the real store (dependent), or every
    context cuts it alike (soft prompt); F1 per example the same way, higher being better."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 150, size=30).astype(float)
    base = tokens * rng.uniform(2.5, 3.5, size=30)  # nats per document without retrieval
    noise = lambda: rng.normal(0, 0.5, 30)  # noqa: E731
    dependent = {"none": base, "real": base * 0.8 + noise(), "prompt-tuning": base * 0.97 + noise(),
                 **{a: base + noise() for a in ("shuffled", "random", "fixed", "random-text")}}
    v = verdict_from_units("ppl", dependent, tokens, kind="ppl", n_boot=300)
    assert v.verdict == DEPENDENT, v.text()
    soft = {"none": base, "prompt-tuning": base * 0.9 + noise(),
            **{a: base * 0.9 + noise() for a in ("real", "shuffled", "random", "fixed")}}
    assert verdict_from_units("ppl", soft, tokens, kind="ppl", n_boot=300).verdict == SOFT_PROMPT
    same = {a: base + noise() for a in ("none", "real", "shuffled", "random", "fixed", "prompt-tuning")}
    assert verdict_from_units("ppl", same, tokens, kind="ppl", n_boot=300).verdict == NO_GAIN
    f1 = rng.uniform(0.2, 0.4, size=50)
    units = {"none": f1, "real": f1 + 0.3, "prompt-tuning": f1 + 0.05,
             **{a: f1 + rng.normal(0, 0.01, 50) for a in ("shuffled", "random", "fixed")}}
    assert verdict_from_units("f1", units, n_boot=300).verdict == DEPENDENT
    assert verdict_from_units("ppl", units, n_boot=300).verdict == NO_GAIN  # F1-like gains read as ppl: worse


def test_a_penalised_none_gives_way_to_the_frozen_base():
    """kNN-LM's none = (1 - λ)·p_LM: every neighbour-keeping ablation "beats" it by -log(1 - λ) nats per token.
    With the frozen base beside it the reference is the base, and a store no better than the base is no gain;
    a trained method's none (better than its zero-shot base) stays the reference."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 150, size=30).astype(float)
    base = tokens * rng.uniform(2.5, 3.5, size=30)
    noise = lambda: rng.normal(0, 0.5, 30)  # noqa: E731
    penalised = base + tokens * -np.log(0.75)  # what kNN-LM's none scores
    units = {"base": base, "none": penalised, "real": base + noise(), "prompt-tuning": base * 0.97 + noise(),
             **{a: base + noise() for a in ("shuffled", "random", "fixed", "random-text")}}
    without_base = verdict_from_units("ppl", {k: v for k, v in units.items() if k != "base"}, tokens, "ppl",
                                      n_boot=300)
    assert without_base.verdict == SOFT_PROMPT  # the artefact: the penalty alone reads as a kept gain
    v = verdict_from_units("ppl", units, tokens, "ppl", n_boot=300)
    assert v.verdict == NO_GAIN and "no retrieval = base" in v.text() and "real does not beat base" in v.text()
    trained = {**units, "none": base * 0.9, "base": base}  # a tuned model without retrieval beats its base
    assert "no retrieval = base" not in verdict_from_units("ppl", trained, tokens, "ppl", n_boot=300).text()
