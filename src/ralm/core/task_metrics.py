"""Task metrics (issue 13), model-free: SQuAD EM/F1, ROUGE-1/2/L, multiple-choice accuracy and MC2.

- SQuAD (``squad_em`` / ``squad_f1`` / ``squad_scores``): the v1.1 definitions, moved here unchanged from
  ``eval/qa.py`` (which imports them from here, so ``ralm eval-qa``'s numbers are the same). Both sides are
  normalised (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed); EM is exact
  equality, F1 the harmonic mean of bag-of-token precision and recall; each question takes the maximum over
  its gold answers; an empty normalised prediction scores 0 (1 only if the gold also normalises to empty).
- ROUGE (``rouge`` / ``rouge_scores``): ROUGE-1, ROUGE-2 and ROUGE-L F-measure from Google's ``rouge-score``
  (the reference implementation), Porter stemming ON, its default tokenizer (lower case, runs of [a-z0-9]:
  other characters, non-ASCII letters included, are dropped). ROUGE-L is sentence-level LCS (``rougeL``,
  not the newline-split ``rougeLsum``: ACLSum's references are one or two sentences).
- Multiple choice (``choice_accuracy`` / ``choice_scores``): the prediction is the choice with the highest
  log-likelihood of its continuation given the prompt, under a normalisation: ``sum`` (the raw total; favours
  short choices), ``per-token`` (divided by the continuation's token count; depends on the tokenizer) or
  ``per-byte`` (divided by its UTF-8 byte count). Default ``per-byte``: it is the only one that does not depend
  on the tokenizer, so SmolLM2 (49k vocabulary) and Gemma-3 (262k) are compared on the same footing; it is
  lm-evaluation-harness's ``acc_norm`` up to bytes vs characters. A tie at the maximum gives 1/(number tied)
  when the gold choice is among them (the expected accuracy of a random tie-break): TruthfulQA lists the true
  answer first, so "first wins" would reward a model that scores every choice the same.
- MC2 (``mc2_score``): TruthfulQA's MC2, the probability mass on the true answers normalised over all
  answers, from the raw (``sum``) log-likelihoods as TruthfulQA defines it.

Per-example values are in 0..1; the ``*_scores`` aggregates are means in points (0-100), as eval-qa reports.
Written here: only the SQuAD normalisation (the official script's, ~15 lines) and the choice arithmetic;
ROUGE is the library's.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

# ---- SQuAD ---------------------------------------------------------------------------------------
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _f1_one(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals one normalised gold answer, else 0.0."""
    if not answers:
        raise ValueError("no gold answers")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 (0..1) of the prediction against the best-matching gold answer."""
    if not answers:
        raise ValueError("no gold answers")
    return max(_f1_one(prediction, a) for a in answers)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 in points (0-100) over paired predictions and gold-answer lists."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no predictions")
    n = len(predictions)
    return {"em": 100 * sum(squad_em(p, a) for p, a in zip(predictions, answers, strict=True)) / n,
            "f1": 100 * sum(squad_f1(p, a) for p, a in zip(predictions, answers, strict=True)) / n}


# ---- ROUGE ---------------------------------------------------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def _rouge_scorer() -> Any:
    # Imported on first use: rouge_score pulls in nltk and absl (~2.5 s here), which eval-qa, importing the
    # SQuAD metrics from this module, should not wait for.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (0..1) of one prediction against one reference (stemmed)."""
    scores = _rouge_scorer().score(reference, prediction)  # the library's order: (target, prediction)
    return {t: scores[t].fmeasure for t in ROUGE_TYPES}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure in points (0-100) over paired predictions and references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions")
    per = [rouge(p, r) for p, r in zip(predictions, references, strict=True)]
    return {t: 100 * sum(s[t] for s in per) / len(per) for t in ROUGE_TYPES}


# ---- multiple choice -----------------------------------------------------------------------------
NORMALISATIONS = ("sum", "per-token", "per-byte")
DEFAULT_NORMALISATION = "per-byte"


