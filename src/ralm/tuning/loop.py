"""One training loop for every trainer: RETRO-fit now, LoRA / prompt tuning injected into the base model next.

The trainer builds the model (its frozen part with ``requires_grad`` off, seeded with ``cfg.seed``) and hands
the loop a ``Task``: ``batch(step)``, ``loss(model, batch) -> (mean loss, tokens)``, optionally ``evaluate``
and ``save``, and the settings a resumption must share. The loop then:

- trains ``[p for n, p in model.named_parameters() if p.requires_grad]`` and nothing else, with AdamW
  (weight decay on matrices only, never on 1-d tensors or on the model's ``no_weight_decay()`` names), a
  linear warm-up then a cosine decay to ``min_lr_ratio``, gradient clipping and bf16 autocast where the
  hardware has bf16 units;
- logs one row per step to ``OUT/train_log.jsonl``, evaluates every ``eval_every`` steps and at the end;
- every ``save_every`` steps and at the end writes ``OUT/trainer.safetensors`` (``state.py``: the trained
  parameters only, never the frozen base, plus optimiser, scheduler, RNG and counters), then calls the
  task's ``save`` for its user-facing checkpoint;
- resumes from that state so that the resumed run's weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from ralm.errors import RalmError, refuse_below
from ralm.tuning.state import Params, TrainerState, read_trainer_state, save_trainer_state
from ralm.utils import outdir
from ralm.utils.atomic import atomic_open

LOG, STATE = "train_log.jsonl", "trainer.safetensors"
T = TypeVar("T")
BETAS = (0.9, 0.95)  # AdamW's, as RETRO-fitting used them; a resumed run keeps them through its state


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata={"help": "optimiser steps (a resumed run continues up to this)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (RETRO-fitting: ~2e-4)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0: only at the end)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on where the device "
                                                                "has bf16 units)"})
    seed: int = field(default=0, metadata={"help": "random seed (initialisation of the trained layers, batch "
                                                   "order, dropout)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decays the learning rate to this "
                                                                "share of --lr"})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise RalmError(f"--steps {self.steps}: must be >= 1")
        refuse_below(self, ("warmup", "eval_every", "save_every"), 0)
        # written as `not x > 0` so that NaN is refused too
        if not self.lr > 0 or math.isinf(self.lr):
            raise RalmError(f"--lr {self.lr}: must be a finite number > 0")
        if not self.grad_clip > 0:
            raise RalmError(f"--grad-clip {self.grad_clip}: must be > 0")
        if not self.weight_decay >= 0:
            raise RalmError(f"--weight-decay {self.weight_decay}: must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise RalmError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")

    def loop_key(self) -> dict[str, Any]:
        """The loop's settings a resumption must share (steps may grow; clipping, evaluation and saving may change)."""
        return {"lr": self.lr, "warmup": self.warmup, "weight_decay": self.weight_decay, "seed": self.seed,
                "min_lr_ratio": self.min_lr_ratio}


@dataclass
class Task:
    """What a trainer gives the loop."""

    name: str  # in messages and on the progress bar: "RETRO-fit"
    batch: Callable[[int], Any]  # step -> its batch; a function of the step alone, so a resumed run draws the same
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]]  # (mean loss, tokens it averages over)
    resume_key: dict[str, Any]  # the trainer's settings a resumption must share (the loop adds its own)
    evaluate: Callable[[nn.Module], dict[str, Any]] | None = None  # called in eval mode, without gradients
    save: Callable[[Path, int], None] | None = None  # (out, step): the user-facing checkpoint, after the state
    base_fingerprints: tuple[str, ...] = ()  # the frozen weights': [0] is recorded, any is accepted on resume
    base_name: str = "the base model"
    positions: Callable[[Any], int] | None = None  # batch -> input positions the model computes (prompt included)


def in_run_folder(out: str | Path, kind: outdir.Kind, force: bool, body: Callable[[], T]) -> T:
    """``body()`` inside ``out`` made writable, locked against a second writer and claimed as ``kind``'s
    (``--force`` empties it first): before any loading, so a refusal costs nothing."""
    with outdir.open_out(out, kind, force=force) as run:
        run.claim()
        return body()


def step_items(items: Sequence[T], step: int, size: int, seed: int) -> list[T]:
    """The items of a step: position step·size onwards in a per-epoch seeded permutation (a function of the
    step alone, so a resumed run draws what the original would have)."""
    out = []
    for j in range(step * size, (step + 1) * size):
        epoch, pos = divmod(j, len(items))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(items[int(torch.randperm(len(items), generator=g)[pos])])
    return out


