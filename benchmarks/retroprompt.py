#!/usr/bin/env python
"""RetroPrompt's few-shot table (issue 14): ``ralm.tuning.fewshot_table`` at 16 and 4 shots on Rotten Tomatoes
and BBC News with SmolLM2-135M, and on Fashion-MNIST (a head over frozen EfficientNet-Lite0 features, lr
``--image-lr``, the whole test split), LM-BFF's five seeds.

Presets. Default = the paper's settings, for a GPU: full prompt-based fine-tuning, 800 steps of 8 at lr 1e-5,
the whole test split. ``--cpu`` = what two CPU cores finish in about a day: LoRA (rank 8 on the attention projections:
921,600 weights, 0.7 % of the model) instead of full fine-tuning (a full step adds the gradient of all 135M
weights and AdamW's state for them), 96 steps of 8 at lr 5e-4 (LoRA wants ~10-50x full FT's lr;
96 x 8 = 24 epochs of the 16-shot sentiment store, ~10 of BBC's), prompts cut to 128 tokens (BBC articles
are ~400), and the first 200 test examples (the same for every row; the size is in the output). Measured
here on Rotten Tomatoes, one thread of a loaded 2-core machine: ~2.5 training examples/s for prompt FT and
~1.5 for RetroPrompt (demonstrations: one more forward per step; refresh every epoch), so a 16-shot cell
takes ~5-9 minutes with its scoring. A CPU row is therefore "RetroPrompt with LoRA, short training", not
the paper's.

Cells are measured in the order most informative first (``plan``): the headline (untrained rows, prompt FT
and RetroPrompt at 16 shots, seed by seed on each data set), then the ablations at 16 shots, then 4 shots.
Each measured cell is kept as JSON under ``benchmarks/results/retroprompt/grid-<digest>/cells/`` (digest of
the settings that change the numbers), so a rerun or a later session continues; ``--max-minutes`` starts no
new cell after that long. Trained cells run in a child process each (``--isolate``, default; its peak RSS via
``os.wait4``); their run folders (weights) are under ``benchmarks/.cache/retroprompt/`` and deleted once the
cell is measured unless ``--keep-runs`` (full fine-tuning writes 540 MB per run).

Output: one JSON object on stdout, ``results.{json,md,png}`` in the results folder: the table (mean ± std
over seeds, per-seed values), training examples/s and the store's share of training time per trained row,
and the sentence "RetroPrompt vs prompt FT at 16 shots: +x.x ± y.y (seed spread z)" computed from the cells
(paired by seed; at the grid's largest shots), and the same for the example kept in vs left out. The store's
share of training includes its first encoding (prompt FT builds one too: the trainer logs p_kNN(gold)).
The three files describe this run's selection (``--data --shots --seeds --rows``): after runs split across
processes by seed, render the whole grid from its cells with no selection and ``--max-minutes 0`` (seconds).
Memorization (``ralm.tuning.retroprompt_memo``): for the prompt-FT and RetroPrompt cells at the grid's largest
shots and the seeds in ``--memo-seeds`` (default: the first seed; LiSSA over a LoRA run costs ``depth`` Hessian-
vector products per group of examples), the self-influence of every training example over the run's trained
parameters, summarised over all examples and the atypical 10 % (lowest p_kNN of the gold label under that run's
own final store, self left out): text runs by LiSSA (the reference's damping 5e-3 and scale 1e4, ``--memo-depth``
steps; ``--cpu``: 10), image runs by an exact solve over the head's last layer. ``--no-memo`` skips it. Measured
here at depth 100: the first group of 8 of a 32-example LoRA prompt-FT run had not finished after 55 minutes on
one thread (each step is a Hessian-vector product through SmolLM2 for each of the group's vectors), so ~4 h
per cell; depth 10 is what the CPU preset affords, a cruder inverse (the recursion sums `depth` terms of the
series for (H + d·s·I)⁻¹): each cell's JSON names the approximation and depth with its scores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peft_results import write_outputs  # noqa: E402  (sibling benchmarks: the three outputs,
from peftbench import cached, child_job, child_result, run_child  # noqa: E402  (and the stage cache, child runs)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "retroprompt"  # run folders (weights): never committed
RESULTS = ROOT / "benchmarks" / "results" / "retroprompt"
DATA = Path(os.environ.get("RALM_DATA_DIR", ROOT.parent / "shared" / "data"))  # where a named set's file is
DATA_SETS = ("rotten-tomatoes", "bbc-news", "fashion-mnist")
SEEDS = (13, 21, 42, 87, 100)
# settings added after grids were measured: at these defaults a grid's digest is what it was (Grid.digest)
LATER_DEFAULTS: dict[str, Any] = {"image_lr": 1e-3, "image_test_limit": None, "demo_norm": "raw"}
HEADLINE = ("zero-shot", "knn", "linear-probe", "prompt-ft", "retroprompt")
ABLATIONS = ("no-loss-scaling", "no-interpolation", "no-demos", "no-refresh", "kept-in")


def log(msg: str) -> None:
    print(f"[retroprompt-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Grid:
    """What the benchmark runs. The fields of ``settings()`` change the numbers (they name the grid); the
    data sets, shots, seeds and rows only choose cells of it."""

    cache: str = str(CACHE)
    results: str = str(RESULTS)
    data: tuple[str, ...] = DATA_SETS
    data_files: dict[str, str] = field(default_factory=dict)  # a set's file (default: ralm's data folder)
    shots: tuple[int, ...] = (16, 4)
    seeds: tuple[int, ...] = SEEDS
    rows: tuple[str, ...] = HEADLINE + ABLATIONS
    model: str = "smollm2-135m"
    peft: str = "full"
    lora_rank: int = 8
    n_virtual: int = 16
    steps: int = 800
    lr: float = 1e-5
    batch_size: int = 8
    test_limit: int | None = None
    max_tokens: int = 256
    k: int = 16
    demos: int = 8
    beta: float = 1e-4
    bf16: bool | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # RetroPromptConfig fields for other settings
    isolate: bool = True
    keep_runs: bool = False
    threads: int | None = None
    max_minutes: float | None = None
    preset: str = "paper"
    memo: bool = True  # memorization scores of the prompt-FT and RetroPrompt cells (see the module docstring)
    memo_seeds: tuple[int, ...] = (13,)
    memo_depth: int = 100
    memo_data: tuple[str, ...] | None = None  # data sets whose cells score memorization (None: all)
    # image sets train a head over frozen features: the LM's flags (model, peft, max_tokens) do not apply, a head
    # wants a larger lr than LoRA, and scoring the whole test split costs seconds (the features are cached)
    image_lr: float = LATER_DEFAULTS["image_lr"]
    image_test_limit: int | None = LATER_DEFAULTS["image_test_limit"]
    demo_norm: str = LATER_DEFAULTS["demo_norm"]  # text demonstrations: raw (the reference) or embedding

    def settings(self) -> dict[str, Any]:
        keys = ("model", "peft", "lora_rank", "n_virtual", "steps", "lr", "batch_size", "test_limit", "max_tokens",
                "k", "demos", "beta", "bf16", "overrides", "image_lr", "image_test_limit", "demo_norm")
        return {k: getattr(self, k) for k in keys}

    def digest(self) -> str:
        s = {k: v for k, v in self.settings().items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}
        return hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]

    def folder(self, kind: str) -> Path:
        """``cells``: the measured cells' JSON (kept: a rerun continues); ``runs``: run folders while they train."""
        return Path(self.results if kind == "cells" else self.cache) / f"grid-{self.digest()}" / kind


