"""``ralm retrofit`` and ``ralm generate``: RETRO-fit training and retrieval-augmented generation."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ralm.cli_config import Spec
from ralm.cli_options import Model, Quiet, fail
from ralm.errors import RalmError
from ralm.lm.presets import tokenizer_fingerprint
from ralm.serve.client import open_store

# as in cli.py, the commands import torch-backed modules inside the function: not at CLI start


def retrofit_spec() -> Spec:
    from ralm.tuning.retrofit import RetrofitConfig

    return Spec(RetrofitConfig)


def retrofit(
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    quiet: Quiet = False,
) -> None:
    """RETRO-fit a frozen causal LM: train CCA layers and a retrieval encoder on neighbours from the store."""
    from ralm.tuning.retrofit import retrofit as run

    try:
        cfg = config()
        summary = run(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        resumed = f", resumed at step {summary['resumed_at_step']}" if summary.get("resumed_at_step") else ""
        typer.echo(f"trained {summary['steps']} steps ({summary['trained_tokens']:,} tokens in all{resumed}; "
                   f"{summary['tokens_per_second']} tok/s this session); {summary['new']:,} new parameters "
                   f"({100 * summary['new_share']:.2f}% of the base); checkpoint in {summary['checkpoint']}")
        if "eval_ppl_on" in summary:
            typer.echo(f"eval ppl: retrieval on {summary['eval_ppl_on']}, off {summary['eval_ppl_off']}")


def generate_spec() -> Spec:
    from ralm.generate import GenerateConfig

    return Spec(GenerateConfig)


def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    config: Callable[..., Any],
    model: Model = "smollm2-135m",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object (with the retrievals)")] = False,
) -> None:
    """Continue PROMPT, retrieving at every chunk boundary (retro) or every --stride tokens (in-context)."""
    from ralm.core.registry import get_method, refuse_foreign
    from ralm.generate import generate as run
    from ralm.lm.models import load

    try:
        cfg = config()
        method = cfg.method
        m = get_method(method, generates=True)
        refuse_foreign(cfg, method)
        # e.g. the store a checkpoint was trained with; generate's config is flat: the options are its own fields
        m.prepare(cfg, cfg)
        lm = load(model)
        state = ds = None
        if m.store != "none":
            ds = open_store(cfg.datastore)
            ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(lm.tokenizer), tokenizer_name=model)
        if m.load_generation is not None:
            state = m.load_generation(lm, model, cfg, ds)
        result = run(lm.model, lm.tokenizer, prompt, cfg, ds=ds, state=state)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    typer.echo(prompt + result["continuation"])
    for r in result["retrievals"]:
        top = r["neighbours"][0] if r["neighbours"] else None
        typer.echo(f"[retrieved at token {r['position']}: "
                   f"{(top['doc_id'] + ': ' + top['text'][:80].replace(chr(10), ' ')) if top else 'nothing'}]", err=True)
