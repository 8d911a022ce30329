#!/usr/bin/env python
"""PEFT on GPT (retrieved chunks in the prompt) vs RETRO-fit (the same chunks through CCA), issue 13.

Grid (``--quick``: a CPU-sized subset with small steps; default: the full grid, for a GPU or a long CPU run):
- SmolLM2-135M, document QA (SQuAD, EM/F1 on the first ``--limit`` test questions, the same for every row):
  every arch x method (gpt|retro x lora|adapter|prompt|ptuning|full), zero-shot and tuned;
- LoRA and adapters on ACLSum (ROUGE) and TruthfulQA MC (accuracy, per-byte normalisation) for both archs;
- Gemma-3-270M gpt and retro LoRA rows on SQuAD as the size axis (``--no-gemma-retro`` skips its RETRO-fit).
Every row of a grid uses the same steps / batch / lr / input settings (``settings`` in the JSON). Each tuning
run is its own subprocess (``--isolate``, default) whose peak RSS is read with ``os.wait4``, so runs do not
pollute each other; gpt LoRA and gpt full fine-tuning train on the same batches (a batch is a function of the
step and the seed), so their tokens/s ratio is like for like.

Stores (``ralm.datastore.build``; one per base model, as the store's tokenizer is the model's): the SQuAD
paragraphs in 64-token chunks + continuations (both archs read it), and for ACLSum the papers (retrieval is
restricted to the paper's own chunks by ``task_inputs``). RETRO-fit: ``ralm.tuning.retrofit`` of the base model
on the SQuAD train-split paragraphs (``--retrofit-steps``); ``benchmarks/.cache/retro/ckpt`` is reused instead
when it exists and fits the store (the JSON says which was used).

Every stage (store, RETRO-fit, zero-shot score, tuned row) is cached under benchmarks/.cache/peft/ and a rerun
continues; ``--max-minutes`` stops starting new rows after that long (those rows read "not measured").
Named peftbench.py, not peft.py: a module ``peft`` in benchmarks/ would shadow the ``peft`` library when run as a
script (benchmarks/ leads sys.path) and make ruff (``src`` includes benchmarks) sort ``peft`` as first-party.

Output: one JSON object on stdout and benchmarks/.cache/peft/results.{json,md,png}; the markdown states the
measured figure for each of the paper's four claims, computed from the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_results import ARCHS, GEMMA, METHODS, METRIC, SMOL, claims, speed, write_outputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RALM_DATA_DIR", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "benchmarks" / ".cache" / "peft"  # stores, RETRO-fits, run folders (weights): never committed
RESULTS = ROOT / "benchmarks" / "results" / "peft"  # the measured JSON of every stage and results.{json,md,png}
RETRO_CACHE_CKPT = ROOT / "benchmarks" / ".cache" / "retro" / "ckpt"
CCA_LAYERS = {SMOL: [20, 23, 26, 29], GEMMA: [11, 14, 17]}  # CCA after the top layers only (cheap backprop):
# SmolLM2 as benchmarks/retro.py (30 layers), Gemma-3-270M the same share of its 18


def log(msg: str) -> None:
    print(f"[peft-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Grid:
    """What the benchmark runs; one instance = one grid (the same training settings for every row)."""

    cache: str = str(CACHE)
    results: str = str(RESULTS)
    squad: str = str(DATA / "squad_dev_v1.1.json")
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (model, task, arch, method), in order
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 10
    limit: int = 200  # test examples scored per row
    docs: int = 5
    doc_tokens: int = 96
    max_len: int = 512
    max_new_tokens: int = 16
    max_target: int = 96
    eval_examples: int = 16
    lora_rank: int = 32
    adapter_dim: int = 32
    n_virtual: int = 16
    retrofit_steps: int = 300
    retrofit_batch: int = 4
    retrofit_seq_len: int = 256
    chunk_tokens: int = 64
    retro: dict[str, Any] = field(default_factory=dict)  # RetroConfig overrides (cca_layers default per model)
    encoder: str | None = None  # store encoder (None: ralm's default, MiniLM)
    reuse_retro_ckpt: bool = True
    isolate: bool = True  # each tuning run in a subprocess (peak RSS per run)
    threads: int | None = None
    max_minutes: float | None = None
    speed_reps: int = 3  # LoRA-vs-full speed pairs (alternating child processes, same batches)
    speed_steps: int = 8
    bf16: bool | None = None
    skipped: list[str] = field(default_factory=list)  # what the grid leaves out on purpose, said in the output

    def training(self) -> dict[str, Any]:
        keys = ("steps", "batch_size", "lr", "warmup", "limit", "docs", "doc_tokens", "max_len", "max_new_tokens",
                "max_target", "eval_examples", "lora_rank", "adapter_dim", "n_virtual", "retrofit_steps",
                "retrofit_batch", "retrofit_seq_len", "chunk_tokens")
        return {k: getattr(self, k) for k in keys}

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.training(), sort_keys=True).encode()).hexdigest()[:10]

    def folder(self) -> Path:
        """Where this grid's run folders (weights) live: one folder per training settings."""
        return Path(self.cache) / f"grid-{self.digest()}"

    def measured(self) -> Path:
        """Where this grid's measured stages (zero-shot, rows, speed) are kept as JSON, so a rerun with the same
        settings (a later session, a fresh clone) continues instead of measuring them again."""
        return Path(self.results) / f"grid-{self.digest()}"


