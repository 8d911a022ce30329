"""``ralm eval-task``: score a split of a task with a tuned PEFT run (``--run RUN``: base + PEFT weights and the
run's input settings rebuilt from its folder) or without training (``--zero-shot --arch ... --model ...``).

Scoring is ``methods/task_model.score``, the function training evaluates with, so ``--run RUN --split
validation --limit EVAL_EXAMPLES`` reproduces the run's final validation numbers. QA: SQuAD EM / F1 of greedy
answers; summaries: ROUGE-1/2/L of greedy summaries; multiple choice: accuracy by per-choice
log-likelihood under every normalisation, ``acc`` = per-byte (the primary one). Deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ralm.core.retriever import Retriever
from ralm.data.tasks import SPLITS, get_task, load_splits, task_names
from ralm.errors import IncompatibleError, RalmError
from ralm.lm.presets import DEFAULT_LM
from ralm.methods.peft import WEIGHTS, apply_peft, read_peft_header
from ralm.methods.peft.config import ARCHS
from ralm.methods.task_inputs import TaskRetrieval
from ralm.methods.task_model import PlainHandle, TaskSettings, build_base, check_room, device, encoder_for, score

RUN = "run.json"  # tuning/tune.py writes it (eval never imports tuning)


@dataclass
class EvalTaskConfig:
    run: str | None = field(default=None, metadata={"help": "a `ralm tune` run folder to score (its arch, task, "
                                                            "model, store and input settings are used)"})
    zero_shot: bool = field(default=False, metadata={"help": "score the base model (or RETRO-fit) untrained"})
    arch: str = field(default="gpt", metadata={"help": "--zero-shot: gpt or retro"})
    task: str | None = field(default=None, metadata={"help": "--zero-shot: " + ", ".join(task_names())})
    task_file: str | None = field(default=None, metadata={"help": "the task's data file (default: the run's, or "
                                                                  "the one `ralm data get` fetched)"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "--zero-shot: the base LM"})
    checkpoint: str | None = field(default=None, metadata={"help": "--zero-shot --arch retro: RETRO-fit folder"})
    datastore: str | None = field(default=None, metadata={"help": "--zero-shot: the retrieval store"})
    split: str = field(default="test", metadata={"help": "split scored: " + ", ".join(SPLITS)})
    limit: int | None = field(default=None, metadata={"help": "score only the first N examples of the split"})
    docs: int = field(default=5, metadata={"help": "--zero-shot: retrieved chunks per example"})
    doc_tokens: int = field(default=128, metadata={"help": "--zero-shot --arch gpt: tokens kept per chunk"})
    max_len: int = field(default=512, metadata={"help": "--zero-shot: tokens per example"})
    max_target: int = field(default=128, metadata={"help": "--zero-shot: target tokens (summaries generated)"})
    max_new_tokens: int = field(default=32, metadata={"help": "--zero-shot: tokens generated per QA answer"})
    batch_size: int = field(default=8, metadata={"help": "examples per scoring batch"})
    seed: int = field(default=0, metadata={"help": "--zero-shot: the task split's seed"})

    def __post_init__(self) -> None:
        if (self.run is None) == (not self.zero_shot):
            raise RalmError("eval-task: give --run RUN or --zero-shot (one of them)")
        if self.split not in SPLITS:
            raise RalmError(f"--split {self.split!r}: choose from {', '.join(SPLITS)}")
        if self.limit is not None and self.limit < 1:
            raise RalmError(f"--limit {self.limit}: must be >= 1")
        if self.zero_shot:
            if self.arch not in ARCHS:
                raise RalmError(f"--arch {self.arch!r}: unknown (choose from {', '.join(ARCHS)})")
            if self.task is None:
                raise RalmError("--zero-shot needs --task")
            get_task(self.task)
            if self.arch == "retro" and not self.checkpoint:
                raise RalmError("--arch retro needs --checkpoint (a `ralm retrofit` folder)")
            if self.arch == "retro" and self.docs < 1:
                raise RalmError(f"--docs {self.docs}: --arch retro reads the retrieved chunks as neighbours, give >= 1")


def read_run(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    f = root / RUN
    if not f.is_file() or not (root / WEIGHTS).is_file():
        raise RalmError(f"--run {root}: not a `ralm tune` run (needs {RUN} and {WEIGHTS})")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RalmError(f"{f}: corrupt run file ({e})") from None
    if meta.get("format") != "ralm-tune":
        raise RalmError(f"{f}: not a ralm tune run file")
    return meta


def run_eval_task(cfg: EvalTaskConfig, wrap_retriever: Callable[[Retriever], Retriever] | None = None,
                  per_example: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Score the split; returns the metrics and what was scored. ``wrap_retriever``: wraps the retriever the
    examples' chunks are found through (a store ablation, ralm.core.ablations), as in ``run_eval_lm``;
    ``per_example``: filled with each metric's per-example values (``task_model.score``)."""
    if cfg.run is not None:
        meta = read_run(cfg.run)
        arch, task, model, ckpt, ds_path = (meta["arch"], meta["task"], meta["model"], meta["checkpoint"],
                                            meta["datastore"])
        task_file, seed, s = cfg.task_file or meta["task_file"], meta["seed"], TaskSettings(**meta["settings"])
    else:
        arch, task, model, ckpt, ds_path, task_file, seed = (cfg.arch, cfg.task, cfg.model, cfg.checkpoint,
                                                             cfg.datastore, cfg.task_file, cfg.seed)
        s = TaskSettings(cfg.docs, cfg.doc_tokens, cfg.max_len, cfg.max_target, cfg.max_new_tokens, cfg.batch_size)
    examples = load_splits(task, task_file, seed=seed)[cfg.split][: cfg.limit]
    net, tok, ds, fps = build_base(arch, model, ckpt, ds_path)
    if cfg.run is not None:
        if meta.get("model_fingerprint") not in fps:
            raise IncompatibleError(f"--run {cfg.run}: tuned on other weights of base model {model!r} than it "
                                    "has now; its PEFT weights do not fit them")
        peft_cfg, peft_arch = read_peft_header(Path(cfg.run) / WEIGHTS)
        handle: Any = apply_peft(net, peft_cfg, peft_arch)
        net.to(device())
        handle.load(Path(cfg.run) / WEIGHTS)
        method: str = peft_cfg.method
    else:
        handle, method = PlainHandle(net), "zero-shot"
    check_room(net, handle.n_virtual, s)
    retrieval = TaskRetrieval(ds, s.docs, wrap_retriever)
    result = score(handle, encoder_for(net, tok, arch, retrieval.store, s), retrieval, examples, s, per_example)
    return {"task": task, "split": cfg.split, "arch": arch, "method": method, "model": model, **result}


def summary_line(r: dict[str, Any]) -> str:
    keys = [k for k in ("em", "f1", "rouge1", "rouge2", "rougeL", "acc", "acc_per_token", "acc_sum", "loss") if k in r]
    return (f"{r['task']} {r['split']} ({r['examples']} examples) {r['arch']} {r['method']}: "
            + ", ".join(f"{k} {r[k]:.2f}" if k != "loss" else f"loss {r[k]:.4f}" for k in keys))


__all__ = ["EvalTaskConfig", "read_run", "run_eval_task", "summary_line"]
