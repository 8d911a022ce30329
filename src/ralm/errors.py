"""User-facing errors: one line that names the input and what is wrong."""


class RalmError(Exception):
    """An error caused by user input (a path, a flag, a corpus, a store).

    The CLI prints ``str(err)`` as a single line and exits non-zero; nothing else
    (no traceback) is shown, so the message must name the input and the problem.
    """


class StoreError(RalmError):
    """A datastore directory is missing, unfinished, truncated or corrupt."""


class IncompatibleError(RalmError):
    """A query or use needs another encoder or tokenizer than the store was built with."""
