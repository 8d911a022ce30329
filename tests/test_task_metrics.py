"""Task metrics (ralm.core.task_metrics): SQuAD EM/F1 as eval-qa computes them, ROUGE on known strings,
multiple-choice accuracy under each normalisation on hand-made numbers where they disagree, MC2."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ralm.core.task_metrics import (
    DEFAULT_NORMALISATION,
    choice_accuracy,
    choice_scores,
    mc2_score,
    rouge,
    rouge_scores,
    squad_em,
    squad_f1,
    squad_scores,
)
from ralm.eval import qa

SRC = Path(__file__).resolve().parent.parent / "src"
PREDS = ["the Broncos.", "Denver Broncos", "y x y", "", "an", "Paris, France"]
GOLDS = [["Broncos"], ["Broncos", "Denver"], ["y y z"], ["Paris"], ["the"], ["Paris", "France"]]


def test_squad_em_f1_equal_eval_qas_on_the_same_inputs() -> None:
    # the numbers eval-qa produced before the metrics moved here (hand-checked: F1 2/3 = P 1/2, R 1; ...)
    em = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    f1 = [1.0, 2 / 3, 2 / 3, 0.0, 1.0, 2 / 3]
    for p, g, e, f in zip(PREDS, GOLDS, em, f1, strict=True):
        assert squad_em(p, g) == qa.squad_em(p, g) == e
        assert squad_f1(p, g) == pytest.approx(f) and qa.squad_f1(p, g) == squad_f1(p, g)
    s = squad_scores(PREDS, GOLDS)
    assert s == qa.squad_scores(PREDS, GOLDS)
    assert s["em"] == pytest.approx(100 * 2 / 6) and s["f1"] == pytest.approx(100 * (2 + 3 * 2 / 3) / 6)


def test_rouge_equal_strings_score_one_and_disjoint_zero() -> None:
    ref = "They propose a statistical method for ranking candidate answers."
    assert rouge(ref, ref) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge("Completely unrelated words here", ref) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert rouge("", ref) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_known_values_and_stemming() -> None:
    r = rouge("the cat sat", "the cat sat on the mat")
    assert r["rouge1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # P 3/3, R 3/6
    assert r["rouge2"] == pytest.approx(2 * 1 * 0.4 / 1.4)  # P 2/2, R 2/5
    assert r["rougeL"] == pytest.approx(2 / 3)  # LCS 3
    assert rouge("dogs running", "dog runs")["rouge1"] == 1.0  # Porter stemming is on
    shuffled = rouge("mat sat cat the", "the cat sat on the mat")
    assert shuffled["rougeL"] < shuffled["rouge1"] == pytest.approx(0.8)  # order matters to LCS only


def test_rouge_scores_are_means_in_points() -> None:
    s = rouge_scores(["a b c", "x y"], ["a b c", "p q"])
    assert s == {"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_scores([], [])


# Each example is won by a different normalisation (gold = `label`):
#  0: gold is long and likely per byte, unlikely per token      -> only per-byte right
#  1: gold has few bytes per token                              -> only per-token right
#  2: gold is short and likely in total                         -> only sum right
#  3: a three-way tie that includes the gold                    -> 1/2 credit (two tied) for all
LOGLIKS = [[-6.0, -5.0], [-4.0, -6.0], [-3.0, -1.0], [-2.0, -2.0, -5.0]]
TOKENS = [[3, 5], [2, 6], [4, 1], [1, 1, 1]]
BYTES = [[30, 10], [16, 12], [20, 2], [4, 4, 4]]
LABELS = [0, 1, 1, 0]


def test_each_normalisation_on_numbers_where_they_disagree() -> None:
    def acc(i: int, m: str) -> float:
        return choice_accuracy([LOGLIKS[i]], [LABELS[i]], [TOKENS[i]], [BYTES[i]], m)

    assert [acc(0, m) for m in ("sum", "per-token", "per-byte")] == [0.0, 0.0, 1.0]
    assert [acc(1, m) for m in ("sum", "per-token", "per-byte")] == [0.0, 1.0, 0.0]
    assert [acc(2, m) for m in ("sum", "per-token", "per-byte")] == [1.0, 0.0, 0.0]
    assert [acc(3, m) for m in ("sum", "per-token", "per-byte")] == [0.5, 0.5, 0.5]
    s = choice_scores(LOGLIKS, LABELS, TOKENS, BYTES)
    assert s == {"acc_sum": 37.5, "acc_per_token": 37.5, "acc_per_byte": 37.5, "acc": 37.5}
    two = choice_scores(LOGLIKS[:2], LABELS[:2], TOKENS[:2], BYTES[:2])
    assert two == {"acc_sum": 0.0, "acc_per_token": 50.0, "acc_per_byte": 50.0, "acc": 50.0}
    first = choice_scores(LOGLIKS[:1], LABELS[:1], TOKENS[:1], BYTES[:1])
    assert first["acc"] == first["acc_per_byte"] == 100.0 and first["acc_per_token"] == 0.0  # acc is per-byte
    assert DEFAULT_NORMALISATION == "per-byte"
    assert choice_accuracy(LOGLIKS[:1], LABELS[:1], n_bytes=BYTES[:1]) == 1.0  # the default, without token counts


def test_a_tie_is_not_won_by_the_first_choice() -> None:
    # TruthfulQA lists the true answer first: a model scoring all choices alike must not get them all right
    assert choice_accuracy([[-1.0] * 4], [0], normalisation="sum") == 0.25
    assert choice_accuracy([[-math.inf, -math.inf]], [1], normalisation="sum") == 0.5


def test_bad_choice_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown normalisation 'mean'; known: sum, per-token, per-byte"):
        choice_accuracy(LOGLIKS, LABELS, TOKENS, BYTES, "mean")
    with pytest.raises(ValueError, match="needs the token counts"):
        choice_accuracy(LOGLIKS, LABELS, normalisation="per-token")
    with pytest.raises(ValueError, match=r"example 1: byte counts \[0, 12\] must be positive"):
        choice_accuracy(LOGLIKS[:2], LABELS[:2], n_bytes=[BYTES[0], [0, 12]])
    with pytest.raises(ValueError, match="example 0: label 2 outside 0..1"):
        choice_accuracy([[-1.0, -2.0]], [2], normalisation="sum")
    with pytest.raises(ValueError, match="need one per choice and >= 2 choices"):
        choice_accuracy([[-1.0]], [0], normalisation="sum")
    with pytest.raises(ValueError, match="must be numbers or -inf"):
        choice_accuracy([[-1.0, math.nan]], [0], normalisation="sum")
    with pytest.raises(ValueError, match="3 labels for 4 examples"):
        choice_accuracy(LOGLIKS, LABELS[:3], normalisation="sum")
    with pytest.raises(ValueError, match="no examples"):
        choice_accuracy([], [], normalisation="sum")


def test_mc2_is_the_normalised_mass_on_true_answers() -> None:
    assert mc2_score([math.log(0.5), math.log(0.3), math.log(0.2)], [1, 0, 1]) == pytest.approx(0.7)
    assert mc2_score([-1000.0, -1001.0], [1, 0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow
    with pytest.raises(ValueError, match="at least one true and one false"):
        mc2_score([-1.0, -2.0], [1, 1])
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 labels"):
        mc2_score([-1.0, -2.0], [1, 0, 0])


def test_importing_the_metrics_does_not_load_rouge_score() -> None:
    # eval-qa imports the SQuAD metrics from this module; rouge_score (nltk, absl: ~2.5 s) loads on first use
    code = "import sys, ralm.core.task_metrics as m; assert 'rouge_score' not in sys.modules; m.rouge('a', 'a'); " \
           "assert 'rouge_score' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