def full_rows(gemma_retro: bool = True) -> list[tuple[str, str, str, str]]:
    rows = [(SMOL, "squad", a, m) for m in METHODS for a in ARCHS]
    rows += [(SMOL, t, a, m) for t in ("aclsum", "truthfulqa-mc") for m in ("lora", "adapter") for a in ARCHS]
    rows += [(GEMMA, "squad", a, "lora") for a in (ARCHS if gemma_retro else ("gpt",))]
    return rows


def cpu_rows(gemma_retro: bool = True) -> list[tuple[str, str, str, str]]:
    """The full grid, most informative first (a run stopped by ``--max-minutes`` keeps the SQuAD grid whole):
    the ten SmolLM2 SQuAD rows, then multiple choice (cheap), summaries, the Gemma size axis."""
    rows = quick_rows()
    rows += [(SMOL, t, a, m) for t in ("truthfulqa-mc", "aclsum") for m in ("lora", "adapter") for a in ARCHS]
    return rows + [(GEMMA, "squad", a, "lora") for a in (ARCHS if gemma_retro else ("gpt",))]


def cpu_grid(gemma_retro: bool = True) -> Grid:
    """The ``--cpu`` preset (benchmarks/diagnose.py trains its PEFT run with it, where this grid keeps its runs)."""
    return Grid(rows=cpu_rows(gemma_retro), steps=200, warmup=10, batch_size=2, limit=100, docs=5, doc_tokens=48,
                max_len=384, max_new_tokens=16, max_target=96, eval_examples=8, retrofit_steps=300, retrofit_batch=4,
                retrofit_seq_len=256, skipped=[] if gemma_retro else ["gemma3-270m retro lora (--no-gemma-retro)"])


def quick_rows() -> list[tuple[str, str, str, str]]:
    """Most informative first (a run cut short still measures the claims): LoRA on both archs (zero-shot gap and
    PEFT gains), P-tuning and adapters (P-tuning vs the others), prompt tuning, full fine-tuning last (the
    costliest; the LoRA-vs-full speed figure comes from the speed pairs, run before the rows)."""
    order = [("gpt", "lora"), ("retro", "lora"), ("gpt", "ptuning"), ("gpt", "adapter"), ("retro", "adapter"),
             ("retro", "ptuning"), ("gpt", "prompt"), ("retro", "prompt"), ("gpt", "full"), ("retro", "full")]
    return [(SMOL, "squad", a, m) for a, m in order]


