"""``ralm tune`` and ``ralm eval-task``: PEFT on a task for gpt or retro, and scoring a run (or zero-shot)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ralm.cli_config import Spec
from ralm.cli_options import Quiet, fail
from ralm.errors import RalmError

# as in cli.py, the commands import torch-backed modules inside the function: not at CLI start
JsonOut = Annotated[bool, typer.Option("--json", help="print the result as one JSON object")]


def tune_spec() -> Spec:
    from ralm.tuning.tune import TuneConfig

    return Spec(TuneConfig)


def tune(config: Callable[..., Any], json_out: JsonOut = False, quiet: Quiet = False) -> None:
    """Fine-tune a PEFT method (LoRA, adapters, prompt tuning, P-tuning, full) on a task, gpt or retro arch."""
    from ralm.tuning.tune import tune as run

    try:
        summary = run(config(), progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary))
        return
    val = summary["validation"]
    metrics = ", ".join(f"{k} {v}" for k, v in val.items() if k not in ("predictions", "examples"))
    typer.echo(f"trained {summary['steps']} steps ({summary['tokens_per_second']} target tok/s, "
               f"{summary['positions_per_second']} input positions/s); {summary['trainable']:,} "
               f"trained parameters ({summary['percent']:.3f}% of the model); validation: {metrics}; "
               f"run in {summary['run']}")


def eval_task_spec() -> Spec:
    from ralm.eval.task import EvalTaskConfig

    return Spec(EvalTaskConfig)


def eval_task(config: Callable[..., Any], json_out: JsonOut = False) -> None:
    """Score a task split with a `ralm tune` run (--run) or an untrained model (--zero-shot)."""
    from ralm.eval.task import run_eval_task, summary_line

    try:
        result = run_eval_task(config())
    except RalmError as e:
        fail(e)
    typer.echo(json.dumps(result, ensure_ascii=False) if json_out else summary_line(result))
