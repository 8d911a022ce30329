"""benchmarks/diagnose.py's inputs: the evaluated documents, and each case's artefact (a store, a RETRO-fit, a
``ralm tune`` or RetroPrompt run) found where another benchmark made it, built here, or the reason it is not
(``NotRun``, which the case's row reads). Kept apart from the grid and the measuring so each file reads alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peftbench import CCA_LAYERS, cached, tag  # noqa: E402  (the stage cache)

if TYPE_CHECKING:
    from diagnose import Grid


def log(msg: str) -> None:
    print(f"[diagnose-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class NotRun(Exception):
    """A case that cannot be measured here: its row says why."""


def short_hash(x: Any) -> str:
    return hashlib.sha1(json.dumps(x, sort_keys=True).encode()).hexdigest()[:10]


# ---- data ------------------------------------------------------------------------------------------------
def cut(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, ended at its last paragraph break (else sentence, word)."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    for sep in ("\n\n", "\n", ". ", " "):
        at = head.rfind(sep)
        if at > chars // 3:
            return head[:at + len(sep.strip())].rstrip()
    return head


def first_docs(src: Path, dst: Path, n: int, chars: int | None = None) -> Path:
    """The first ``n`` documents of JSONL ``src`` (each cut to ``chars`` characters) in ``dst``."""
    if not dst.exists():
        lines = src.read_text(encoding="utf-8").splitlines()[:n]
        docs = [json.loads(x) for x in lines]
        if chars:
            docs = [{**d, "text": cut(d["text"], chars)} for d in docs]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return dst


def prepare(g: Grid) -> dict[str, Path]:
    """The store's articles, the leakage and the clean documents (lm.py's files unless the grid names its own)."""
    if g.store_docs is None:
        from lm import prepare as lm_prepare  # benchmarks/lm.py: 460 store articles, held-out 768-787

        paths = lm_prepare()
        store, held = paths["store"], paths["test"]
    else:
        store, held = Path(g.store_docs), Path(g.held_docs)
    work = g.work()
    train = first_docs(store, work / "baseline-train.jsonl", g.baseline_docs) if g.baseline_docs else store
    return {"store": store, "leakage": first_docs(store, work / "leakage.jsonl", g.n_docs, g.doc_chars),
            "clean": first_docs(held, work / "clean.jsonl", g.n_docs, g.doc_chars), "baseline": train}


# ---- artefacts: found, built, or the reason they are not -------------------------------------------------
def _may_build(g: Grid, what: str, where: Path, who: str) -> None:
    if what not in g.build:
        raise NotRun(f"no {who} at {where} and building it here is off (--no-build)")


def _given(path: str, who: str) -> str:
    if not Path(path).exists():
        raise NotRun(f"no {who} at {path}")
    return path


def retrieval_store(g: Grid) -> dict[str, str]:
    if g.ds is not None:
        return {"path": _given(g.ds, "retrieval store"), "source": "given"}
    path = Path(g.other) / "lm" / "ds"
    if not (path / "manifest.json").exists():
        _may_build(g, "ds", path, "retrieval store")
        from lm import prepare as lm_prepare
        from lm import retrieval_store as lm_store

        lm_store(lm_prepare())  # benchmarks/lm.py's store, by its own function (resumable)
    return {"path": str(path), "source": "benchmarks/lm.py (460 wiki articles, 64-token chunks, MiniLM)"}


def knn_store(g: Grid, docs: dict[str, Path]) -> dict[str, str]:
    from ralm.datastore.index import IndexConfig
    from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

    if g.knn is not None:
        return {"path": _given(g.knn, "kNN-LM store"), "source": "given"}
    theirs = Path(g.other) / "lm" / "knn"  # lm.py's 1M keys: reused where this grid would build the same
    if g.store_docs is None and (g.knn_docs, g.context) == (460, 512) and (theirs / "manifest.json").exists():
        return {"path": str(theirs), "source": "benchmarks/lm.py (460 wiki articles, context 512)"}
    out = Path(g.cache) / f"knn-{tag(g.model)}-{short_hash([str(docs['store']), g.knn_docs, g.context])}"
    if not (out / "manifest.json").exists():
        _may_build(g, "knn", out, "kNN-LM store")
        subset = first_docs(docs["store"], Path(str(out) + ".jsonl"), g.knn_docs)
        log(f"building a kNN-LM store over the first {g.knn_docs} store articles")
        build_knn_store(KNNBuildConfig([str(subset)], str(out), model=g.model, context=g.context,
                                       window_stride=g.context, index=IndexConfig(target_recall=0.9, metric="l2")),
                        progress=False)
    return {"path": str(out), "source": f"built here: the first {g.knn_docs} store articles, context {g.context}"}


def retro_checkpoint(g: Grid, docs: dict[str, Path], ds: str) -> dict[str, Any]:
    from ralm.methods.retro.checkpoint import read_checkpoint_config

    if g.retro_ckpt is not None:
        return {"path": _given(g.retro_ckpt, "RETRO-fit checkpoint"), "source": "given"}
    theirs = Path(g.other) / "retro" / "ckpt"
    if g.store_docs is None and (theirs / "retro.json").exists():
        return {"path": str(theirs), "source": "benchmarks/retro.py (300 steps of 2 x 512 tokens)"}
    rc = {"cca_layers": CCA_LAYERS.get(g.model), **g.retro}
    key = short_hash([g.model, ds, str(docs["store"]), rc, g.retrofit_steps, g.retrofit_batch, g.retrofit_seq_len])
    out = Path(g.cache) / f"retrofit-{key}"
    record = Path(str(out) + ".json")

    def train() -> dict[str, Any]:
        from ralm.methods.retro.model import RetroConfig
        from ralm.tuning.retrofit import RetrofitConfig, retrofit

        _may_build(g, "retro", out, "RETRO-fit checkpoint")
        log(f"RETRO-fitting {g.model}: {g.retrofit_steps} steps of {g.retrofit_batch} x {g.retrofit_seq_len}")
        t0 = time.perf_counter()
        s = retrofit(RetrofitConfig(datastore=ds, train=[str(docs["store"])], out=str(out), model=g.model,
                                    steps=g.retrofit_steps, retro=RetroConfig(**rc), batch_size=g.retrofit_batch,
                                    seq_len=g.retrofit_seq_len, lr=2e-3, warmup=min(20, max(1, g.retrofit_steps // 10)),
                                    eval_every=0, save_every=max(1, g.retrofit_steps // 4), same_doc_fraction=0.5,
                                    bf16=g.bf16), progress=False)
        return {"path": str(out), "source": f"RETRO-fit here: {g.retrofit_steps} steps of {g.retrofit_batch} x "
                f"{g.retrofit_seq_len} tokens on the store articles", "wall_s": round(time.perf_counter() - t0, 1),
                "final_loss": s.get("final_loss")}

    if record.exists() and not (out / "retro.json").exists():
        record.unlink()  # the record outlived its checkpoint: train again
    ckpt = cached(record, train)
    read_checkpoint_config(ckpt["path"])  # a RalmError (e.g. another ralm version's): the row says so
    return ckpt


def peft_run(g: Grid) -> dict[str, str]:
    """peftbench's SmolLM2 SQuAD gpt LoRA run (its --cpu grid's folder, else any grid's), trained if missing."""
    import peftbench

    if g.peft_run is not None:
        return {"path": _given(g.peft_run, "`ralm tune` run"), "source": "given"}
    pg = replace(peftbench.cpu_grid(), **{"rows": [], "cache": str(Path(g.other) / "peft"), **g.peft})
    name = f"{tag(g.model)}-squad-gpt-lora"
    out = pg.folder() / "runs" / name
    for found in [out, *sorted(Path(pg.cache).glob(f"grid-*/runs/{name}"))]:
        if (found / "run.json").exists():
            return {"path": str(found), "source": f"benchmarks/peftbench.py ({found.parent.parent.name})"}
    _may_build(g, "peft", out, "PEFT run")
    log(f"training the PEFT run {out} (benchmarks/peftbench.py --cpu settings)")
    store = peftbench.store_for(pg, g.model, "squad")
    peftbench.run_tune(peftbench.tune_config(pg, g.model, "squad", "gpt", "lora", store, None, out))
    return {"path": str(out), "source": f"trained here with benchmarks/peftbench.py's {pg.digest()} settings"}


