"""Task names -> readers: ``load_task("squad", "train")``. Each task reads one file that ``ralm data get``
fetches (``TaskSpec.dataset``) into the data folder, or a file given by path in the same format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ralm.data import registry as datasets
from ralm.data.tasks.aclsum import read_aclsum
from ralm.data.tasks.base import SPLITS, ChoiceExample, QAExample, SummaryExample
from ralm.data.tasks.squad import read_squad_task
from ralm.data.tasks.truthfulqa import read_truthfulqa
from ralm.errors import RalmError

Example = QAExample | SummaryExample | ChoiceExample


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "qa" (generate an answer; EM/F1), "summary" (generate; ROUGE), "choice" (log-likelihood; acc)
    dataset: str  # the ``ralm data get`` name of its file
    description: str
    read: Callable[[Path, int], dict[str, list]]  # (path, seed) -> {split: [example]}


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("squad", "qa", "squad-dev", "document QA: SQuAD v1.1 dev split by article 80/10/10 %",
                 read_squad_task),
        TaskSpec("aclsum", "summary", "aclsum", "aspect summaries of ACL papers: ACLSum's splits, 100/50/100 papers",
                 read_aclsum),
        TaskSpec("truthfulqa-mc", "choice", "truthfulqa-mc",
                 "multiple-choice QA: TruthfulQA MC1, 299 questions split 50/25/25 %", read_truthfulqa),
    ]
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise RalmError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


def task_path(name: str, path: str | Path | None = None, data_dir: str | Path | None = None) -> Path:
    """``path`` if given, else the task's file in the data folder (``ralm.data.registry.data_dir``)."""
    spec = get_task(name)
    if path is not None:
        return Path(path)
    p = datasets.data_dir(data_dir) / datasets.DATASETS[spec.dataset].filename
    if not p.exists():
        raise RalmError(f"task {name}: no data file {p}; fetch it with `ralm data get {spec.dataset}` "
                        "or pass the file's path")
    return p


def load_splits(name: str, path: str | Path | None = None, data_dir: str | Path | None = None,
                seed: int = 0) -> dict[str, list]:
    """Every split of task ``name`` (one read of its file): ``{"train": [...], "validation": [...], "test": [...]}``."""
    spec = get_task(name)
    return spec.read(task_path(name, path, data_dir), seed)


def load_task(name: str, split: str, path: str | Path | None = None, data_dir: str | Path | None = None,
              seed: int = 0) -> Sequence[Example]:
    """The examples of one split of task ``name``; one-line ``RalmError`` for an unknown task or split, a
    missing file or a malformed one (naming the file and the line or field)."""
    get_task(name)
    if split not in SPLITS:
        raise RalmError(f"unknown split {split!r} of task {name}; known: {', '.join(SPLITS)}")
    return load_splits(name, path, data_dir, seed)[split]
