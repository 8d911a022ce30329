"""``ralm tune``: parameter-efficient fine-tuning of a plain LM (``--arch gpt``: retrieved chunks in the prompt)
or of a RETRO-fit model (``--arch retro``: the same chunks as CCA neighbours) on a task (issue 13).

The base (``methods/task_model.build_base``) is frozen, ``apply_peft`` injects the method, and the shared loop
trains exactly the PEFT parameters. A step's batch is a function of the step (a per-epoch seeded permutation
of the training examples), so a killed run resumes to the weights of an uninterrupted one. Evaluation: the
mean target loss on ``eval_examples`` validation examples and the task metric on them (``task_model.score``,
the function ``ralm eval-task`` scores with). The run folder holds ``run.json`` (what rebuilds the model and
its inputs, and the final validation score) and ``peft.safetensors`` (``PeftHandle.save``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ralm.data.tasks import get_task, load_splits, task_names
from ralm.errors import RalmError, refuse_below
from ralm.lm.presets import DEFAULT_LM
from ralm.methods.peft import WEIGHTS, PeftConfig, apply_peft
from ralm.methods.peft.config import ARCHS
from ralm.methods.task_forward import target_loss
from ralm.methods.task_inputs import TaskRetrieval, gold_target
from ralm.methods.task_model import TaskSettings, build_base, check_room, device, encoder_for, score
from ralm.tuning import loop
from ralm.tuning.loop import LOG, STATE, TrainConfig
from ralm.utils import outdir
from ralm.utils.atomic import write_json

LABEL, RUN = "tune", "run.json"
FORMAT, VERSION = "ralm-tune", 1


@dataclass(kw_only=True)
class TuneConfig(TrainConfig):
    """A PEFT run's settings; the loop's (steps, lr, warmup, ...) come from ``TrainConfig``."""

    task: str = field(metadata={"help": "task: " + ", ".join(task_names())})
    out: str = field(metadata={"help": "run folder (a rerun with the same settings resumes)"})
    arch: str = field(default="gpt", metadata={"help": "gpt: chunks in the prompt; retro: a RETRO-fit model "
                                                        "reading them through CCA (needs --checkpoint)"})
    peft: PeftConfig = field(default_factory=PeftConfig)
    task_file: str | None = field(default=None, metadata={"help": "the task's data file (default: the one "
                                                                  "`ralm data get` fetched)"})
    datastore: str | None = field(default=None, metadata={"help": "retrieval store (squad: its paragraphs; "
                                                                  "aclsum: the papers; optional for MC)"})
    checkpoint: str | None = field(default=None, metadata={"help": "--arch retro: the `ralm retrofit` folder"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "the frozen base LM: preset, folder or hub id"})
    docs: int = field(default=5, metadata={"help": "retrieved chunks per example (the paper: 5)"})
    doc_tokens: int = field(default=128, metadata={"help": "--arch gpt: tokens kept of each chunk in the prompt"})
    max_len: int = field(default=512, metadata={"help": "tokens per example (prompt + target; the prompt's "
                                                        "left is cut beyond it)"})
    max_target: int = field(default=128, metadata={"help": "target tokens kept (and generated, summaries)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per QA answer"})
    batch_size: int = field(default=8, metadata={"help": "examples per step (and per scoring batch)"})
    eval_examples: int = field(default=32, metadata={"help": "validation examples scored at each evaluation"})
    force: bool = field(default=False, metadata={"help": "discard an existing run in OUT and start over"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.arch not in ARCHS:
            raise RalmError(f"--arch {self.arch!r}: unknown (choose from {', '.join(ARCHS)})")
        get_task(self.task)
        if self.arch == "retro" and not self.checkpoint:
            raise RalmError("--arch retro needs --checkpoint (a `ralm retrofit` folder)")
        if self.arch == "retro" and self.docs < 1:
            raise RalmError(f"--docs {self.docs}: --arch retro reads the retrieved chunks as neighbours, give >= 1")
        if self.docs < 0:
            raise RalmError(f"--docs {self.docs}: must be >= 0")
        refuse_below(self, ("doc_tokens", "max_len", "max_target", "max_new_tokens", "batch_size", "eval_examples"))

    def settings(self) -> TaskSettings:
        return TaskSettings(self.docs, self.doc_tokens, self.max_len, self.max_target, self.max_new_tokens,
                            self.batch_size)

    def resume_key(self) -> dict[str, Any]:
        return {"format": VERSION, "arch": self.arch, "task": self.task, "model": self.model,
                "checkpoint": self.checkpoint, "datastore": self.datastore, "peft": asdict(self.peft),
                "settings": asdict(self.settings())}


KIND = outdir.Kind(LABEL, "ralm tune run", {re.escape(n): None for n in (RUN, WEIGHTS, STATE, LOG)},
                   lambda root: False)


def tune(cfg: TuneConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a PEFT run in ``cfg.out``; return the loop's summary, the counts and the final score."""
    return loop.in_run_folder(cfg.out, KIND, cfg.force, lambda: _train(cfg, progress))