def retroprompt_run(g: Grid) -> dict[str, str]:
    """benchmarks/retroprompt.py's Rotten Tomatoes 16-shot seed-13 RetroPrompt cell (its preset's settings),
    trained here once (the retroprompt benchmark deletes its measured runs) unless one is given."""
    import retroprompt as rpbench

    if g.retroprompt_run is not None:
        return {"path": _given(g.retroprompt_run, "RetroPrompt run"), "source": "given"}
    from ralm.errors import RalmError
    from ralm.tuning.fewshot_table import Cell, row_config
    from ralm.tuning.retroprompt import read_run, train_retroprompt

    rg = rpbench.grid_from(rpbench.parser().parse_args(["--cpu"] if g.preset == "cpu" else []))
    cell = Cell("rotten-tomatoes", 16, 13, "retroprompt")
    out = Path(g.cache) / "retroprompt" / f"grid-{rg.digest()}" / cell.name()
    source = f"trained here with benchmarks/retroprompt.py's {rg.preset} settings (grid {rg.digest()})"
    with contextlib.suppress(RalmError):
        read_run(out)  # finished before
        return {"path": str(out), "source": source}
    _may_build(g, "retroprompt", out, "RetroPrompt run")
    log(f"training the RetroPrompt run {out}")
    train_retroprompt(row_config(rpbench.base_config(rg, cell.data), cell, out), progress=False)
    return {"path": str(out), "source": source}
