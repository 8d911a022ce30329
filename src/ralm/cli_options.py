"""Options and helpers shared by the ``ralm`` commands (one declaration, one help text)."""

from __future__ import annotations

from typing import Annotated

import typer

from ralm.core.registry import option_configs


def fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


# CLI-only options and arguments that several commands share (the rest come from the configs: cli_config)
Model = Annotated[str, typer.Option(help="preset (smollm2-135m, ...), model folder, GGUF file or hub id")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Inputs = Annotated[list[str], typer.Argument(help="JSONL, .txt or Parquet files, or folders of them")]


def method_options() -> dict[str, tuple[type, str]]:
    """Every registered method's options: key -> (its config, the methods that read it, as the help prefix)."""
    import ralm.methods  # noqa: F401  registers the built-in methods (loads torch: only when a command needs it)

    return {key: (cfg, "/".join(names)) for key, (cfg, names) in option_configs().items()}


