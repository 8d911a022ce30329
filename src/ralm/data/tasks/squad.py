"""Document QA on SQuAD v1.1 dev (``ralm data get squad-dev``): the only SQuAD set offline, so train /
validation / test are cut from it BY ARTICLE (title): every question of an article, and so every paragraph,
is in one split. 80 / 10 / 10 % of the 48 articles, ranked by a seeded hash (``base.seeded_split``).

At seed 0 on the real file: 38 / 5 / 5 articles, 1,619 / 253 / 195 paragraphs, 7,771 / 1,323 / 1,471 questions
(``tests/test_tasks.py`` pins the rule on generated files). Retrieval is over a store of all the file's
paragraphs (``ralm build squad_dev_v1.1.json``): hits carry paragraph ids ``title#i``, so a question's gold
paragraph can be found among them.
"""

from __future__ import annotations

from pathlib import Path

from ralm.data.squad import QAExample, load_squad
from ralm.data.tasks.base import SPLITS, seeded_split

FRACTIONS = (0.8, 0.1, 0.1)


def read_squad_task(path: Path, seed: int = 0) -> dict[str, list[QAExample]]:
    """The questions of a SQuAD-format file, split by article title, each split in file order."""
    examples = load_squad(path)
    split_of = seeded_split((e.title for e in examples), FRACTIONS, seed, salt="squad")
    out: dict[str, list[QAExample]] = {s: [] for s in SPLITS}
    for e in examples:
        out[split_of[e.title]].append(e)
    return out
