"""User-facing errors: one line that names the input and what is wrong."""

from __future__ import annotations

from typing import Any


class RalmError(Exception):
    """An error caused by user input (a path, a flag, a corpus, a store).

    The CLI prints ``str(err)`` as a single line and exits non-zero; nothing else
    (no traceback) is shown, so the message must name the input and the problem.
    """


class StoreError(RalmError):
    """A datastore directory is missing, unfinished, truncated or corrupt."""


class IncompatibleError(RalmError):
    """A query or use needs another encoder or tokenizer than the store was built with."""


class UnavailableError(RalmError):
    """A part of a served store cannot answer now: the request was fine, so the service answers ``status``
    (503: a shard whose actors all died; 504: a shard that did not answer in time), not 400."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def refuse_below(cfg: Any, names: tuple[str, ...], low: int = 1) -> None:
    """Refuse the first of ``cfg``'s fields ``names`` below ``low``, naming its flag (``--field-name``): the
    bound check every config's ``__post_init__`` makes on its counts and sizes."""
    for name in names:
        value = getattr(cfg, name)
        if value < low:
            raise RalmError(f"--{name.replace('_', '-')} {value}: must be >= {low}")
