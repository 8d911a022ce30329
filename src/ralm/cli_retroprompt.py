"""``ralm retroprompt train``, ``eval`` and ``memo``: RetroPrompt few-shot prompt learning (issue 14)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ralm.cli_config import Spec, config_command
from ralm.cli_options import Quiet, fail
from ralm.errors import RalmError

# as in cli.py, the commands import torch-backed modules inside the function: not at CLI start
app = typer.Typer(help="RetroPrompt: few-shot prompt learning with a knowledge store of the training examples.",
                  no_args_is_help=True)
JsonOut = Annotated[bool, typer.Option("--json", help="print the result as one JSON object")]


def train_spec() -> Spec:
    from ralm.tuning.retroprompt_config import RetroPromptConfig

    # the prompt's template and verbalizer are the config's own (they default per data set); λ is --lmbda;
    # the PEFT switches of RETRO-fit's parts have no meaning on a plain LM
    return Spec(RetroPromptConfig, skip=("prompt.template", "prompt.verbalizer", "knn.lmbda", "peft.decoder",
                                         "peft.retrieval_encoder", "peft.cca"))


@config_command(app, "train", train_spec)
def train(config: Callable[..., Any], json_out: JsonOut = False, quiet: Quiet = False) -> None:
    """Train a prompt model with kNN-guided loss, neural demonstrations and a refreshed knowledge store,
    choose λ on dev and score the test split (a rerun with the same flags resumes)."""
    from ralm.tuning.retroprompt import train_retroprompt

    try:
        s = train_retroprompt(config(), progress=not quiet)
    except RalmError as e:
        fail(e)
    typer.echo(json.dumps(s) if json_out else _trained(s))


def _trained(s: dict[str, Any]) -> str:
    test = s.get("test")
    scored = (f"test accuracy {test['accuracy']:.4f} (model {test['accuracy_model']:.4f}, kNN "
              f"{test['accuracy_knn']:.4f})" if test else "test not scored")
    return (f"trained {s['steps']} steps ({s['examples_per_second']} examples/s, store refreshes "
            f"{s['store']['share_of_training_time']:.1%} of the time); λ {s['lmbda']:g} (dev accuracy "
            f"{s['dev']['accuracy']:.4f}); {scored}; run in {s['run']}")


@app.command("eval")
def evaluate(
    run: Annotated[str, typer.Option("--run", help="a `ralm retroprompt train` folder")],
    split: Annotated[str, typer.Option("--split", help="dev or test")] = "test",
    json_out: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Score the dev or test split with a trained run: its weights, its knowledge store and its λ."""
    from ralm.tuning.retroprompt import evaluate_retroprompt

    try:
        r = evaluate_retroprompt(run, split, progress=not quiet)
    except RalmError as e:
        fail(e)
    typer.echo(json.dumps(r) if json_out else
               f"{split}: accuracy {r['accuracy']:.4f} at λ {r['lmbda']:g} (model {r['accuracy_model']:.4f}, "
               f"kNN {r['accuracy_knn']:.4f}) on {r['examples']} examples")


def memo_spec() -> Spec:
    from ralm.tuning.retroprompt_memo import MemoRunConfig

    return Spec(MemoRunConfig)


@config_command(app, "memo", memo_spec)
def memo(config: Callable[..., Any], json_out: JsonOut = False) -> None:
    """Memorization score of each training example of a trained run: its self-influence (1/n)·∇Lᵀ H⁻¹ ∇L over
    the run's trained parameters (LiSSA or an exact solve), on all examples and on the atypical share (lowest
    p_kNN of the gold label); writes RUN/memorization.json."""
    from ralm.tuning.retroprompt_memo import memorization_scores

    try:
        c = config()
        m = memorization_scores(c.run, c.method, c.params, c.share, c.lissa)
    except RalmError as e:
        fail(e)
    s = m["summary"]
    typer.echo(json.dumps({k: v for k, v in m.items() if k not in ("scores", "knn_gold")}) if json_out else
               f"memorization of {s['n']} training examples ({m['params']['count']} parameters, {m['approximation']}"
               f"): mean {s['mean']:.4g}, median {s['median']:.4g}; atypical {s['n_atypical']} (lowest p_kNN): mean "
               f"{s['atypical_mean']:.4g}, median {s['atypical_median']:.4g}; in {m['run']}/memorization.json "
               f"({m['seconds']['total']:.1f} s)")
