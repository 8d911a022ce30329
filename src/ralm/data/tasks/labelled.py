"""Labelled examples for classification (issue 14): Rotten Tomatoes, BBC News, any JSONL with ``text`` and
``label``, and Fashion-MNIST images. ``load_labelled(name) -> LabelledData`` (classes + splits).

Neither text set has an official split, so a fixed test split is cut here: 20 % of the distinct texts,
ranked by a hash of the text (``base.seeded_split`` at seed 0; independent of any few-shot seed, so every run
is scored on the same examples). Splitting by text keeps repeated texts (55 in Rotten Tomatoes, 98 in BBC
News) on one side. Sizes on the shared files:

| set | train | test | classes |
|---|---|---|---|
| rotten-tomatoes | 10,247 | 2,561 | fresh, rotten |
| bbc-news | 1,784 | 441 | business, entertainment, politics, sports, tech |
| fashion-mnist | 60,000 | 10,000 | the 10 of ``fashion_mnist.CLASSES`` (its own split) |

The ``validation`` split is empty: the few-shot protocol (``ralm.data.fewshot``) draws its dev split from
``train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ralm.data import registry as datasets
from ralm.data.tasks.base import (
    SPLITS,
    LabelledData,
    LabelledExample,
    check_classes,
    jsonl_records,
    seeded_split,
    text_field,
)
from ralm.data.tasks.fashion_mnist import read_fashion_mnist
from ralm.errors import RalmError

TEST_FRACTION = 0.2


def read_labelled(path: str | Path, classes: Sequence[str] | None = None, *, text_key: str = "text",
                  label_key: str = "label", salt: str = "labelled") -> LabelledData:
    """Every line ``{text_key: str, label_key: str | int, "id"?: str}`` of a JSONL file; ``classes`` default
    to the labels found, sorted. An example's id is its ``id`` field, else ``line-<n>``. Train / test as the
    module says; one-line errors name the file and line (malformed line, missing or empty field, a label
    outside ``classes``) or the class with no examples."""
    path = Path(path)
    examples: list[LabelledExample] = []
    ids: set[str] = set()
    for n, rec in jsonl_records(path):
        where = f"{path}: line {n}"
        text = text_field(rec, text_key, where)
        if label_key not in rec:
            raise RalmError(f"{where}: no {label_key!r} field")
        label = rec[label_key]
        if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
            raise RalmError(f"{where}: {label_key!r}: expected a non-empty string or an integer, got {label!r}")
        rid = text_field(rec, "id", where) if "id" in rec else f"line-{n}"
        if rid in ids:
            raise RalmError(f"{where}: 'id': duplicate id {rid!r}")
        ids.add(rid)
        if classes is not None and str(label) not in classes:
            raise RalmError(f"{where}: label {str(label)!r} is not a class ({', '.join(classes)})")
        examples.append(LabelledExample(rid, text, str(label)))
    if not examples:
        raise RalmError(f"{path}: no examples (empty file)")
    cls = tuple(classes) if classes is not None else tuple(sorted({e.label for e in examples}))
    check_classes(examples, cls, str(path))
    split_of = seeded_split((e.text.strip() for e in examples), (1 - TEST_FRACTION, 0.0, TEST_FRACTION), 0, salt)
    splits: dict[str, list[LabelledExample]] = {s: [] for s in SPLITS}
    for e in examples:
        splits[split_of[e.text.strip()]].append(e)
    return LabelledData(cls, splits)


@dataclass(frozen=True)
class LabelledSpec:
    name: str
    dataset: str  # its ``ralm data get`` name
    classes: tuple[str, ...]
    description: str


LABELLED: dict[str, LabelledSpec] = {
    s.name: s
    for s in [
        LabelledSpec("rotten-tomatoes", "rotten-tomatoes", ("fresh", "rotten"),
                     "movie review snippets, fresh / rotten (the MR task)"),
        LabelledSpec("bbc-news", "bbc-news", ("business", "entertainment", "politics", "sports", "tech"),
                     "BBC News articles in 5 topics"),
        LabelledSpec("fashion-mnist", "fashion-mnist", (), "28x28 grayscale clothing images in 10 classes"),
    ]
}


def load_labelled(name: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> LabelledData:
    """A named labelled set (``LABELLED``) from ``path`` or the data folder, or, for any other ``name``, the
    labelled JSONL file ``path``."""
    spec = LABELLED.get(name)
    if spec is None:
        if path is None:
            raise RalmError(f"unknown labelled set {name!r} and no file given; known: {', '.join(LABELLED)}")
        return read_labelled(path, salt=name)
    if path is None:
        path = datasets.data_dir(data_dir) / datasets.DATASETS[spec.dataset].filename
        if not Path(path).exists():
            raise RalmError(f"{name}: no data {path}; fetch it with `ralm data get {spec.dataset}` or pass its path")
    if name == "fashion-mnist":
        return read_fashion_mnist(path)
    return read_labelled(path, spec.classes, salt=name)