def _normalised(logliks: Sequence[float], n_tokens: Sequence[int] | None, n_bytes: Sequence[int] | None,
                normalisation: str, i: int) -> np.ndarray:
    ll = np.asarray(logliks, dtype=np.float64)  # (n_choices,)
    if ll.ndim != 1 or len(ll) < 2:
        raise ValueError(f"example {i}: {ll.shape} log-likelihoods, need one per choice and >= 2 choices")
    if np.isnan(ll).any() or (ll == np.inf).any():
        raise ValueError(f"example {i}: log-likelihoods must be numbers or -inf, got {ll.tolist()}")
    if normalisation == "sum":
        return ll
    counts = n_tokens if normalisation == "per-token" else n_bytes
    if counts is None:
        raise ValueError(f"normalisation {normalisation!r} needs the {normalisation[4:]} counts")
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != ll.shape or (c <= 0).any():
        raise ValueError(f"example {i}: {normalisation[4:]} counts {list(counts)} must be positive, one per choice")
    return ll / c


def _credit(scores: np.ndarray, label: int, i: int) -> float:
    if not 0 <= label < len(scores):
        raise ValueError(f"example {i}: label {label} outside 0..{len(scores) - 1}")
    best = scores == scores.max()
    return float(best[label]) / int(best.sum())


def choice_accuracy(logliks: Sequence[Sequence[float]], labels: Sequence[int],
                    n_tokens: Sequence[Sequence[int]] | None = None, n_bytes: Sequence[Sequence[int]] | None = None,
                    normalisation: str = DEFAULT_NORMALISATION) -> float:
    """Accuracy (0..1) from per-choice log-likelihoods (``logliks[i][j]``: log p(choice j | prompt i), summed
    over its tokens), with token / byte counts of each choice's continuation as scored (leading space
    included) for the ``per-token`` / ``per-byte`` normalisations. Ties at the maximum share the credit."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; known: {', '.join(NORMALISATIONS)}")
    n = len(logliks)
    if not n:
        raise ValueError("no examples")
    for name, xs in (("labels", labels), ("token counts", n_tokens), ("byte counts", n_bytes)):
        if xs is not None and len(xs) != n:
            raise ValueError(f"{len(xs)} {name} for {n} examples")
    total = 0.0
    for i in range(n):
        s = _normalised(logliks[i], None if n_tokens is None else n_tokens[i],
                        None if n_bytes is None else n_bytes[i], normalisation, i)
        total += _credit(s, labels[i], i)
    return total / n


def choice_scores(logliks: Sequence[Sequence[float]], labels: Sequence[int], n_tokens: Sequence[Sequence[int]],
                  n_bytes: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy in points under every normalisation (``acc_sum``, ``acc_per_token``, ``acc_per_byte``) and
    ``acc`` = the default one (``per-byte``)."""
    out = {f"acc_{m.replace('-', '_')}": 100 * choice_accuracy(logliks, labels, n_tokens, n_bytes, m)
           for m in NORMALISATIONS}
    out["acc"] = out[f"acc_{DEFAULT_NORMALISATION.replace('-', '_')}"]
    return out


def mc2_score(logliks: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2 of one question (0..1): sum of p over the true answers / sum of p over all answers,
    from raw summed log-likelihoods (computed in log space)."""
    ll, lab = np.asarray(logliks, dtype=np.float64), np.asarray(labels)
    if ll.shape != lab.shape or ll.ndim != 1 or not ((lab == 0) | (lab == 1)).all():
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(labels)} labels (0 or 1 each)")
    if not lab.any() or lab.all():
        raise ValueError("MC2 needs at least one true and one false answer")
    if np.isnan(ll).any() or np.isneginf(ll).all():
        raise ValueError(f"log-likelihoods must be numbers, not all -inf: {ll.tolist()}")
    top = ll.max()
    mass = np.exp(ll - top)
    return float(mass[lab == 1].sum() / mass.sum())
