"""Generated SQuAD-format files for the QA tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from conftest import make_text


def squad_record(n_articles: int = 3, n_paras: int = 3, seed: int = 0, shift: int = 0) -> dict:
    """A SQuAD-format dict; every question is the full text of paragraph ``(i + shift) % n_paras``
    of its article, and its answer is two words of its own paragraph."""
    rng = random.Random(seed)
    data = []
    for a in range(n_articles):
        texts = [make_text(rng, 8) for _ in range(n_paras)]
        paragraphs = []
        for i, ctx in enumerate(texts):
            words = ctx.rstrip(".").split()
            qas = [{"id": f"q{a}-{i}", "question": texts[(i + shift) % n_paras],
                    "answers": [{"text": " ".join(words[2:4]), "answer_start": 0}, {"text": words[5]}]}]
            paragraphs.append({"context": ctx, "qas": qas})
        data.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    return {"version": "1.1", "data": data}


def write_squad(path: Path, record: dict | None = None, **kw) -> Path:
    path.write_text(json.dumps(record if record is not None else squad_record(**kw)), encoding="utf-8")
    return path
