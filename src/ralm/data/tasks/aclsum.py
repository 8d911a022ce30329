"""Aspect-based summarization on ACLSum (``ralm data get aclsum``): one example per (paper, aspect), aspects
challenge, approach and outcome; the package's own splits, 100 / 50 / 100 papers = 300 / 150 / 300 examples.

The file (one paper a line, written by ``ralm.data.registry``)::

    {"id": str, "split": "train" | "validation" | "test", "title": str,
     "summary": {"challenge": str, "approach": str, "outcome": str},
     "sections": {"abstract": [str], "introduction": [str], "conclusion": [str]}, "text": str}

``SummaryExample.document`` is ``text``, the paper's full text (about 26k characters at the median): long,
so the model reads it through retrieval over the paper's own chunks. ``source`` joins the three sections the
annotators summarised (sentences as the package tokenised them, e.g. ``"answer extraction ."``).
"""

from __future__ import annotations

from pathlib import Path

from ralm.data.tasks.base import SPLITS, SummaryExample, dict_field, keyed_records, list_field, text_field
from ralm.errors import RalmError

ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")


def read_aclsum(path: Path, seed: int = 0) -> dict[str, list[SummaryExample]]:
    """All examples by split, papers in file order, aspects in ``ASPECTS`` order. ``seed`` is unused:
    the splits are the dataset's own."""
    del seed
    out: dict[str, list[SummaryExample]] = {s: [] for s in SPLITS}
    for where, pid, rec in keyed_records(path, "paper"):
        split = text_field(rec, "split", where)
        if split not in SPLITS:
            raise RalmError(f"{where}: 'split': {split!r} is not one of {', '.join(SPLITS)}")
        title, text = text_field(rec, "title", where), text_field(rec, "text", where)
        summary, sections = dict_field(rec, "summary", where), dict_field(rec, "sections", where)
        source: list[str] = []
        for s in SECTIONS:
            sents = list_field(sections, s, f"{where}: 'sections'")
            if not all(isinstance(x, str) for x in sents):
                raise RalmError(f"{where}: 'sections': {s!r}: expected a list of strings")
            source.extend(sents)
        for aspect in ASPECTS:
            ref = text_field(summary, aspect, f"{where}: 'summary'")
            out[split].append(SummaryExample(f"{pid}/{aspect}", pid, title, aspect, text, " ".join(source),
                                             ref.strip()))
    return out
