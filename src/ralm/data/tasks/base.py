"""What every task reader shares: the split names, the example types, a seeded split by group, strict JSONL.

A task reader turns one data file into ``{split: [example]}`` for the three splits ``SPLITS``. The test split
is for the final number only; choices (steps, learning rate, prompt) are made on validation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ralm.data.squad import QAExample
from ralm.errors import RalmError

SPLITS = ("train", "validation", "test")

__all__ = ["SPLITS", "ChoiceExample", "LabelledData", "LabelledExample", "QAExample", "SummaryExample",
           "check_classes", "dict_field", "jsonl_records", "keyed_records", "list_field", "seeded_split", "text_field"]


@dataclass(frozen=True)
class SummaryExample:
    id: str  # f"{paper_id}/{aspect}"
    paper_id: str
    title: str
    aspect: str  # challenge | approach | outcome
    document: str  # the paper's full text: what retrieval chunks and the model reads
    source: str  # the sections the summaries were written from (abstract, introduction, conclusion)
    summary: str  # the reference summary


@dataclass(frozen=True)
class ChoiceExample:
    id: str
    question: str
    choices: tuple[str, ...]  # MC1 choices, in file order (TruthfulQA puts the true one first)
    label: int  # index of the single true choice
    category: str = ""
    mc2_choices: tuple[str, ...] = ()  # every true and false answer (empty when the file has none)
    mc2_labels: tuple[int, ...] = ()  # 1 = true, one per mc2 choice


@dataclass(frozen=True, eq=False)  # eq=False: an image array has no truth value to compare by
class LabelledExample:
    """One example of a classification set: a text or an image, and its class name."""

    id: str
    text: str  # "" for an image
    label: str  # a class name
    image: np.ndarray | None = None  # (h, w) uint8 grayscale, or (h, w, 3) RGB


@dataclass(frozen=True)
class LabelledData:
    classes: tuple[str, ...]  # every class, in a fixed order (the label index order)
    splits: dict[str, list[LabelledExample]] = field(default_factory=dict)  # train / validation / test

    def __post_init__(self) -> None:
        check_classes(self.splits.get("train", []), self.classes, "train split")

    def label_ids(self, examples: Sequence[LabelledExample]) -> np.ndarray:
        """(n,) int64 index of each example's label in ``classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[e.label] for e in examples], dtype=np.int64)


def check_classes(examples: Sequence[LabelledExample], classes: Sequence[str], where: str) -> None:
    """One-line ``RalmError`` for a label outside ``classes`` or a class with no example in ``examples``."""
    seen = {e.label for e in examples}
    if extra := sorted(seen - set(classes)):
        raise RalmError(f"{where}: label {extra[0]!r} is not a class ({', '.join(classes)})")
    if empty := [c for c in classes if c not in seen]:
        raise RalmError(f"{where}: class {empty[0]!r} has no examples")


def seeded_split(keys: Iterable[str], fractions: tuple[float, float, float], seed: int,
                 salt: str) -> dict[str, str]:
    """``key -> split``: the distinct keys ranked by ``sha256(f"{salt}:{seed}:{key}")``; the first
    ``round(n * fractions[0])`` are train, the next ``round(n * fractions[1])`` validation, the rest test.
    Depends only on the set of keys and the seed (not on file order). Every example of one key (a SQuAD
    article) lands in one split, so no paragraph is shared between splits."""
    uniq = sorted(set(keys))
    ranked = sorted(uniq, key=lambda k: hashlib.sha256(f"{salt}:{seed}:{k}".encode()).hexdigest())
    n_train = round(len(ranked) * fractions[0])
    n_val = round(len(ranked) * fractions[1])
    out = {k: "train" for k in ranked[:n_train]}
    out.update({k: "validation" for k in ranked[n_train:n_train + n_val]})
    out.update({k: "test" for k in ranked[n_train + n_val:]})
    return out


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; a one-line ``RalmError`` naming the file and line
    for anything that is not a UTF-8 JSON object."""
    if not path.is_file():
        raise RalmError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise RalmError(f"{path}: line {n}: not UTF-8 (invalid byte at column {e.start + 1})") from None
            except json.JSONDecodeError as e:
                raise RalmError(f"{path}: line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise RalmError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec


def keyed_records(path: Path, what: str) -> Iterator[tuple[str, str, dict]]:
    """``(where, id, object)`` for every record of a JSONL file whose ``id`` is a string unique in the file
    (``what`` names the thing it identifies in the error); ``where`` is ``"{path}: line {n}"``."""
    seen: set[str] = set()
    for n, rec in jsonl_records(path):
        where = f"{path}: line {n}"
        rid = text_field(rec, "id", where)
        if rid in seen:
            raise RalmError(f"{where}: 'id': duplicate {what} id {rid!r}")
        seen.add(rid)
        yield where, rid, rec
    if not seen:
        raise RalmError(f"{path}: no {what}s (empty file)")


def _field(rec: dict, key: str, typ: type, where: str) -> object:
    if key not in rec:
        raise RalmError(f"{where}: no {key!r} field")
    value = rec[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        raise RalmError(f"{where}: {key!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def text_field(rec: dict, key: str, where: str) -> str:
    """``rec[key]`` as a non-empty string; a one-line ``RalmError`` naming ``where`` otherwise."""
    value = _field(rec, key, str, where)
    assert isinstance(value, str)
    if not value.strip():
        raise RalmError(f"{where}: {key!r}: empty")
    return value


def dict_field(rec: dict, key: str, where: str) -> dict:
    value = _field(rec, key, dict, where)
    assert isinstance(value, dict)
    return value


def list_field(rec: dict, key: str, where: str) -> list:
    value = _field(rec, key, list, where)
    assert isinstance(value, list)
    return value
