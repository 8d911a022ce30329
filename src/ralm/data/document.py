"""``Document``: one text of a corpus, as every reader (``corpus``, ``squad``) yields it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    domain: str