def run_key(cfg: TrainConfig, task_key: dict[str, Any]) -> dict[str, Any]:
    """What a state records and a resumption must match, as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps({"loop": cfg.loop_key(), "task": task_key}))


def resume_state(out: Path, cfg: TrainConfig, name: str, task_key: dict[str, Any]) -> TrainerState | None:
    """The run to resume in ``out`` (None: start afresh), checked against the settings; never unpickles anything.

    Call it before loading models and data: a refusal then costs nothing.
    """
    path = Path(out) / STATE
    if not path.exists():
        return None
    state = read_trainer_state(path, name)
    _check_key(state, out, cfg, task_key)
    if state.step >= cfg.steps:
        raise RalmError(f"--out {out}: already trained for {state.step} steps; raise --steps to train further")
    return state


def _check_key(state: TrainerState, out: Path, cfg: TrainConfig, task_key: dict[str, Any]) -> None:
    if state.resume_key != run_key(cfg, task_key):
        raise RalmError(f"--out {out}: holds a run with other settings; pass the same ones, or --force to start over")


def trainable(model: nn.Module) -> Params:
    """The parameters the loop trains and saves: those that require gradients (whoever froze the rest)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer(model: nn.Module, params: Params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with two groups: decayed matrices, then everything else (always both, so a state's layout is fixed).

    Decaying a norm, a bias, a gate or a position bias pulls it toward a value that means something
    (uniform attention, a half-open gate); a model names such matrices in ``no_weight_decay()``.
    """
    spared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decayed = [p for n, p in params.items() if p.ndim >= 2 and n not in spared]
    rest = [p for n, p in params.items() if not (p.ndim >= 2 and n not in spared)]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=BETAS)


def lr_lambda(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """The learning rate's share of the peak: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return bf16_supported(device) if cfg.bf16 is None else cfg.bf16


def train(model: nn.Module, cfg: TrainConfig, task: Task, out: str | Path, *, state: TrainerState | None,
          progress: bool = True) -> dict[str, Any]:
    """Train ``model`` in the (locked) folder ``out``; resume from ``state`` (what ``resume_state`` returned).

    Returns a summary: steps, trained_tokens (the whole run's), resumed_at_step, seconds (this session's, all
    of it), train_seconds (forward, backward and optimiser steps only: no evaluation, no saving),
    tokens_per_second (this session's target tokens per train second) and, where the task counts them,
    positions_per_second (input positions per train second), bf16, device, final_loss and the last
    evaluation's values.
    """
    out = Path(out)
    params = trainable(model)
    if not params:
        raise RalmError(f"{task.name}: no parameter of the model requires grad, so there is nothing to train")
    key = run_key(cfg, task.resume_key)
    if state is not None:
        _check_key(state, out, cfg, task.resume_key)
        if task.base_fingerprints and state.model_fingerprint not in task.base_fingerprints:
            raise RalmError(f"--out {out}: was trained on other base-model weights than {task.base_name!r} has now")
    opt = optimizer(model, params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_lambda, warmup=cfg.warmup, total=cfg.steps,
                                                           floor=cfg.min_lr_ratio))
    step, tokens_before = 0, 0
    if state is not None:  # the weights saved with the optimiser state: all of the same step
        state.restore(params, opt, sched)
        step, tokens_before = state.step, state.trained_tokens
        _truncate_log(out / LOG, step)
        print(f"resuming {out} at step {step}", file=sys.stderr)  # only once all of it has been accepted
        state.restore_rng()  # after everything the task did before, as where the run was saved
    device = next(iter(params.values())).device
    bf16 = use_bf16(cfg, device)
    fingerprint = task.base_fingerprints[0] if task.base_fingerprints else ""
    tokens, t0, loss_ema, final_loss, last_eval = 0, time.perf_counter(), None, None, {}  # tokens: this session's
    positions, train_s = 0, 0.0  # this session's input positions and seconds spent on steps alone

    def checkpoint() -> None:
        # the resumption state is one atomic file (weights + optimiser of one step), written first
        save_trainer_state(out / STATE, params, opt, sched, {
            "step": step, "trained_tokens": tokens_before + tokens, "model_fingerprint": fingerprint,
            "resume_key": key})
        if task.save is not None:
            task.save(out, step)

    model.train()
    with tqdm(total=cfg.steps, initial=step, desc=task.name, unit="step", disable=not progress,
              file=sys.stderr) as bar:
        while step < cfg.steps:
            t_step = time.perf_counter()
            batch = task.batch(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, n = task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip))
            opt.step()
            sched.step()
            train_s += time.perf_counter() - t_step
            step += 1
            tokens += int(n)
            positions += task.positions(batch) if task.positions is not None else 0
            tps = tokens / max(train_s, 1e-9)
            final_loss = loss.item()
            loss_ema = final_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * final_loss
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            row = {"step": step, "loss": round(final_loss, 4), "grad_norm": round(grad_norm, 4),
                   "lr": sched.get_last_lr()[0], "trained_tokens": tokens_before + tokens,
                   "tokens_per_second": round(tps, 1), "elapsed_s": round(time.perf_counter() - t0, 2)}
            if task.evaluate is not None and (cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps):
                last_eval = _evaluate(model, task.evaluate)
                row.update(last_eval)
                if last_eval:
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v}" for k, v in last_eval.items()))
            with open(out / LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.save_every and step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint()
    seconds = time.perf_counter() - t0
    speed = {"positions_per_second": round(positions / max(train_s, 1e-9), 1)} if task.positions is not None else {}
    return {"steps": step, "trained_tokens": tokens_before + tokens,
            "resumed_at_step": state.step if state is not None else 0, "seconds": round(seconds, 3),
            "train_seconds": round(train_s, 3), "tokens_per_second": round(tokens / max(train_s, 1e-9), 1),
            **speed, "bf16": bf16, "device": device.type,
            "final_loss": None if final_loss is None else round(final_loss, 4), **last_eval}


def _evaluate(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, Any]]) -> dict[str, Any]:
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model)
    finally:
        model.train()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows of steps after the checkpoint being resumed (they will be trained again)."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row_step = json.loads(line)["step"] if line.strip() else None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RalmError(f"{path}: line {n} is not a training log row; fix or delete the file") from None
        if isinstance(row_step, int) and row_step <= step:
            keep.append(line)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))
