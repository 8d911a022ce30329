#!/usr/bin/env python
"""Is the retriever just doing prompt tuning? Both sides of the claim, measured with ``ralm diagnose`` (issue 15).

Cases (setting x method), each one ``run_diagnose`` (store ablations none / shuffled / random / random-text / fixed,
the frozen base, bootstrap intervals over documents or examples, context variance, a prompt-tuning baseline of
16 virtual tokens with a learning-rate sweep, the verdict), most informative first:

- ``retro-clean`` / ``retro-leakage``: a RETRO-fit of SmolLM2-135M (expect: clean acts as a soft prompt or an
  adaptation of the frozen model; leakage retrieval-dependent);
- ``in-context-leakage`` / ``-clean``, ``knn-lm-leakage`` / ``-clean``: the untrained methods (leakage: expect
  retrieval-dependent);
- ``peft-squad``: ``ralm tune --arch gpt --peft lora`` on SQuAD, retrieved paragraphs in the prompt (issue 13's run);
- ``retroprompt``: a RetroPrompt run (Rotten Tomatoes, 16 shots, seed 13, all components) trained here with
  benchmarks/retroprompt.py's settings of the same preset (``--retroprompt-run`` to give one): its knowledge
  store's searches ablated, prompt tuning on its few-shot draw as the baseline, 200 test examples (``--cpu``).

Settings as benchmarks/lm.py and benchmarks/retro.py define them: **leakage** = the evaluated articles are in the
store (the first ``n_docs`` of the 460 store articles) and same-document exclusion is off; **clean** = held-out
articles (768-787) with exclusion and 32-gram decontamination on. Each evaluated article is cut to its first
``doc_chars`` characters (at a paragraph break) so the stride-16/32 in-context runs fit a CPU budget.

Artefacts are reused where other benchmarks made them, else built here (``--no-build``: the case reads "not run:
<why>"): the retrieval store benchmarks/.cache/lm/ds (lm.py's, built by its own function); the kNN-LM store
benchmarks/.cache/lm/knn where the grid would build the same (460 articles, context 512), else one over the
first ``knn_docs`` store articles in benchmarks/.cache/diagnose/; the RETRO-fit benchmarks/.cache/retro/ckpt if
trained, else one trained here on the store articles (``retrofit_*`` steps, half of them allowed to retrieve
themselves, as retro.py); the PEFT run where benchmarks/peftbench.py --cpu keeps it (trained there with that
grid's settings if missing). The prompt-tuning baseline is trained once per training text and settings
(benchmarks/.cache/diagnose/baselines/) and shared by the cases that train the same one: every eval-lm case
trains it on the store articles (``--cpu``: the first 100; every 10th is held out to pick the learning rate).

``--cpu``: context 256, 6 articles per setting cut to 1,200 characters (6 bootstrap units: wide intervals),
in-context stride 32 with 128-token passages, a 60-article kNN store, 100-step RETRO-fit and baselines (batch
2 x 256 tokens, lr 3e-2 and 3e-1), 30 SQuAD test questions. Default: the larger grid (context 512, 16 articles
of 4,000 characters, stride 16, the 1M-key store, 300 steps of 2 x 512 tokens, 3 learning rates, 100
questions), for a GPU or a long CPU run.

Each measured case (its per-unit values, so verdicts are recomputed from the numbers) is kept as JSON under
benchmarks/results/diagnose/grid-<digest of the settings>/cases/, so a rerun or a later session continues;
``--max-minutes`` starts no new case after that long. Output: one JSON object on stdout and
benchmarks/results/diagnose/results.{json,md,png} (benchmarks/diagnose_results.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose_artefacts import (  # noqa: E402  (the documents and each case's artefact)
    NotRun,
    knn_store,
    log,
    peft_run,
    prepare,
    retrieval_store,
    retro_checkpoint,
    retroprompt_run,
    short_hash,
)
from diagnose_results import CASES, results  # noqa: E402  (the pure results code)
from peft_results import write_outputs  # noqa: E402  (the three outputs)
from peftbench import cached  # noqa: E402  (the stage cache)

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "diagnose"  # built stores, RETRO-fits, baselines, case folders
RESULTS = ROOT / "benchmarks" / "results" / "diagnose"
OTHER = ROOT / "benchmarks" / ".cache"  # what the other benchmarks built: lm/, retro/, peft/, retroprompt/
SMOL = "smollm2-135m"


@dataclass
class Grid:
    """What the benchmark runs. ``settings()`` names the grid (they change the numbers); paths and cases only
    choose where artefacts come from and which cases run."""

    cache: str = str(CACHE)
    results: str = str(RESULTS)
    other: str = str(OTHER)
    preset: str = "default"
    cases: tuple[str, ...] = tuple(CASES)
    model: str = SMOL
    store_docs: str | None = None  # the store's articles (None: benchmarks/lm.py's 460)
    held_docs: str | None = None  # held-out articles (None: lm.py's test articles 768-787)
    ds: str | None = None  # the retrieval store (None: lm.py's)
    knn: str | None = None  # a kNN-LM store (None: lm.py's if built, else one built here)
    retro_ckpt: str | None = None  # a RETRO-fit (None: retro.py's if trained, else one trained here)
    peft_run: str | None = None  # a `ralm tune` run (None: peftbench's, trained with ``peft`` if missing)
    retroprompt_run: str | None = None
    peft: dict[str, Any] = field(default_factory=dict)  # peftbench.Grid overrides of its --cpu grid
    build: tuple[str, ...] = ("ds", "knn", "retro", "peft", "retroprompt")  # what may be built here when missing
    encoder: str | None = None  # encoder of a store built here (None: ralm's default)
    n_docs: int = 16
    doc_chars: int = 4000
    context: int = 512
    stride: int = 16
    query_len: int = 32
    passages: int = 1
    doc_tokens: int = 256
    k: int = 1024
    lmbda: float = 0.25
    temperature: float = 1.0
    knn_docs: int = 460
    decontaminate: int = 32
    n_virtual: int = 16
    baseline_lrs: tuple[float, ...] = (3e-3, 3e-2, 3e-1)
    baseline_steps: int = 300
    baseline_batch: int = 2
    baseline_seq_len: int = 512
    baseline_docs: int | None = None  # the baseline's training text: the first N store articles (None: all)
    retrofit_steps: int = 300
    retrofit_batch: int = 2
    retrofit_seq_len: int = 512
    retro: dict[str, Any] = field(default_factory=dict)  # RetroConfig overrides (cca_layers: per model)
    limit: int = 100  # SQuAD test questions of the PEFT case
    bf16: bool | None = None  # the RETRO-fit's autocast (None: where the device has it)
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    perturb: float = 0.2
    max_minutes: float | None = None
    threads: int | None = None

    def settings(self) -> dict[str, Any]:
        keys = ("model", "n_docs", "doc_chars", "context", "stride", "query_len", "passages", "doc_tokens", "k",
                "lmbda", "temperature", "knn_docs", "decontaminate", "n_virtual", "baseline_lrs", "baseline_steps",
                "baseline_batch", "baseline_seq_len", "baseline_docs", "retrofit_steps", "retrofit_batch",
                "retrofit_seq_len", "retro", "limit", "bf16", "n_boot", "level", "seed", "perturb")
        return {k: list(v) if isinstance(v, tuple) else v for k in keys for v in [getattr(self, k)]}

    def digest(self) -> str:
        return short_hash(self.settings())

    def measured(self) -> Path:
        return Path(self.results) / f"grid-{self.digest()}" / "cases"

    def work(self) -> Path:
        return Path(self.cache) / f"grid-{self.digest()}"


def preset(cpu: bool) -> Grid:
    if not cpu:
        return Grid()
    return Grid(preset="cpu", n_docs=6, doc_chars=1200, context=256, stride=32, doc_tokens=128, knn_docs=60,
                baseline_lrs=(3e-2, 3e-1), baseline_steps=100, baseline_seq_len=256, baseline_docs=100,
                retrofit_steps=100, retrofit_seq_len=256, limit=30)


# ---- the prompt-tuning baseline, shared by the cases that train the same one -----------------------------
class SharedTuner:
    """ralm's prompt-tuning baseline (ralm.tuning.prompt_baseline) with each trained prompt kept under ``folder``
    by what trains it (base, training text, virtual tokens, learning rates, steps, batch, window, seed): the
    cases that train the same baseline load it instead of training it again."""

    def __init__(self, folder: Path, model: str) -> None:
        self.folder, self.model = folder, model

    def lm(self, model: Any, tokenizer: Any, docs: Any, out: Any, **kw: Any) -> Any:
        from ralm.methods.peft import WEIGHTS, PeftConfig, apply_peft
        from ralm.methods.task_model import device
        from ralm.tuning.prompt_baseline import LMPrompt, lm_prompt

        kw.pop("progress", None)
        key = short_hash([self.model, hashlib.sha1("\0".join(d.id + "\0" + d.text for d in docs).encode()).hexdigest(),
                       {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}])
        root = self.folder / f"lm-{key}"
        record = root / "choice.json"
        if record.exists():
            c = json.loads(record.read_text())
            model.to(device())
            handle = apply_peft(model, PeftConfig(method="prompt", n_virtual=kw["n_virtual"]), "gpt")
            handle.load(root / f"lr-{c['lr']:g}" / WEIGHTS)
            model.eval()
            log(f"prompt-tuning baseline {key}: trained before (lr {c['lr']:g}), loaded")
            return LMPrompt(handle, c["lr"], c["sweep"], c["trainable"], c["steps"])
        log(f"prompt-tuning baseline {key}: training {kw['steps']} steps x {len(kw['lrs'])} learning rates")
        pt = lm_prompt(model, tokenizer, docs, root, progress=False, **kw)
        record.write_text(json.dumps({"lr": pt.lr, "sweep": pt.sweep, "trainable": pt.trainable, "steps": pt.steps}))
        return pt

    def task(self, run: dict[str, Any], out: Any, **kw: Any) -> dict[str, Any]:
        from ralm.tuning.prompt_baseline import task_prompt

        kw.pop("progress", None)
        key = short_hash([run["task"], run["task_file"], run["model"], run["settings"], run["seed"],
                       {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}])
        root = self.folder / f"task-{key}"
        record = root / "choice.json"
        if record.exists() and not Path(json.loads(record.read_text())["run"]).exists():
            record.unlink()
        return cached(record, lambda: task_prompt(run, root, progress=False, **kw))

    @staticmethod
    def retroprompt(run: str, **kw: Any) -> Any:
        """A RetroPrompt run's subject (its baseline trains in the case's folder: one case reads it)."""
        from ralm.tuning.prompt_baseline import PromptTuner

        return PromptTuner.retroprompt(run, **kw)


# ---- the cases -------------------------------------------------------------------------------------------
def run_case(cfg: Any, tuner: Any, units: dict[str, Any]) -> dict[str, Any]:
    """One ``ralm diagnose`` run (the tests replace it to show a rerun reads the cache)."""
    from ralm.eval.diagnose import run_diagnose

    return run_diagnose(cfg, tuner, progress=False, log=log, units=units)


def _baseline(g: Grid) -> dict[str, Any]:
    return {"n_virtual": g.n_virtual, "baseline_lrs": g.baseline_lrs, "baseline_steps": g.baseline_steps,
            "n_boot": g.n_boot, "level": g.level, "seed": g.seed, "perturb": g.perturb}


def lm_case(g: Grid, method: str, setting: str, docs: dict[str, Path], out: Path) -> tuple[Any, dict[str, Any]]:
    """The ``DiagnoseConfig`` of an eval-lm case and the artefacts it reads."""
    from ralm.eval.diagnose import DiagnoseConfig
    from ralm.eval.lm import LMEvalConfig
    from ralm.methods.in_context import InContextConfig
    from ralm.methods.knnlm import KNNLMConfig
    from ralm.methods.retro.method import RetroRunConfig

    art: dict[str, Any] = {}
    if method == "knn-lm":
        art["store"] = knn_store(g, docs)
        options: dict[str, Any] = {"knn": KNNLMConfig(k=g.k, lmbda=g.lmbda, temperature=g.temperature)}
    else:
        art["store"] = retrieval_store(g)
        options = {"in_context": InContextConfig(stride=g.stride, query_len=g.query_len, docs=g.passages,
                                                 doc_tokens=g.doc_tokens)}
    if method == "retro":
        art["checkpoint"] = retro_checkpoint(g, docs, art["store"]["path"])
        options = {"retro": RetroRunConfig(checkpoint=art["checkpoint"]["path"])}
    clean = setting == "clean"
    cfg = DiagnoseConfig(out=str(out), method=method, data=[str(docs[setting])], model=g.model,
                         datastore=art["store"]["path"], lm=LMEvalConfig(context=g.context), options=options,
                         exclude_same_doc=clean, decontaminate=g.decontaminate if clean else None,
                         train=[str(docs["baseline"])], baseline_batch_size=g.baseline_batch,
                         baseline_seq_len=g.baseline_seq_len, **_baseline(g))
    return cfg, art


def measure(g: Grid, name: str, docs: dict[str, Path], tuner: SharedTuner) -> dict[str, Any]:
    """One case, measured: its per-unit values, trained parameters and what ``run_diagnose`` said."""
    from ralm.errors import RalmError
    from ralm.eval.diagnose import DiagnoseConfig

    out = g.work() / name
    method, setting = CASES[name]
    units: dict[str, Any] = {}
    try:  # a refusal (an artefact that does not fit, a run diagnose cannot read) is the row's reason
        if method == "retroprompt":
            art = {"run": retroprompt_run(g)}  # its baseline trains the run's own steps (baseline_steps None)
            cfg = DiagnoseConfig(out=str(out), run=art["run"]["path"], split="test",
                                 **{**_baseline(g), "baseline_steps": None})
        elif method == "peft":
            art = {"run": peft_run(g)}
            cfg = DiagnoseConfig(out=str(out), run=art["run"]["path"], split="test", limit=g.limit, **_baseline(g))
        else:
            cfg, art = lm_case(g, method, setting, docs, out)
        t0 = time.perf_counter()  # the case itself (its artefacts above may have been built first)
        res = run_case(cfg, tuner, units)
    except RalmError as e:
        raise NotRun(f"ralm diagnose: {e}") from None
    wall = time.perf_counter() - t0
    log(f"{name}: {res['verdict']} ({wall:.0f} s)")
    params = {c: r["trained_parameters"] for c, r in res["conditions"].items() if r.get("trained_parameters") is not None}
    return {"name": name, "method": method, "setting": setting, "status": "measured", "metric": res["metric"],
            "kind": "ppl" if res["metric"] == "ppl" else "mean", "stats": {"n_boot": g.n_boot, "seed": g.seed,
                                                                           "level": g.level},
            "units": {c: {"values": u.values.tolist(), "weights": None if u.weights is None else u.weights.tolist()}
                      for c, u in units.items()},
            "params": params, "subject": res["subject"], "baseline": res.get("baseline"),
            "context_variance": res["context_variance"], "verdict_at_run": res["verdict"], "artefacts": art,
            "wall_s": round(wall, 1)}


def run_grid(g: Grid) -> dict[str, Any]:
    """Every case of the grid (cached), then the results; writes results.{json,md,png}."""
    if g.threads:
        import torch

        torch.set_num_threads(g.threads)
    t_start = time.perf_counter()
    docs = prepare(g)
    tuner = SharedTuner(Path(g.cache) / "baselines", g.model)
    cases = []
    for name in g.cases:
        path = g.measured() / f"{name}.json"
        if not path.exists() and g.max_minutes is not None and time.perf_counter() - t_start > 60 * g.max_minutes:
            cases.append(not_run(name, f"--max-minutes {g.max_minutes:g} reached"))
            continue
        try:
            cases.append(cached(path, lambda n=name: measure(g, n, docs, tuner)))
        except NotRun as e:
            log(f"{name}: not run: {e}")
            cases.append(not_run(name, str(e)))
    res = {"benchmark": "diagnose", "preset": g.preset, "settings": g.settings(), "grid": g.digest(),
           "data": {k: str(v) for k, v in docs.items()}, **results(cases),
           "wall_s": round(time.perf_counter() - t_start, 1)}
    from diagnose_results import chart, markdown

    write_outputs(res, Path(g.results), markdown, chart)
    return res


def not_run(name: str, why: str) -> dict[str, Any]:
    return {"name": name, "method": CASES[name][0], "setting": CASES[name][1], "status": f"not run: {why}"}


def grid_from(args: argparse.Namespace) -> Grid:
    g = preset(args.cpu)
    over = {"n_docs": args.n_docs, "baseline_steps": args.baseline_steps, "limit": args.limit, "n_boot": args.n_boot,
            "knn": args.knn, "retro_ckpt": args.checkpoint, "peft_run": args.peft_run,
            "retroprompt_run": args.retroprompt_run}
    if args.cases:
        if bad := [c for c in args.cases.split(",") if c not in CASES]:
            raise SystemExit(f"--cases {bad[0]!r}: choose from {', '.join(CASES)}")
        g = replace(g, cases=tuple(args.cases.split(",")))
    return replace(g, max_minutes=args.max_minutes, threads=args.threads, cache=args.cache_dir,
                   results=args.results_dir, build=() if args.no_build else g.build,
                   **{k: v for k, v in over.items() if v is not None})


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the 2-core CPU budget (see above)")
    ap.add_argument("--cases", help=f"comma-separated cases (default all, in order: {', '.join(CASES)})")
    ap.add_argument("--n-docs", type=int, help="evaluated articles per setting (cpu 6, default 16)")
    ap.add_argument("--baseline-steps", type=int, help="prompt-tuning baseline steps (cpu 100, default 300)")
    ap.add_argument("--limit", type=int, help="SQuAD test questions of the PEFT case (cpu 30, default 100)")
    ap.add_argument("--n-boot", type=int, help="bootstrap resamples (1000)")
    ap.add_argument("--knn", help="a kNN-LM store to use")
    ap.add_argument("--checkpoint", help="a RETRO-fit checkpoint to use (of the retrieval store)")
    ap.add_argument("--peft-run", help="a `ralm tune` run to diagnose")
    ap.add_argument("--retroprompt-run", help="a RetroPrompt run folder")
    ap.add_argument("--no-build", action="store_true", help="build no missing artefact: its cases are 'not run'")
    ap.add_argument("--max-minutes", type=float, help="start no new case after this long")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--cache-dir", default=str(CACHE), help="stores, RETRO-fits, baselines and case folders built here")
    ap.add_argument("--results-dir", default=str(RESULTS), help="measured cases and results.{json,md,png}")
    return ap


def main(argv: list[str] | None = None) -> int:
    g = grid_from(parser().parse_args(argv))
    with contextlib.redirect_stdout(sys.stderr):  # in-process runs print their progress
        res = run_grid(g)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
