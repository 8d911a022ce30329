"""``ralm diagnose`` (issue 15): does a method use what it retrieves, or does it act as a soft prompt?

Over an eval-lm method (``--method``, with its artefact: ``--checkpoint`` for retro, a kNN-LM store for knn-lm),
a PEFT task run (``--run RUN`` from ``ralm tune``) or a text RetroPrompt run (``--run RP`` from ``ralm retroprompt
train``: its knowledge store's searches ablated, ralm.tuning.retroprompt_diagnose), on the same documents or
examples:

1. **Store ablations** at equal context length (ralm.core.ablations): the real run is recorded
   (``RecordingRetriever``), then each ablation runs with a fresh ``ablation_wrap``: none, shuffled, random,
   random-text, fixed. Also the frozen base alone (``base``: the plain LM; for a task run the base model
   zero-shot, no chunks), the reference of every gain. The method's own metric per condition (ppl over
   documents; EM/F1, ROUGE or accuracy over examples) with percentile-bootstrap intervals (ralm.eval.bootstrap).
2. **Context variance** of the real run's log (ralm.eval.context_variance), and query sensitivity from a second
   real run with perturbed queries: a text query loses a seeded ``--perturb`` share (20%) of its words (at
   least one word kept), a vector query (kNN-LM states) the same share of its coordinates (set to 0).
3. **Prompt-tuning baseline** (``--no-baseline`` skips it): ``--n-virtual`` virtual tokens on the same frozen
   base, trained through the shared loop for the method's own steps (``--baseline-steps``) with a learning-rate
   sweep chosen on validation (ralm.tuning.prompt_baseline: LM loss on ``--train`` text for eval-lm methods,
   ``ralm tune --peft prompt`` with the run's settings for task runs). Gain per trained parameter for the method
   (its trained parameters: the RETRO-fit's new layers, the run's PEFT weights; 0 for untrained methods) and the
   baseline: gain = how much better than ``base`` the condition's metric is.
4. **Verdict** (ralm.eval.verdict, its rule printed) and ``diagnose.json``, ``diagnose.md`` and ``diagnose.png``
   (ralm.eval.diagnose_report) in ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import ralm.methods  # noqa: F401  registers the built-in methods
from ralm.core.ablations import ABLATIONS, RecordingRetriever, RetrievalLog, ablation_wrap
from ralm.core.registry import check_options, get_method, method_names
from ralm.core.retriever import Exclusions, Retriever, RetrieverWrapper
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.eval.bootstrap import bootstrap, document_units
from ralm.eval.context_variance import context_embeddings, context_variance
from ralm.eval.diagnose_report import write_outputs
from ralm.eval.lm import LMEvalConfig, evaluate_lm
from ralm.eval.runner import EvalLMConfig, _documents, run_eval_lm
from ralm.eval.task import EvalTaskConfig, read_run, run_eval_task
from ralm.eval.verdict import REQUIRED, better_sign, verdict_from_units
from ralm.lm.models import load
from ralm.lm.presets import DEFAULT_LM
from ralm.methods.retro.checkpoint import read_checkpoint_config

ABLATION_NAMES = ABLATIONS[1:]  # every condition but the real store
RETROPROMPT_FORMAT = "ralm-retroprompt"  # a `ralm retroprompt train` run's run.json (tuning writes it)
PRIMARY = {"qa": "f1", "summary": "rougeL", "choice": "acc"}  # a task run's metric by its per-example keys
NEEDED = ("none", *REQUIRED)  # what the verdict reads


@dataclass
class DiagnoseConfig:
    out: str = field(metadata={"help": "folder for diagnose.json, diagnose.md and diagnose.png", "short": "-o"})
    method: str | None = field(default=None, metadata={"help": "eval-lm method to diagnose (`ralm methods`; not "
                                                                "with --run)"})
    run: str | None = field(default=None, metadata={"help": "a `ralm tune` or `ralm retroprompt train` run folder "
                                                            "to diagnose (not with --method)"})
    data: list[str] = field(default_factory=list, metadata={"help": "--method: held-out documents; repeatable"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "--method: the frozen base LM"})
    datastore: str | None = field(default=None, metadata={"help": "--method: the method's store (retro: default "
                                                                  "its checkpoint's; knn-lm: a kNN-LM store)"})
    lm: LMEvalConfig = field(default_factory=LMEvalConfig)
    options: dict[str, Any] = field(default_factory=dict)  # every registered method's options, as eval-lm's
    exclude_same_doc: bool = field(default=True, metadata={"help": "--method: drop neighbours from the evaluated "
                                                                   "document"})
    decontaminate: int | None = field(default=None, metadata={"help": "--method: drop neighbours sharing an N-token "
                                                                      "span with the evaluated document"})
    split: str = field(default="test", metadata={"help": "--run: the split scored"})
    limit: int | None = field(default=None, metadata={"help": "--run: score only the first N examples"})
    task_file: str | None = field(default=None, metadata={"help": "--run: the task's data file (default: the "
                                                                  "run's)"})
    metric: str | None = field(default=None, metadata={"help": "--run: the per-example metric (default: f1, "
                                                               "rougeL or acc by task)"})
    ablations: tuple[str, ...] = field(default=ABLATION_NAMES, metadata={"help": "comma-separated ablations: "
                                                                                 + ", ".join(ABLATION_NAMES)})
    perturb: float = field(default=0.2, metadata={"help": "share of each query's words (vector: coordinates) "
                                                          "dropped for query sensitivity"})
    baseline: bool = field(default=True, metadata={"help": "train the prompt-tuning baseline"})
    n_virtual: int = field(default=16, metadata={"help": "virtual tokens of the prompt-tuning baseline"})
    baseline_lrs: tuple[float, ...] = field(default=(3e-3, 3e-2, 3e-1), metadata={
        "help": "comma-separated learning rates swept for the baseline (the best on validation is kept)"})
    baseline_steps: int | None = field(default=None, metadata={"help": "baseline steps (default: the method's own "
                                                                       "training steps, else 100)"})
    train: list[str] = field(default_factory=list, metadata={"help": "--method: the baseline's training text "
                                                                     "(default: a RETRO-fit's --train files)"})
    baseline_batch_size: int = field(default=4, metadata={"help": "--method: baseline windows per step"})
    baseline_seq_len: int = field(default=128, metadata={"help": "--method: tokens per baseline window"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples"})
    level: float = field(default=0.95, metadata={"help": "confidence level of the intervals"})
    seed: int = field(default=0, metadata={"help": "seed of the ablations, perturbation, bootstrap and baseline"})
    eval_cfg: EvalLMConfig | None = field(default=None, init=False, repr=False)
    run_meta: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.method is None) == (self.run is None):
            raise RalmError("diagnose: give --method METHOD or --run RUN (one of them)")
        bad = [a for a in self.ablations if a not in ABLATION_NAMES]
        if bad:
            raise RalmError(f"--ablations {bad[0]!r}: unknown ablation (choose from {', '.join(ABLATION_NAMES)})")
        if missing := [a for a in NEEDED if a not in self.ablations]:
            raise RalmError(f"--ablations: the verdict needs {', '.join(NEEDED)} (missing {', '.join(missing)})")
        if not 0 < self.perturb < 1:
            raise RalmError(f"--perturb {self.perturb}: must be in (0, 1)")
        if self.n_virtual < 1:
            raise RalmError(f"--n-virtual {self.n_virtual}: must be >= 1")
        if not self.baseline_lrs or not all(lr > 0 and math.isfinite(lr) for lr in self.baseline_lrs):
            raise RalmError(f"--baseline-lrs {self.baseline_lrs}: give finite learning rates > 0")
        for name in ("baseline_steps", "baseline_batch_size", "baseline_seq_len", "n_boot", "limit"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise RalmError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        if not 0 < self.level < 1:
            raise RalmError(f"--level {self.level}: must be in (0, 1)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise RalmError(f"--out {self.out}: exists and is not a directory")
        if self.run is not None:
            if _run_format(self.run) == RETROPROMPT_FORMAT:  # opened by the tuner's side (ralm.tuning)
                if self.split not in ("dev", "test"):
                    raise RalmError(f"--split {self.split!r}: a RetroPrompt run scores dev or test")
                self.run_meta = {"format": RETROPROMPT_FORMAT}
                return
            self.run_meta = read_run(self.run)
            EvalTaskConfig(run=self.run, split=self.split, limit=self.limit)  # its checks, before any loading
            return
        get_method(self.method)
        if get_method(self.method).store == "none":
            raise RalmError(f"--method {self.method}: reads no store, so there is nothing to diagnose (choose from "
                            f"{', '.join(method_names(store='any'))})")
        self.options = check_options(self.options, [self.method])
        self.eval_cfg = EvalLMConfig(model=self.model, data=self.data, method=self.method, datastore=self.datastore,
                                     lm=self.lm, options=self.options, exclude_same_doc=self.exclude_same_doc,
                                     decontaminate=self.decontaminate)
        if self.baseline and not self._train_files():
            raise RalmError(f"--train: the prompt-tuning baseline of {self.method} needs training text (or "
                            "--no-baseline)")

    def _checkpoint(self) -> dict[str, Any] | None:
        ckpt = getattr(get_method(self.method).options_of(self.eval_cfg), "checkpoint", None)
        return read_checkpoint_config(ckpt) if ckpt else None

    def _train_files(self) -> list[str]:
        ckpt = self._checkpoint()
        return list(self.train) or list((ckpt or {}).get("train") or [])


def _run_format(run: str) -> Any:
    """The ``format`` of ``run``'s run.json, or None where there is no readable one (read_run then says why)."""
    try:
        return json.loads((Path(run) / "run.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None


# ---- query perturbation -----------------------------------------------------------------------------------
def perturb_query(q: Any, share: float, seed: int) -> Any:
    """``q`` without a seeded ``share`` of its words (text; at least one word is kept) or with that share of its
    coordinates set to 0 (a vector); seeded by the query itself, so the same query is perturbed the same way."""
    if isinstance(q, str):
        words = q.split()
        rng = np.random.default_rng([seed, zlib.crc32(q.encode())])
        drop = min(len(words) - 1, round(share * len(words)))
        gone = set(rng.choice(len(words), size=drop, replace=False).tolist()) if drop > 0 else set()
        return " ".join(w for i, w in enumerate(words) if i not in gone)
    v = np.array(q, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(v.tobytes())])
    v[rng.choice(len(v), size=round(share * len(v)), replace=False)] = 0.0
    return v


class PerturbedQueries(RetrieverWrapper):
    """The real search of perturbed queries (``perturb_query``)."""

    def __init__(self, inner: Retriever, share: float, seed: int = 0) -> None:
        super().__init__(inner)
        self.share, self.seed = share, seed

    def search(self, queries: Any, k: int, exclude_doc_ids: Exclusions = None) -> tuple[np.ndarray, np.ndarray]:
        qs = [perturb_query(q, self.share, self.seed) for q in queries]
        return self.inner.search(np.stack(qs) if isinstance(queries, np.ndarray) else qs, k, exclude_doc_ids)


# ---- what is measured -----------------------------------------------------------------------------------
@dataclass
class Units:
    """One condition's per-unit values (document NLL sums, or example scores) and weights (tokens, or None)."""

    values: np.ndarray
    weights: np.ndarray | None = None


Measure = Callable[[Callable[[Retriever], Retriever] | None], Units]


def measure_conditions(measure: Measure, ablations: tuple[str, ...] = ABLATION_NAMES, seed: int = 0,
                       perturb: float | None = 0.2) -> tuple[dict[str, Units], RetrievalLog, RetrievalLog | None]:
    """Every condition's units from ``measure(wrap_retriever)``: the recorded real run, each ablation with a fresh
    wrap, and (``perturb``) a real run of perturbed queries; returns the units, the real and the perturbed log.

    A method that searches over several channels (a retriever's ``channel`` attribute: RetroPrompt's p_kNN over
    all rows and one demonstration search per class) gets one log and one ablation per channel, so a shuffle
    moves lists among inputs of the same search and the fixed row is one the channel can return; the logs
    returned are the main channel's (``channel`` None, every retriever of the other methods)."""
    logs: dict[Any, RetrievalLog] = {}

    def record(into: dict[Any, RetrievalLog]) -> Callable[[Retriever], Retriever]:
        return lambda r: RecordingRetriever(r, into.setdefault(getattr(r, "channel", None), RetrievalLog()))

    def ablated(name: str) -> Callable[[Retriever], Retriever]:
        wraps: dict[Any, Callable[[Retriever], Retriever] | None] = {}  # one per channel (its own Shuffle)

        def wrap(r: Retriever) -> Retriever:
            c = getattr(r, "channel", None)
            if c not in wraps:
                wraps[c] = ablation_wrap(name, logs.get(c), seed)
            return r if wraps[c] is None else wraps[c](r)
        return wrap

    units = {"real": measure(record(logs))}
    if not sum(len(g) for g in logs.values()):
        raise RalmError("diagnose: the real run retrieved nothing (no searches were made)")
    for name in ablations:
        units[name] = measure(ablated(name))
        if len(units[name].values) != len(units["real"].values):
            raise RalmError(f"diagnose: ablation {name} scored {len(units[name].values)} units, the real run "
                            f"{len(units['real'].values)}")
    perturbed = None
    if perturb is not None:
        plogs: dict[Any, RetrievalLog] = {}
        rec = record(plogs)
        measure(lambda r: rec(PerturbedQueries(r, perturb, seed)))
        perturbed = plogs.get(None, RetrievalLog())
    return units, logs.get(None, RetrievalLog()), perturbed


def summarise(metric: str, kind: str, units: dict[str, Units], params: dict[str, int | None], n_boot: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Per condition its metric with a bootstrap interval, and (where ``base`` is measured) its gain over the
    frozen base (positive: better) and the gain per trained parameter (``params``: condition -> count)."""
    sign = better_sign(metric)
    rows = {name: {**bootstrap(u.values, u.weights, kind, n_boot, seed, level).to_json(), "units": len(u.values)}
            for name, u in units.items()}
    if "base" in rows:
        for name, row in rows.items():
            gain = sign * (row["estimate"] - rows["base"]["estimate"])
            row["gain"] = gain
            if kind == "ppl":  # the article's currency: nats per token
                row["loss_gain"] = math.log(rows["base"]["estimate"]) - math.log(row["estimate"])
            n = params.get(name)
            row["trained_parameters"] = n
            row["gain_per_parameter"] = gain / n if n else None
    return rows


def diagnose_units(metric: str, kind: str, units: dict[str, Units], params: dict[str, int | None],
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The conditions' summary and the verdict (``verdict_from_units`` over the paired units)."""
    weights = units["real"].weights
    vd = verdict_from_units(metric, {k: u.values for k, u in units.items()}, weights, kind,
                            n_boot, seed, level)
    return {"metric": metric, "conditions": summarise(metric, kind, units, params, n_boot, seed, level),
            "verdict": vd.verdict, "rule": vd.rule, "checks": list(vd.lines)}


# ---- the two subjects -------------------------------------------------------------------------------------
def _lm_units(per_target: dict[str, Any]) -> Units:
    _, nll, tokens = document_units(per_target)
    return Units(nll, tokens)


def _store_stats(path: str | None, log: RetrievalLog) -> tuple[int | None, np.ndarray | None]:
    """The store's rows and each input's context embedding (a retrieval store's mean key; None otherwise)."""
    try:
        ds = Datastore.open(path)
    except RalmError:  # a kNN-LM store: its keys are LM states, no separate context embedding
        return None, None
    try:
        return len(ds), context_embeddings(log.ids(), ds._keys().get)  # noqa: SLF001 (the store's key reader)
    except RalmError:  # an input that retrieved nothing has no context direction
        return len(ds), None


def _diagnose_lm(cfg: DiagnoseConfig, tuner: Any, progress: bool, log: Callable[[str], None],
                 units: dict[str, Units]) -> dict[str, Any]:
    ecfg = cfg.eval_cfg
    loaded = load(ecfg.model)

    def measure(wrap: Callable[[Retriever], Retriever] | None) -> Units:
        per_target: dict[str, Any] = {}
        run_eval_lm(ecfg, progress=progress, loaded=loaded, wrap_retriever=wrap, per_target=per_target)
        return _lm_units(per_target)

    measured, real_log, perturbed = measure_conditions(measure, cfg.ablations, cfg.seed, cfg.perturb)
    units.update(measured)
    log(f"{ecfg.method}: real and {len(cfg.ablations)} ablations measured over {len(units['real'].values)} documents")
    plain = dataclasses.replace(ecfg, method=method_names(store="none")[0], datastore=None, options={})
    per_target: dict[str, Any] = {}
    run_eval_lm(plain, progress=progress, loaded=loaded, per_target=per_target)
    units["base"] = _lm_units(per_target)
    ckpt = cfg._checkpoint()
    params: dict[str, int | None] = {"real": int(ckpt["parameters"]["new"]) if ckpt else 0}
    out: dict[str, Any] = {"subject": {"method": ecfg.method, "model": ecfg.model, "data": ecfg.data,
                                       "datastore": ecfg.datastore}}
    if cfg.baseline:
        steps = cfg.baseline_steps or (int(ckpt.get("step", 0)) if ckpt else 0) or 100
        docs = _documents(cfg._train_files(), None, "--train")
        pt = tuner.lm(loaded.model, loaded.tokenizer, docs, Path(cfg.out) / "baseline", n_virtual=cfg.n_virtual,
                      lrs=cfg.baseline_lrs, steps=steps, batch_size=cfg.baseline_batch_size,
                      seq_len=cfg.baseline_seq_len, seed=cfg.seed, progress=progress)
        try:
            per_target = {}
            evaluate_lm(loaded.model, loaded.tokenizer, _documents(ecfg.data, ecfg.lm.max_docs), ecfg.lm,
                        scorer=pt.scorer(ecfg.lm.window_stride), method="prompt-tuning", progress=progress,
                        per_target=per_target)
        finally:
            pt.close()
        units["prompt-tuning"] = _lm_units(per_target)
        params["prompt-tuning"] = pt.trainable
        out["baseline"] = {"n_virtual": cfg.n_virtual, "lr": pt.lr, "sweep": pt.sweep, "steps": pt.steps,
                           "trainable": pt.trainable, "train": cfg._train_files(),
                           "validation": "every 10th --train document (LM loss)"}
    rows, embeddings = _store_stats(ecfg.datastore, real_log)
    out.update(diagnose_units("ppl", "ppl", units, params, cfg.n_boot, cfg.seed, cfg.level))
    out["context_variance"] = context_variance(real_log.ids(), embeddings, perturbed.ids(), rows, seed=cfg.seed)
    return out


def _diagnose_task(cfg: DiagnoseConfig, tuner: Any, progress: bool, log: Callable[[str], None],
                   units: dict[str, Units]) -> dict[str, Any]:
    meta = cfg.run_meta
    ecfg = EvalTaskConfig(run=cfg.run, split=cfg.split, limit=cfg.limit, task_file=cfg.task_file)
    chosen: list[str] = []

    def pick(per_example: dict[str, list[float]], kind_metric: str | None) -> Units:
        if kind_metric is None:
            raise RalmError("diagnose: the task run scored no per-example metric")
        if kind_metric not in per_example:
            raise RalmError(f"--metric {kind_metric!r}: the task scores {', '.join(per_example)}")
        return Units(np.asarray(per_example[kind_metric], dtype=np.float64))

    def metric_of(per_example: dict[str, list[float]]) -> str | None:
        if cfg.metric:
            return cfg.metric
        return next((m for m in PRIMARY.values() if m in per_example), None)

    def measure(wrap: Callable[[Retriever], Retriever] | None) -> Units:
        per_example: dict[str, list[float]] = {}
        run_eval_task(ecfg, wrap_retriever=wrap, per_example=per_example)
        if not chosen:
            chosen.append(metric_of(per_example) or "")
        return pick(per_example, chosen[0] or None)

    if not meta.get("datastore") or not meta["settings"].get("docs"):
        raise RalmError(f"--run {cfg.run}: retrieves nothing (no --datastore or --docs 0), nothing to diagnose")
    measured, real_log, perturbed = measure_conditions(measure, cfg.ablations, cfg.seed, cfg.perturb)
    units.update(measured)
    metric = chosen[0]
    log(f"{cfg.run}: real and {len(cfg.ablations)} ablations measured over {len(units['real'].values)} examples")
    s = meta["settings"]
    zero = EvalTaskConfig(zero_shot=True, arch="gpt", task=meta["task"], task_file=cfg.task_file or meta["task_file"],
                          model=meta["model"], split=cfg.split, limit=cfg.limit, docs=0, doc_tokens=s["doc_tokens"],
                          max_len=s["max_len"], max_target=s["max_target"], max_new_tokens=s["max_new_tokens"],
                          batch_size=s["batch_size"], seed=meta["seed"])
    per_example: dict[str, list[float]] = {}
    run_eval_task(zero, per_example=per_example)
    units["base"] = pick(per_example, metric)
    params: dict[str, int | None] = {"real": int(meta["parameters"]["trainable"])}
    out: dict[str, Any] = {"subject": {"run": cfg.run, "task": meta["task"], "arch": meta["arch"],
                                       "peft": meta["peft"]["method"], "model": meta["model"], "split": cfg.split}}
    if cfg.baseline:
        steps = cfg.baseline_steps or int(meta.get("step") or 0) or 100
        pt = tuner.task(meta, Path(cfg.out) / "baseline", n_virtual=cfg.n_virtual, lrs=cfg.baseline_lrs,
                        steps=steps, progress=progress)
        per_example = {}
        run_eval_task(dataclasses.replace(ecfg, run=pt["run"]), per_example=per_example)
        units["prompt-tuning"] = pick(per_example, metric)
        params["prompt-tuning"] = pt["trainable"]
        out["baseline"] = {"n_virtual": cfg.n_virtual, **pt, "validation": "final validation loss of each run"}
    rows, embeddings = _store_stats(meta["datastore"], real_log)
    out.update(diagnose_units(metric, "mean", units, params, cfg.n_boot, cfg.seed, cfg.level))
    out["context_variance"] = context_variance(real_log.ids(), embeddings, perturbed.ids(), rows, seed=cfg.seed)
    return out


def _diagnose_retroprompt(cfg: DiagnoseConfig, tuner: Any, progress: bool, log: Callable[[str], None],
                          units: dict[str, Units]) -> dict[str, Any]:
    """A RetroPrompt run: its knowledge store's every search wrapped (``tuner.retroprompt``'s subject)."""
    if tuner is None or not hasattr(tuner, "retroprompt"):
        raise RalmError(f"--run {cfg.run}: a RetroPrompt run is opened by ralm.tuning (pass PromptTuner())")
    subject = tuner.retroprompt(cfg.run, split=cfg.split, limit=cfg.limit)
    measured, real_log, perturbed = measure_conditions(lambda wrap: Units(subject.measure(wrap)), cfg.ablations,
                                                       cfg.seed, cfg.perturb)
    units.update(measured)
    log(f"{cfg.run}: real and {len(cfg.ablations)} ablations measured over {len(units['real'].values)} examples")
    units["base"] = Units(subject.base())
    params: dict[str, int | None] = {"real": subject.trained_parameters}
    out: dict[str, Any] = {"subject": subject.info}
    if cfg.baseline:
        values, pt = subject.baseline(Path(cfg.out) / "baseline", n_virtual=cfg.n_virtual, lrs=cfg.baseline_lrs,
                                      steps=cfg.baseline_steps, progress=progress)
        units["prompt-tuning"] = Units(values)
        params["prompt-tuning"] = pt["trainable"]
        out["baseline"] = {"n_virtual": cfg.n_virtual, **pt}
    store = subject.store
    try:
        embeddings = context_embeddings(real_log.ids(), lambda rows: store.keys[rows])
    except RalmError:
        embeddings = None
    out.update(diagnose_units(subject.metric, "mean", units, params, cfg.n_boot, cfg.seed, cfg.level))
    out["context_variance"] = context_variance(real_log.ids(), embeddings, perturbed.ids() if perturbed else None,
                                               len(store), seed=cfg.seed)
    return out


def run_diagnose(cfg: DiagnoseConfig, tuner: Any = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, units: dict[str, Units] | None = None) -> dict[str, Any]:
    """Diagnose ``cfg``'s method or run; write the outputs into ``cfg.out`` and return the result.

    ``tuner``: what trains the prompt-tuning baseline, an object with ``lm(...)`` and ``task(...)``
    (ralm.tuning.prompt_baseline's ``lm_prompt`` / ``task_prompt``, which ralm.eval cannot import; the CLI
    passes them); needed unless ``cfg.baseline`` is off; its ``retroprompt(run, split, limit)`` opens a
    RetroPrompt run (ralm.tuning.retroprompt_diagnose), needed for one. ``units``: filled with every
    condition's ``Units`` (what the summary and the verdict read: ``diagnose_units`` recomputes them)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if cfg.baseline and tuner is None:
        raise RalmError("diagnose: the prompt-tuning baseline needs a tuner (ralm.tuning.prompt_baseline), or "
                        "--no-baseline")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    body = _diagnose_lm if cfg.run is None else _diagnose_task
    if cfg.run is not None and (cfg.run_meta or {}).get("format") == RETROPROMPT_FORMAT:
        body = _diagnose_retroprompt
    result = body(cfg, tuner, progress, log, {} if units is None else units)
    result["baseline_run"] = cfg.baseline
    if not cfg.baseline:
        result["checks"].append("prompt-tuning baseline skipped (--no-baseline): real cannot be shown to beat it, "
                                "so the verdict is never retrieval-dependent")
    result["perturbation"] = (f"query sensitivity: each query loses a seeded {cfg.perturb:.0%} of its words "
                              "(vectors: of their coordinates, set to 0)")
    write_outputs(result, Path(cfg.out))
    return result


__all__ = ["DiagnoseConfig", "PerturbedQueries", "Units", "diagnose_units", "measure_conditions",
           "perturb_query", "run_diagnose", "summarise"]
