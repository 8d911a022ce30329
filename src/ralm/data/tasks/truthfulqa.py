"""Multiple-choice QA on TruthfulQA (``ralm data get truthfulqa-mc``: BIG-bench 1.0.0's truthful_qa, 299
questions). No official splits: 50 / 25 / 25 % of the questions by a seeded hash of their id
(``base.seeded_split``); at seed 0 that is 150 / 75 / 74 questions. A quarter each for validation and test
because accuracy on ~75 questions already has a standard error of ~5 points.

The file (one question a line, written by ``ralm.data.registry``; the layout of TruthfulQA's own
multiple-choice release)::

    {"id": str, "question": str, "category": str,
     "mc1_targets": {"choices": [str], "labels": [1, 0, ...]},    # exactly one 1
     "mc2_targets": {"choices": [str], "labels": [1, ..., 0, ...]}}  # optional

MC1 (2-5 choices, one true) is what accuracy is computed on; MC2 (every true and false reference answer)
is kept for the MC2 score (``ralm.core.task_metrics.mc2_score``).
"""

from __future__ import annotations

from pathlib import Path

from ralm.data.tasks.base import SPLITS, ChoiceExample, dict_field, keyed_records, list_field, seeded_split, text_field
from ralm.errors import RalmError

FRACTIONS = (0.5, 0.25, 0.25)


def _targets(rec: dict, key: str, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    t = dict_field(rec, key, where)
    where = f"{where}: {key!r}"
    choices, labels = list_field(t, "choices", where), list_field(t, "labels", where)
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise RalmError(f"{where}: 'choices': expected non-empty strings")
    if len(set(choices)) != len(choices):
        raise RalmError(f"{where}: 'choices': a choice appears twice")
    if len(choices) < 2:
        raise RalmError(f"{where}: 'choices': {len(choices)} choice(s), need at least 2")
    if len(labels) != len(choices) or any(x not in (0, 1) or isinstance(x, bool) for x in labels):
        raise RalmError(f"{where}: 'labels': expected one 0 or 1 per choice ({len(choices)} choices)")
    return tuple(choices), tuple(labels)


def read_truthfulqa(path: Path, seed: int = 0) -> dict[str, list[ChoiceExample]]:
    """All questions by split (seeded split by id), each split in file order."""
    examples: list[ChoiceExample] = []
    for where, qid, rec in keyed_records(path, "question"):
        question = text_field(rec, "question", where)
        category = rec.get("category", "")
        if not isinstance(category, str):
            raise RalmError(f"{where}: 'category': expected str, got {type(category).__name__}")
        choices, labels = _targets(rec, "mc1_targets", where)
        if sum(labels) != 1:
            raise RalmError(f"{where}: 'mc1_targets': 'labels': {sum(labels)} true choices, MC1 needs exactly 1")
        mc2 = _targets(rec, "mc2_targets", where) if "mc2_targets" in rec else ((), ())
        examples.append(ChoiceExample(qid, question.strip(), choices, labels.index(1), category, *mc2))
    split_of = seeded_split((e.id for e in examples), FRACTIONS, seed, salt="truthfulqa")
    out: dict[str, list[ChoiceExample]] = {s: [] for s in SPLITS}
    for e in examples:
        out[split_of[e.id]].append(e)
    return out