def base_config(g: Grid, data: str) -> Any:
    """The shared ``RetroPromptConfig`` of a data set's cells (shots, seed, out: set per cell)."""
    from ralm.data.registry import DATASETS
    from ralm.methods.peft import PeftConfig
    from ralm.tuning.fewshot_table import cell_config
    from ralm.tuning.retroprompt_config import IMAGE_SETS, RetroPromptConfig, draw

    shared = DATA / DATASETS[data].filename if data in DATASETS else None
    file = g.data_files.get(data, str(shared) if shared is not None and shared.exists() else None)
    images = data in IMAGE_SETS
    lm = {} if images else {"model": g.model}
    cfg = RetroPromptConfig(data=data, out=str(g.folder("runs")), data_file=file, steps=g.steps,
                            lr=g.image_lr if images else g.lr, batch_size=g.batch_size,
                            test_limit=g.image_test_limit if images else g.test_limit,
                            eval_every=0, save_every=max(1, g.steps // 4), bf16=g.bf16, **lm, **g.overrides)
    if not images:
        peft = PeftConfig(method=g.peft, lora_rank=g.lora_rank, lora_alpha=float(g.lora_rank), n_virtual=g.n_virtual)
        cfg = replace(cfg, peft=peft, prompt=replace(cfg.prompt, max_tokens=g.max_tokens, demo_norm=g.demo_norm))
    cfg = replace(cfg, knn=replace(cfg.knn, k=g.k, demos=g.demos, beta=g.beta))
    for shots in g.shots:  # the data is there and every draw can be made: else the set is skipped, said why
        draw(cell_config(cfg, shots, g.seeds[0], cfg.out))
    return cfg


def plan(g: Grid) -> list[Any]:
    """The cells, most informative first: the 16-shot headline seed by seed, its ablations, then the other
    shots the same way."""
    from ralm.tuning.fewshot_table import Cell

    out = []
    for shots in sorted(g.shots, reverse=True):
        for rows in (HEADLINE, ABLATIONS):
            chosen = [r for r in rows if r in g.rows]
            out += [Cell(d, shots, s, r) for s in g.seeds for d in g.data for r in chosen]
    return out


# ---- measuring ---------------------------------------------------------------------------------------
def memo_job(cfg: Any, g: Grid) -> dict[str, Any] | None:
    """How to score memorization after this cell trains (``memorization_scores``' keywords), or None."""
    if not g.memo or cfg.seed not in g.memo_seeds or (g.memo_data is not None and cfg.data not in g.memo_data):
        return None
    if cfg.data == "fashion-mnist":
        return {"method": "exact", "params": "head"}
    return {"method": "lissa", "params": "all", "depth": g.memo_depth}


def cell_result(cfg: Any, memo: dict[str, Any] | None) -> dict[str, Any]:
    """``trained_cell(cfg)``, then (``memo``) the memorization summary of its run, before the run is deleted."""
    from ralm.methods.retroprompt.memorization import MemoConfig
    from ralm.tuning.fewshot_table import trained_cell
    from ralm.tuning.retroprompt_memo import memorization_scores

    res = trained_cell(cfg)
    if memo is not None:
        lissa = MemoConfig(depth=memo["depth"]) if memo["method"] == "lissa" else None
        m = memorization_scores(cfg.out, method=memo["method"], params=memo["params"], lissa=lissa)
        res["memorization"] = {k: m[k] for k in ("method", "approximation", "params", "summary", "seconds",
                                                 "scores", "knn_gold")}
    return res


def train_isolated(cfg: Any, g: Grid, memo: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cell_result(cfg, memo)`` in a child process (or in this one); peak RSS of the child."""
    t0 = time.perf_counter()
    if not g.isolate:
        res = cell_result(cfg, memo)
    else:
        job = Path(cfg.out + ".job")
        res = run_child(__file__, job, {"config": cfg.to_json(), "threads": g.threads, "memo": memo},
                        f"training child for {cfg.out}")
        shutil.rmtree(job, ignore_errors=True)
    if not g.keep_runs:
        shutil.rmtree(cfg.out, ignore_errors=True)
    return {**res, "wall_s": round(time.perf_counter() - t0, 1)}


def child(job: Path) -> None:
    from ralm.tuning.retroprompt_config import RetroPromptConfig

    spec = child_job(job)
    child_result(job, cell_result(RetroPromptConfig.from_json(spec["config"]), spec.get("memo")))


def run_grid(g: Grid) -> dict[str, Any]:
    """Every cell of the grid (cached), then the table, the speed figures and the comparison; writes
    results.{json,md,png}."""
    from ralm.errors import RalmError
    from ralm.tuning import fewshot_table as ft

    if g.threads:
        import torch

        torch.set_num_threads(g.threads)
    t_start = time.perf_counter()
    skipped = [] if g.memo else ["memorization table (--no-memo)"]
    if g.memo and g.memo_data is not None:
        skipped += [f"{d}: memorization (not in --memo-data)" for d in g.data if d not in g.memo_data]
    bases, data = {}, []
    for d in g.data:
        try:
            bases[d] = base_config(g, d)
            data.append(d)
        except RalmError as e:  # e.g. a data set the trainer does not read (yet), or whose file is missing
            skipped.append(f"{d}: {e}")
    g = replace(g, data=tuple(data))

    def cache(cell: Any, compute) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            r = compute()
            log(f"{cell.name()}: test {100 * r['test']:.1f} ({time.perf_counter() - t0:.0f} s)")
            return r

        return cached(g.folder("cells") / f"{cell.name()}.json", run)

    def stop() -> bool:
        return g.max_minutes is not None and time.perf_counter() - t_start > 60 * g.max_minutes

    def memo_for(cfg: Any) -> dict[str, Any] | None:  # the prompt-FT and RetroPrompt cells at the largest shots
        if cfg.shots != max(g.shots):
            return None
        for row in ("prompt-ft", "retroprompt"):
            ref = ft.row_config(bases[cfg.data], ft.Cell(cfg.data, cfg.shots, cfg.seed, row), cfg.out)
            if (ref.knn, ref.lmbda, ref.refresh) == (cfg.knn, cfg.lmbda, cfg.refresh):
                return memo_job(cfg, g)
        return None

    measured, left = ft.run_table(bases, plan(g), g.folder("runs"),
                                  train=lambda cfg: train_isolated(cfg, g, memo_for(cfg)), cache=cache, stop=stop)
    if left:
        skipped.append(f"{len(left)} cells not run (--max-minutes {g.max_minutes:g} reached), from "
                       f"{left[0].name()}")
    res = {"benchmark": "retroprompt", "preset": g.preset, "settings": g.settings(), "grid": g.digest(),
           "data": list(g.data), "shots": list(g.shots), "seeds": list(g.seeds), "rows": list(g.rows),
           "row_meaning": {r: ft.ROWS[r] for r in g.rows}, "table": ft.aggregate(measured),
           "comparison": [ft.comparison(measured, d, max(g.shots)) for d in g.data],
           "kept_in_vs_left_out": [ft.comparison(measured, d, max(g.shots), "kept-in", "retroprompt") for d in g.data],
           "memorization": memorization_table(measured), "cells": measured,
           "skipped": skipped, "wall_s": round(time.perf_counter() - t_start, 1)}
    write_outputs(res, Path(g.results), markdown, chart)
    return res


# ---- results -----------------------------------------------------------------------------------------
def memorization_table(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell that scored memorization: its summary over all examples and the atypical share."""
    out = []
    for c in measured:
        m = c.get("memorization")
        if m:
            out.append({"data": c["data"], "shots": c["shots"], "seed": c["seed"], "row": c["row"],
                        "method": m["method"], "params": m["params"]["count"], **m["summary"],
                        "seconds": m["seconds"]["total"]})
    return out


IMAGE_NOTE = ("A head over frozen EfficientNet-Lite0 ImageNet features trains here (lr image_lr; model, peft, lr, "
              "test_limit and max_tokens are the text sets'); its zero-shot row is that head untrained: chance.")


def markdown(res: dict[str, Any]) -> str:
    from ralm.tuning.retroprompt_config import IMAGE_SETS

    lines = ["# RetroPrompt few-shot table (benchmarks/retroprompt.py)", "",
             f"Preset {res['preset']}; settings: " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()),
             f"Seeds {res['seeds']}; test accuracy in points, mean ± std over seeds (population std, as LM-BFF).", ""]
    for c in res["comparison"] + res["kept_in_vs_left_out"]:
        verdict = "" if c["beats"] is None else (": ahead" if c["beats"] else ": not ahead") + (
            ", by more than the seed spread" if c["beyond_spread"] else ", within the seed spread")
        lines.append(f"- {c['sentence']}{verdict}")
    for data in res["data"]:
        for shots in res["shots"]:
            rows = [r for r in res["table"] if (r["data"], r["shots"]) == (data, shots)]
            if not rows:
                continue
            lines += ["", f"## {data}, {shots} shots (test examples: {rows[0]['test_examples']})", "",
                      *([IMAGE_NOTE, ""] if data in IMAGE_SETS else []),
                      "| row | accuracy | seeds | per seed | train examples/s | store share of training "
                      "| train p_kNN(gold) |", "|---|---|---|---|---|---|---|"]
            for r in rows:
                share = r.get("store_share")
                lines.append(f"| {res['row_meaning'][r['row']]} | {r['mean']:.1f} ± {r['std']:.1f} | "
                             f"{len(r['seeds'])} | {', '.join(f'{x:.1f}' for x in r['per_seed'])} | "
                             f"{r.get('examples_per_second', '')} | "
                             f"{'' if share is None else f'{100 * share:.1f} %'} | {r.get('train_p_knn_gold', '')} |")
    if res.get("memorization"):
        lines += ["", "## Memorization (self-influence; atypical = the 10 % lowest p_kNN(gold))", "",
                  "| data | shots | seed | row | method | scored params | mean (all) | median (all) | mean (atypical) "
                  "| median (atypical) | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in res["memorization"]:
            lines.append(f"| {m['data']} | {m['shots']} | {m['seed']} | {m['row']} | {m['method']} | {m['params']:,} "
                         f"| {m['mean']:.4g} | {m['median']:.4g} | {m['atypical_mean']:.4g} | "
                         f"{m['atypical_median']:.4g} | {m['seconds']:.0f} |")
    if res["skipped"]:
        lines += ["", "Not run: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(d, s) for d in res["data"] for s in res["shots"]
              if any((r["data"], r["shots"]) == (d, s) for r in res["table"])]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(res["rows"]))
    for j, row in enumerate(res["rows"]):
        got = [next((r for r in res["table"] if (r["data"], r["shots"], r["row"]) == (d, s, row)), None)
               for d, s in groups]
        xs = [i + (j - len(res["rows"]) / 2 + 0.5) * width for i, r in enumerate(got) if r is not None]
        ys = [r for r in got if r is not None]
        if ys:
            ax.bar(xs, [r["mean"] for r in ys], width, yerr=[r["std"] for r in ys], capsize=2, label=row)
    ax.set_xticks(range(len(groups)), [f"{d}\n{s} shots" for d, s in groups], fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("RetroPrompt few-shot table")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_from(args: argparse.Namespace) -> Grid:
    if args.cpu:
        g = Grid(preset="cpu", peft="lora", lora_rank=8, steps=96, lr=5e-4, test_limit=200, max_tokens=128,
                 memo_depth=10)
    else:
        g = Grid()
    over = {"steps": args.steps, "lr": args.lr, "test_limit": args.test_limit, "batch_size": args.batch_size,
            "peft": args.peft, "model": args.model, "beta": args.beta, "image_lr": args.image_lr,
            "demo_norm": args.demo_norm}
    picked = {"data": args.data, "shots": args.shots, "seeds": args.seeds, "rows": args.rows}
    memo = {"memo_seeds": tuple(args.memo_seeds) if args.memo_seeds else None, "memo_depth": args.memo_depth,
            "memo_data": tuple(args.memo_data) if args.memo_data else None}
    g = replace(g, memo=not args.no_memo, **{k: v for k, v in memo.items() if v is not None})
    return replace(g, max_minutes=args.max_minutes, threads=args.threads, cache=args.cache_dir,
                   results=args.results_dir, isolate=not args.in_process, keep_runs=args.keep_runs,
                   **{k: v for k, v in over.items() if v is not None},
                   **{k: tuple(v) for k, v in picked.items() if v})


def parser() -> argparse.ArgumentParser:
    from ralm.methods.retroprompt.prompt import DEMO_NORMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the CPU preset (LoRA r=8, 96 steps, lr 5e-4, 200 test "
                    "examples, 128-token prompts; see above)")
    ap.add_argument("--data", nargs="+", help=f"data sets (default: {' '.join(DATA_SETS)})")
    ap.add_argument("--shots", nargs="+", type=int, help="examples per class (default: 16 4)")
    ap.add_argument("--seeds", nargs="+", type=int, help=f"few-shot seeds (default: {' '.join(map(str, SEEDS))})")
    ap.add_argument("--rows", nargs="+", help="rows of the table (default: all)")
    ap.add_argument("--model", help="the LM (default smollm2-135m)")
    ap.add_argument("--peft", help="trained parameters: full (default), lora, prompt, ...")
    ap.add_argument("--steps", type=int, help="training steps per trained cell")
    ap.add_argument("--lr", type=float, help="learning rate of every trained cell")
    ap.add_argument("--image-lr", type=float, help="learning rate of the image cells' head (default 1e-3; the "
                    "LM flags --model --peft do not apply to them, and they score the whole test split)")
    ap.add_argument("--batch-size", type=int, help="examples per step")
    ap.add_argument("--demo-norm", choices=DEMO_NORMS, help="text demonstrations enter the input as "
                    "the representations are (raw, default: the reference) or at the input embeddings' mean norm")
    ap.add_argument("--beta", type=float, help="the kNN-guided loss's β (default: the reference's 1e-4, which "
                    "scales CE by ~1.0001: the no-loss-scaling row then differs from RetroPrompt by ~nothing)")
    ap.add_argument("--test-limit", type=int, help="score the first N test examples (default: all; --cpu 200)")
    ap.add_argument("--max-minutes", type=float, help="start no new cell after this long")
    ap.add_argument("--no-memo", action="store_true", help="skip the memorization scores")
    ap.add_argument("--memo-seeds", nargs="+", type=int, help="seeds whose prompt-FT and RetroPrompt cells score "
                    "memorization (default: 13)")
    ap.add_argument("--memo-data", nargs="+", help="data sets whose cells score memorization (default: all; a "
                    "cell measured without it keeps none: delete its cell JSON to score it)")
    ap.add_argument("--memo-depth", type=int, help="LiSSA recursion depth of text runs (default 100; --cpu 10)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--in-process", action="store_true", help="train in this process (no peak RSS per run)")
    ap.add_argument("--keep-runs", action="store_true", help="keep each trained cell's run folder (weights)")
    ap.add_argument("--cache-dir", default=str(CACHE), help="run folders while they train")
    ap.add_argument("--results-dir", default=str(RESULTS), help="measured cells and results.{json,md,png}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        child(Path(args.child))
        return 0
    g = grid_from(args)
    with contextlib.redirect_stdout(sys.stderr):  # in-process runs print the loop's progress
        res = run_grid(g)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