def _train(cfg: TuneConfig, progress: bool) -> dict[str, Any]:
    out = Path(cfg.out)
    state = loop.resume_state(out, cfg, LABEL, cfg.resume_key())  # refused before minutes of loading
    splits = load_splits(cfg.task, cfg.task_file, seed=cfg.seed)
    train_ex, val_ex = splits["train"], splits["validation"][: cfg.eval_examples]
    if not train_ex or not val_ex:
        raise RalmError(f"task {cfg.task}: the train and validation splits must not be empty")
    model, tok, ds, fps = build_base(cfg.arch, cfg.model, cfg.checkpoint, cfg.datastore)
    torch.manual_seed(cfg.seed)  # the PEFT modules' initialisation
    handle = apply_peft(model, cfg.peft, cfg.arch)
    model.to(device())
    s = cfg.settings()
    check_room(model, handle.n_virtual, s)
    enc = encoder_for(model, tok, cfg.arch, ds, s)
    retrieval = TaskRetrieval(ds, cfg.docs)
    rows: dict[int, list[int]] = {}  # example -> its store rows, retrieved when a step first draws it: a short
    # run on SQuAD's 7,771 training questions would otherwise search for all of them before its first step
    order = list(range(len(train_ex)))

    def batch(step: int) -> dict[str, Any]:
        idx = loop.step_items(order, step, cfg.batch_size, cfg.seed)
        new = [i for i in dict.fromkeys(idx) if i not in rows]
        rows.update(zip(new, retrieval.rows([train_ex[i] for i in new]), strict=True))
        return enc.collate([enc.encode(train_ex[i], rows[i], gold_target(train_ex[i])) for i in idx])

    def evaluate(_: Any) -> dict[str, Any]:
        m = score(handle, enc, retrieval, val_ex, s)
        return {f"val_{k}": v for k, v in m.items() if k not in ("predictions", "examples")}

    meta = {"format": FORMAT, "version": VERSION, "arch": cfg.arch, "task": cfg.task,
            "task_file": _abs(cfg.task_file), "model": _abs(cfg.model), "model_fingerprint": fps[0],
            "checkpoint": _abs(cfg.checkpoint), "datastore": _abs(cfg.datastore),
            "peft": asdict(cfg.peft), "settings": asdict(s), "seed": cfg.seed, "parameters": handle.counts()}

    def save(root: Path, step: int) -> None:
        handle.save(root / WEIGHTS)
        write_json(root / RUN, {**meta, "step": step})

    task = loop.Task(name=LABEL, batch=batch, loss=lambda _m, b: target_loss(handle, b),
                     resume_key=cfg.resume_key(), evaluate=evaluate, save=save, base_fingerprints=fps,
                     base_name=cfg.model, positions=lambda b: int(b["attention_mask"].sum())
                     + handle.n_virtual * len(b["input_ids"]))
    summary = loop.train(model, cfg, task, out, state=state, progress=progress)
    final = score(handle, enc, retrieval, val_ex, s)  # what `ralm eval-task --run OUT --split validation` gives
    write_json(out / RUN, {**meta, "step": summary["steps"], "validation": final})
    return {"run": str(out), **summary, **handle.counts(), "validation": final}


def _abs(path: str | None) -> str | None:
    """A path that exists, made absolute (so ``eval-task --run`` works from any folder); names stay names."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path
