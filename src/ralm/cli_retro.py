"""``ralm retrofit`` and ``ralm generate``: RETRO-fit training and retrieval-augmented generation."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ralm.cli_options import Docs, DocTokens, Model, Quiet, fail
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.lm.presets import tokenizer_fingerprint

# as in cli.py, the commands import torch-backed modules inside the function: not at CLI start


def retrofit(
    datastore: Annotated[str, typer.Option(help="retrieval store with chunk-size chunks and continuations")],
    train: Annotated[list[str], typer.Option(help="training documents (JSONL/.txt/Parquet/folder); repeatable")],
    out: Annotated[str, typer.Option(help="checkpoint folder (a rerun with the same settings resumes)")],
    model: Model = "smollm2-135m",
    eval_docs: Annotated[list[str] | None, typer.Option("--eval", help="held-out documents evaluated every --eval-every steps")] = None,
    steps: Annotated[int, typer.Option(help="optimiser steps (a resumed run continues up to this)")] = 1000,
    batch_size: Annotated[int, typer.Option(help="windows per step")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per training window (multiple of --chunk-size)")] = 512,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-4,
    warmup: Annotated[int, typer.Option(help="linear warm-up steps")] = 50,
    eval_every: Annotated[int, typer.Option(help="evaluate every N steps (0: at the end only)")] = 100,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps")] = 100,
    chunk_size: Annotated[int, typer.Option(help="RETRO chunk size m; must equal the store's")] = 64,
    neighbours: Annotated[int, typer.Option(help="neighbours per chunk")] = 2,
    cca_layers: Annotated[str | None, typer.Option(help="comma-separated 0-based layers followed by CCA "
                                                        "(default: every 3rd from the 6th)")] = None,
    enc_dim: Annotated[int, typer.Option(help="retrieval encoder width")] = 256,
    enc_layers: Annotated[int, typer.Option(help="retrieval encoder depth")] = 2,
    cca_dim: Annotated[int, typer.Option(help="inner width of each CCA")] = 256,
    rel_init: Annotated[float, typer.Option(help="starting CCA relative-position bias on the offsets where a "
                                                 "neighbour's continuation lines up with the predicted text "
                                                 "(0: uniform attention at start)")] = 5.0,
    match_gate: Annotated[bool, typer.Option("--match-gate/--no-match-gate", help="scale each chunk's CCA output by "
                                             "a learned gate on the share of its trigrams its best neighbour "
                                             "holds")] = True,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast (default: where supported)")] = None,
    neighbours_cache: Annotated[str | None, typer.Option("--neighbours-cache", help="read this precomputed "
                                                         "neighbours cache instead of computing OUT/neighbours")] = None,
    same_doc_fraction: Annotated[float, typer.Option(help="fraction of training documents whose chunks may retrieve "
                                                         "their own document (0: RETRO's rule)")] = 0.0,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="discard the checkpoint in --out and start over")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as one JSON object")] = False,
    quiet: Quiet = False,
) -> None:
    """RETRO-fit a frozen causal LM: train CCA layers and a retrieval encoder on neighbours from the store."""
    from ralm.methods.retro.model import RetroConfig
    from ralm.tuning.retrofit import RetrofitConfig
    from ralm.tuning.retrofit import retrofit as run

    try:
        layers = [int(x) for x in cca_layers.split(",")] if cca_layers else None
    except ValueError:
        fail(RalmError(f"--cca-layers {cca_layers!r}: expected comma-separated integers"))
    try:
        retro = RetroConfig(chunk_size=chunk_size, neighbours=neighbours, neighbour_len=2 * chunk_size,
                            cca_layers=layers, enc_dim=enc_dim, enc_layers=enc_layers, cca_dim=cca_dim,
                            rel_init=rel_init, match_gate=match_gate)
        cfg = RetrofitConfig(datastore=datastore, train=list(train), out=out, model=model, eval=list(eval_docs or []) or None,
                             retro=retro, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                             eval_every=eval_every, save_every=save_every, bf16=bf16, neighbours=neighbours_cache,
                             same_doc_fraction=same_doc_fraction, seed=seed, force=force)
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


def generate(
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    model: Model = "smollm2-135m",
    method: Annotated[str, typer.Option(help="a method that generates (`ralm methods`)")] = "none",
    datastore: Annotated[str | None, typer.Option(help="retrieval store (retro defaults to its checkpoint's)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="retro: RETRO-fit checkpoint folder")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; otherwise sampling temperature")] = 0.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    stride: Annotated[int, typer.Option(help="in-context: tokens between retrievals")] = 64,
    docs: Docs = 1,
    doc_tokens: DocTokens = 256,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object (with the retrievals)")] = False,
) -> None:
    """Continue PROMPT, retrieving at every chunk boundary (retro) or every --stride tokens (in-context)."""
    from ralm.core.registry import get_method, refuse_foreign
    from ralm.generate import GenerateConfig
    from ralm.generate import generate as run
    from ralm.lm.models import load

    try:
        cfg = GenerateConfig(method=method, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             stride=stride, docs=docs, doc_tokens=doc_tokens, checkpoint=checkpoint,
                             datastore=datastore)
        m = get_method(method, generates=True)
        refuse_foreign(cfg, method)
        if m.resolve is not None:  # e.g. the store a checkpoint was trained with (before the model loads)
            m.resolve(cfg)
        elif m.store != "none" and not cfg.datastore:
            raise RalmError(f"--method {method} needs --datastore")
        lm = load(model)
        state = ds = None
        if m.store != "none":
            ds = Datastore.open(cfg.datastore)
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
