"""Options and helpers shared by the ``ralm`` commands (one declaration, one help text)."""

from __future__ import annotations

from typing import Annotated

import typer

from ralm.errors import RalmError


def fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


# options that several commands share
Model = Annotated[str, typer.Option(help="preset (smollm2-135m, ...), model folder, GGUF file or hub id")]
Context = Annotated[int | None, typer.Option(help="tokens per window (default: model max, capped at 2048)")]
WindowStride = Annotated[int | None, typer.Option(help="plain LM and kNN-LM: new tokens scored per window (default context/2)")]
MaxDocs = Annotated[int | None, typer.Option(help="evaluate at most this many documents")]
Stride = Annotated[int, typer.Option(help="in-context/replug: tokens scored between retrievals")]
Docs = Annotated[int, typer.Option(help="passages in context (in-context) or mixed (replug)")]
DocTokens = Annotated[int, typer.Option(help="each passage truncated to this many tokens")]
K = Annotated[int, typer.Option("--k", help="knn-lm: neighbours per position")]
Lmbda = Annotated[float, typer.Option("--lmbda", help="knn-lm: weight of p_kNN, in [0, 1]")]
Validation = Annotated[list[str] | None, typer.Option(help="knn-lm: documents on which λ is chosen (overrides --lmbda)")]
ExcludeSameDoc = Annotated[bool, typer.Option(help="drop neighbours from the evaluated document")]
Decontaminate = Annotated[int | None, typer.Option(help="drop neighbours sharing an N-token span with the text")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RalmError(f"{flag} {text!r}: expected comma-separated numbers") from None
