"""``ralm diagnose``: store ablations, context variance and a prompt-tuning baseline for a method or a task run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ralm.cli_config import Spec
from ralm.cli_options import Quiet, fail, method_options
from ralm.errors import RalmError

# as in cli.py, the command imports torch-backed modules inside the function: not at CLI start
JsonOut = Annotated[bool, typer.Option("--json", help="print the result as one JSON object")]


def diagnose_spec() -> Spec:
    from ralm.eval.diagnose import DiagnoseConfig

    return Spec(DiagnoseConfig, dicts={"options": method_options()})


def diagnose(config: Callable[..., Any], json_out: JsonOut = False, quiet: Quiet = False) -> None:
    """Is the retriever doing retrieval or acting as a soft prompt? Store ablations with bootstrap CIs, context
    variance, a prompt-tuning baseline and a verdict; JSON, markdown and a PNG chart in --out."""
    from ralm.eval.diagnose import run_diagnose
    from ralm.tuning.prompt_baseline import PromptTuner

    try:
        cfg = config()
        result = run_diagnose(cfg, PromptTuner(), progress=not quiet, log=(lambda m: None) if quiet else None)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo("\n".join([f"verdict: {result['verdict']}", f"rule: {result['rule']}", *result["checks"],
                          f"outputs: {Path(cfg.out) / 'diagnose.json'}, diagnose.md, diagnose.png"]))
