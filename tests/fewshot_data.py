"""Generated labelled texts for the few-shot table's tests: two classes whose texts lean on their own cue words
(something for a store or a probe to find), enough of each for a 4-shot draw and a test split."""

from __future__ import annotations

import random
from pathlib import Path

from badinput import write_jsonl
from conftest import make_text

VERBALIZER = ["neg=gamma", "pos=epsilon"]  # first tokens Ġg, Ġe (as tests/test_retroprompt.py)
TEMPLATE = "Review: {text} It was"


def write_labelled(path: Path, n: int = 80) -> Path:
    rng = random.Random(0)
    recs = []
    for i in range(n):
        label = ("neg", "pos")[i % 2]
        cue = ("river mountain", "music science")[i % 2]
        recs.append({"id": f"x{i}", "text": f"{cue} {make_text(rng, rng.randint(3, 10))}", "label": label})
    return write_jsonl(path, recs)