# ---- stages ------------------------------------------------------------------------------------------
def cached(path: Path, fn) -> Any:
    """``fn()``'s JSON result, computed once into ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
    return value


def tag(model: str) -> str:
    return Path(model).name.replace("/", "_")


def build_store(g: Grid, inputs: Path, out: Path, model: str) -> dict:
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    kw = {"encoder": EncoderConfig(name=g.encoder, dtype="fp32")} if g.encoder else {}
    s = build(BuildConfig(inputs=[str(inputs)], out=str(out), tokenizer=model,
                          chunking=ChunkingConfig(g.chunk_tokens), **kw), log=log, progress=False)
    return {"path": str(out), "documents": s["documents"], "chunks": s["chunks"], "chunk_tokens": g.chunk_tokens,
            "continuation": True}


def squad_split_file(g: Grid, split: str) -> Path:
    """A SQuAD-format file holding only the articles of one task split (RETRO-fit's documents)."""
    from ralm.data.tasks.squad import read_squad_task

    out = Path(g.cache) / f"squad-{split}.json"
    if not out.exists():
        titles = {e.title for e in read_squad_task(Path(g.squad))[split]}
        data = json.loads(Path(g.squad).read_text(encoding="utf-8"))
        data["data"] = [a for a in data["data"] if a["title"] in titles]
        out.write_text(json.dumps(data), encoding="utf-8")
    return out


def task_file(g: Grid, task: str) -> Path:
    if task == "squad":
        return Path(g.squad)
    from ralm.data.registry import DATASETS, data_dir, get
    from ralm.data.tasks import get_task

    name = get_task(task).dataset
    for folder in (data_dir(), Path(g.cache) / "data"):
        if (folder / DATASETS[name].filename).exists():
            return folder / DATASETS[name].filename
    return get(name, Path(g.cache) / "data", log=log)


def store_for(g: Grid, model: str, task: str) -> dict | None:
    if task == "truthfulqa-mc":
        return None  # MC without a store: the questions are not about any document here
    src = "squad" if task == "squad" else task
    return cached(Path(g.cache) / f"store-{src}-{tag(model)}.json",
                  lambda: build_store(g, task_file(g, task), Path(g.cache) / f"ds-{src}-{tag(model)}", model))


def retro_checkpoint(g: Grid, model: str, store: dict) -> dict:
    """The RETRO-fit of ``model`` for ``store``: benchmarks/retro's if it fits, else one trained here."""
    from ralm.datastore.store import Datastore
    from ralm.lm.presets import tokenizer_fingerprint
    from ralm.methods.retro.checkpoint import load_retrofit
    from ralm.methods.retro.neighbours import check_store_fits

    def fits(ckpt: Path) -> str | None:
        from ralm.lm.models import load

        try:
            lm = load(model)
            net, _ = load_retrofit(ckpt, lm.model, lm.tokenizer, model)
            check_store_fits(Datastore.open(store["path"]), net.cfg, tokenizer_fingerprint(lm.tokenizer), model)
            return None
        except Exception as e:  # noqa: BLE001 (any reason it does not fit is reported, then we train our own)
            return str(e).splitlines()[0]

    def train() -> dict:
        from ralm.methods.retro.model import RetroConfig
        from ralm.tuning.retrofit import RetrofitConfig, retrofit

        if g.reuse_retro_ckpt and RETRO_CACHE_CKPT.exists() and model == SMOL:
            why = fits(RETRO_CACHE_CKPT)
            if why is None:
                return {"checkpoint": str(RETRO_CACHE_CKPT), "source": "reused benchmarks/.cache/retro/ckpt"}
            log(f"benchmarks/.cache/retro/ckpt does not fit the SQuAD store ({why}); RETRO-fitting here")
        out = Path(g.cache) / f"retrofit-{tag(model)}-{retro_key}"
        cfg = RetrofitConfig(datastore=store["path"], train=[str(squad_split_file(g, "train"))], out=str(out),
                             model=model, eval=[str(squad_split_file(g, "validation"))], steps=g.retrofit_steps,
                             retro=RetroConfig(**rc), batch_size=g.retrofit_batch, seq_len=g.retrofit_seq_len,
                             lr=2e-3, warmup=min(20, max(1, g.retrofit_steps // 10)), eval_every=0,
                             save_every=max(1, g.retrofit_steps // 4), eval_windows=8, bf16=g.bf16)
        t0 = time.perf_counter()
        s = retrofit(cfg, progress=False)
        keep = {k: s[k] for k in ("steps", "tokens_per_second", "final_loss") if k in s}
        return {"checkpoint": str(out), "source": "RETRO-fit here on the SQuAD train-split paragraphs",
                "retro": rc, "wall_s": round(time.perf_counter() - t0, 1), **keep}

    rc = {"chunk_size": g.chunk_tokens, "cca_layers": CCA_LAYERS.get(model), **g.retro}
    retro_key = hashlib.sha1(json.dumps([rc, g.retrofit_steps, g.retrofit_batch, g.retrofit_seq_len, g.bf16],
                                        sort_keys=True).encode()).hexdigest()[:10]
    record = Path(g.cache) / f"retrofit-{tag(model)}-{retro_key}.json"
    if record.exists() and not Path(json.loads(record.read_text())["checkpoint"]).exists():
        record.unlink()  # the record outlived its checkpoint (a fresh clone): fit again, same seed and data
    return cached(record, train)


def _score(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("predictions", "task", "split", "arch", "method", "model")}


def zero_shot(g: Grid, model: str, task: str, arch: str, store: dict | None, ckpt: str | None) -> dict:
    from ralm.eval.task import EvalTaskConfig, run_eval_task

    def run() -> dict:
        t0 = time.perf_counter()
        r = run_eval_task(EvalTaskConfig(zero_shot=True, arch=arch, task=task, task_file=str(task_file(g, task)),
                                         model=model, checkpoint=ckpt, datastore=store and store["path"],
                                         split="test", limit=g.limit, **_inputs(g)))
        log(f"zero-shot {model} {task} {arch}: {METRIC[task]} {r.get(METRIC[task])}")
        return {**_score(r), "eval_s": round(time.perf_counter() - t0, 1)}

    return cached(g.measured() / "zero" / f"{tag(model)}-{task}-{arch}.json", run)


def _inputs(g: Grid) -> dict[str, Any]:
    return {"docs": g.docs, "doc_tokens": g.doc_tokens, "max_len": g.max_len, "max_target": g.max_target,
            "max_new_tokens": g.max_new_tokens, "batch_size": g.batch_size}


def tune_config(g: Grid, model: str, task: str, arch: str, method: str, store: dict | None, ckpt: str | None,
                out: Path) -> dict[str, Any]:
    """The ``TuneConfig`` of a row as plain JSON (what the child process rebuilds)."""
    peft = {"method": method, "lora_rank": g.lora_rank, "lora_alpha": float(g.lora_rank), "adapter_dim": g.adapter_dim,
            "n_virtual": g.n_virtual}
    return {"task": task, "out": str(out), "arch": arch, "peft": peft, "task_file": str(task_file(g, task)),
            "datastore": store and store["path"], "checkpoint": ckpt, "model": model, "steps": g.steps,
            "lr": g.lr, "warmup": g.warmup, "eval_every": 0, "save_every": max(1, g.steps // 2), "bf16": g.bf16,
            "eval_examples": g.eval_examples, **_inputs(g)}


def run_tune(spec: dict[str, Any]) -> dict[str, Any]:
    from ralm.methods.peft import PeftConfig
    from ralm.tuning.tune import TuneConfig, tune

    return tune(TuneConfig(**{**spec, "peft": PeftConfig(**spec["peft"])}), progress=False)


def run_child(script: str, work: Path, job: dict[str, Any], what: str) -> dict[str, Any]:
    """``script --child work`` in a child process on ``job`` (written to ``work/job.json``); its
    ``work/result.json`` with the child's peak RSS from ``os.wait4`` (this process's own is not counted).
    Shared by the benchmarks that isolate their runs (``child_job`` / ``child_result`` are the child's side)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job))
    # the loop's progress lines go to stderr: stdout carries the one JSON object
    proc = subprocess.Popen([sys.executable, script, "--child", str(work)], stdout=sys.stderr)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{what} exited with {code}")
    res = json.loads((work / "result.json").read_text())
    res["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: kilobytes
    return res


def child_job(work: Path) -> dict[str, Any]:
    """The child's side of ``run_child``: its job, with torch's CPU threads set as the job asks."""
    job = json.loads((work / "job.json").read_text())
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])
    return job


def child_result(work: Path, res: dict[str, Any]) -> None:
    (work / "result.json").write_text(json.dumps(res))


def tune_isolated(spec: dict[str, Any], g: Grid) -> dict[str, Any]:
    """``run_tune`` in a child process (``run_child``), with its peak RSS."""
    return run_child(__file__, Path(spec["out"] + ".child"), {"spec": spec, "threads": g.threads},
                     f"tuning child for {spec['out']}")


def child(work: Path) -> None:
    child_result(work, run_tune(child_job(work)["spec"]))


def row(g: Grid, model: str, task: str, arch: str, method: str, store: dict | None, ckpt: str | None) -> dict:
    from ralm.eval.task import EvalTaskConfig, run_eval_task

    name = f"{tag(model)}-{task}-{arch}-{method}"

    def run() -> dict:
        out = g.folder() / "runs" / name
        spec = tune_config(g, model, task, arch, method, store, ckpt, out)
        t0 = time.perf_counter()
        s = tune_isolated(spec, g) if g.isolate else run_tune(spec)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        r = run_eval_task(EvalTaskConfig(run=str(out), split="test", limit=g.limit, batch_size=g.batch_size))
        log(f"{name}: {METRIC[task]} {r.get(METRIC[task])}, {s['tokens_per_second']} tok/s, {wall:.0f} s")
        return {"run": str(out), "trainable": s["trainable"], "total": s["total"], "percent": round(s["percent"], 4),
                "tokens_per_second": s["tokens_per_second"], "positions_per_second": s.get("positions_per_second"),
                "trained_tokens": s["trained_tokens"], "train_loop_s": s.get("train_seconds"),
                "train_wall_s": round(wall, 1), "peak_rss_mb": s.get("peak_rss_mb"), "final_loss": s.get("final_loss"),
                "tuned": _score(r), "eval_s": round(time.perf_counter() - t1, 1)}

    return cached(g.measured() / "rows" / f"{name}.json", run)


def run_grid(g: Grid) -> dict[str, Any]:
    """Every stage of the grid (cached), then the results with their claims; writes results.{json,md,png}."""
    if g.threads:
        import torch

        torch.set_num_threads(g.threads)
    Path(g.cache).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    stores: dict[str, Any] = {}
    retrofits: dict[str, Any] = {}
    zero: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    skipped = list(g.skipped)
    pair = None  # the speed pairs first: a few minutes, and the grid's full fine-tuning rows come last
    if g.speed_reps and any(r[0] == SMOL and r[2:] == ("gpt", "full") for r in g.rows):
        pair = speed_pair(g, lambda: store_for(g, SMOL, "squad"))
    for model, task, arch, method in g.rows:
        key = f"{model} {task} {arch} {method}"
        rows_done = (g.measured() / "rows" / f"{tag(model)}-{task}-{arch}-{method}.json").exists()
        if not rows_done and g.max_minutes is not None and time.perf_counter() - t_start > 60 * g.max_minutes:
            skipped.append(f"{key}: not run (--max-minutes {g.max_minutes:g} reached)")
            continue
        store, ckpt = None, None
        if not rows_done:  # a measured row is read from its JSON: no store or RETRO-fit needed (a fresh clone)
            store = store_for(g, model, task)
        if store is not None:
            stores[f"{tag(model)} {task}"] = store
        if arch == "retro" and not rows_done:
            squad_store = store_for(g, model, "squad")
            retrofits[tag(model)] = retro_checkpoint(g, model, squad_store)
            ckpt = retrofits[tag(model)]["checkpoint"]
            if store is None:  # MC: retro still needs neighbours; it reads the SQuAD paragraphs
                store = squad_store
        zkey = f"{tag(model)} {task} {arch}"
        zero[zkey] = zero_shot(g, model, task, arch, store, ckpt)
        r = row(g, model, task, arch, method, store, ckpt)
        rows.append({"model": model, "task": task, "arch": arch, "method": method, "metric": METRIC[task],
                     "zero_shot": zero[zkey].get(METRIC[task]), "tuned_score": r["tuned"].get(METRIC[task]), **r})
    res = {"benchmark": "peft", "settings": g.training(), "grid": g.digest(), "stores": stores,
           "retrofit": retrofits, "zero_shot": zero, "rows": rows, "speed": speed(rows, pair, SMOL), "skipped": skipped}
    res["claims"] = claims(rows, SMOL, GEMMA)
    write_outputs(res, Path(g.results))
    return res


def speed_pair(g: Grid, store_of) -> dict[str, Any]:
    """gpt LoRA vs full fine-tuning, ``speed_reps`` times in alternation (lora, full, lora, full, ...), each a
    child process of ``speed_steps`` steps on the same batches: the ratio of each pair, so a load change on the
    shared machine hits both sides of a pair alike. Train seconds only (no evaluation, no saving). ``store_of()``
    gives the SQuAD store, built only when the pairs are not measured yet."""
    import shutil

    def run() -> dict[str, Any]:
        runs, store = [], store_of()
        for rep in range(g.speed_reps):
            for method in ("lora", "full"):
                out = g.folder() / "speed" / f"{method}-{rep}"
                spec = {**tune_config(g, SMOL, "squad", "gpt", method, store, None, out), "steps": g.speed_steps,
                        "warmup": 1, "save_every": 0, "eval_examples": 1, "force": True}
                r = tune_isolated(spec, g)
                shutil.rmtree(out, ignore_errors=True)  # a full fine-tuning folder holds every weight
                shutil.rmtree(Path(str(out) + ".child"), ignore_errors=True)
                runs.append({"method": method, "rep": rep, "train_seconds": r["train_seconds"],
                             "tokens": r["trained_tokens"], "tokens_per_second": r["tokens_per_second"],
                             "positions_per_second": r.get("positions_per_second"), "peak_rss_mb": r["peak_rss_mb"]})
                log(f"speed {method} #{rep}: {r.get('positions_per_second')} positions/s, {r['peak_rss_mb']} MB")
        pairs = zip(runs[::2], runs[1::2], strict=True)  # (lora, full) of each rep
        ratios = sorted(a["positions_per_second"] / b["positions_per_second"] for a, b in pairs)
        return {"runs": runs, "steps": g.speed_steps, "ratio_lora_over_full_median": round(ratios[len(ratios) // 2], 3),
                "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3)}

    return cached(g.measured() / "speed.json", run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: SmolLM2 SQuAD rows, 8 steps, 16 questions")
    ap.add_argument("--cpu", action="store_true", help="the CPU budget: every row of the grid at 200 steps of "
                    "batch 2, 100 test examples, the passages cut to 48 tokens (see the module docstring)")
    ap.add_argument("--limit", type=int, default=None, help="test examples per row (quick 16, full 200)")
    ap.add_argument("--steps", type=int, default=None, help="tuning steps per row (quick 8, full 200)")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per step (quick 4, full 8)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of every row")
    ap.add_argument("--retrofit-steps", type=int, default=None, help="RETRO-fit steps (quick 24, full 400)")
    ap.add_argument("--no-gemma-retro", action="store_true", help="skip Gemma-3-270M's RETRO-fit and retro row")
    ap.add_argument("--no-reuse-retro", action="store_true", help="RETRO-fit here even if benchmarks/.cache/retro fits")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new row after this long")
    ap.add_argument("--tasks", default=None, help="comma-separated: only the rows of these tasks (squad, aclsum, "
                    "truthfulqa-mc)")
    ap.add_argument("--models", default=None, help=f"comma-separated: only the rows of these models ({SMOL}, {GEMMA})")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=str(CACHE), help="stores, RETRO-fits and run folders (weights)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="the measured JSON of every stage and the results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(Path(args.child))
        return 0
    if args.quick:
        g = Grid(rows=quick_rows(), steps=8, warmup=2, batch_size=4, limit=16, docs=2, doc_tokens=48, max_len=192,
                 max_new_tokens=8, eval_examples=2, retrofit_steps=24, retrofit_batch=4, retrofit_seq_len=128,
                 skipped=["aclsum and truthfulqa-mc rows (--quick: CPU budget)",
                          "gemma3-270m rows (--quick: CPU budget)"])
    elif args.cpu:
        g = cpu_grid(not args.no_gemma_retro)
    else:
        g = Grid(rows=full_rows(not args.no_gemma_retro), steps=200, batch_size=8, limit=200, retrofit_steps=400,
                 skipped=["gemma3-270m retro lora (--no-gemma-retro)"] if args.no_gemma_retro else [])
    for flag, col, allowed in (("tasks", 1, tuple(METRIC)), ("models", 0, (SMOL, GEMMA))):
        if getattr(args, flag):
            keep = set(getattr(args, flag).split(","))
            if bad := sorted(keep - set(allowed)):
                ap.error(f"--{flag} {bad[0]!r}: choose from {', '.join(allowed)}")
            dropped = sorted({r[col] for r in g.rows} - keep)
            g = replace(g, rows=[r for r in g.rows if r[col] in keep],
                        skipped=g.skipped + [f"{', '.join(dropped)} rows (--{flag})"] if dropped else g.skipped)
    over = {"limit": args.limit, "steps": args.steps, "batch_size": args.batch_size, "retrofit_steps": args.retrofit_steps}
    g = replace(g, lr=args.lr, max_minutes=args.max_minutes, threads=args.threads, cache=args.cache_dir,
                results=args.results_dir,
                reuse_retro_ckpt=not args.no_reuse_retro, **{k: v for k, v in over.items() if v is not None})
    with contextlib.redirect_stdout(sys.stderr):  # in-process runs print the loop's progress
        res = run_grid(g)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
