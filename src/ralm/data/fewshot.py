"""The few-shot protocol of LM-BFF (Gao et al. 2021; RetroPrompt follows it): for a seed, shuffle the
training examples with ``numpy.random.RandomState(seed)``; walking that order, the first ``k`` of each
class form the train sample and the next ``k`` of each class the dev split (same size, disjoint); the test
split is the data set's full test split, untouched. LM-BFF's settings: ``SHOTS`` per class, ``SEEDS``.

Examples whose text repeats one already drawn are skipped, so no text is in both train and dev.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError

SHOTS = (1, 4, 8, 16)
SEEDS = (13, 21, 42, 87, 100)


@dataclass
class FewShotConfig:
    k: int = field(default=16, metadata={"help": f"examples per class in train (and in dev); LM-BFF: {SHOTS}"})
    seed: int = field(default=42, metadata={"help": f"seed of the draw; LM-BFF's five: {SEEDS}"})

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise RalmError(f"--k must be a positive integer (examples per class), got {self.k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise RalmError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")


@dataclass(frozen=True)
class FewShotSplit:
    train: list[LabelledExample]  # k per class, in draw order
    dev: list[LabelledExample]  # k per class, disjoint from train
    k: int
    seed: int


def few_shot(examples: Sequence[LabelledExample], classes: Sequence[str], k: int, seed: int) -> FewShotSplit:
    """Draw ``k`` train and ``k`` dev examples per class from ``examples`` (a training split), as the module
    says; deterministic per ``(examples, k, seed)``. A one-line ``RalmError`` when a class has fewer than
    ``2k`` distinct examples (or none) or an example's label is not in ``classes``."""
    cfg = FewShotConfig(k, seed)
    counts = {c: 0 for c in classes}
    for e in examples:
        if e.label not in counts:
            raise RalmError(f"example {e.id}: label {e.label!r} is not a class ({', '.join(classes)})")
        counts[e.label] += 1
    if short := [c for c in classes if counts[c] < 2 * cfg.k]:
        c = short[0]
        raise RalmError(f"k={cfg.k} per class needs {2 * cfg.k} examples of class {c!r} ({cfg.k} train + {cfg.k} "
                        f"dev); it has {counts[c]}")
    train: list[LabelledExample] = []
    dev: list[LabelledExample] = []
    taken = {c: 0 for c in classes}
    seen: set[str] = set()
    for i in np.random.RandomState(cfg.seed).permutation(len(examples)):
        e = examples[i]
        if taken[e.label] == 2 * cfg.k or (e.image is None and e.text in seen):
            continue
        seen.add(e.text)
        (train if taken[e.label] < cfg.k else dev).append(e)
        taken[e.label] += 1
    if short := [c for c in classes if taken[c] < 2 * cfg.k]:  # repeats left too few distinct texts
        c = short[0]
        raise RalmError(f"k={cfg.k} per class needs {2 * cfg.k} distinct texts of class {c!r}; it has {taken[c]}")
    return FewShotSplit(train, dev, cfg.k, cfg.seed)
