"""The prompt-tuning baseline of ``ralm diagnose`` (issue 15): N virtual tokens on the same frozen base, trained
through the shared loop with a small learning-rate sweep, the learning rate chosen by validation loss.

- ``lm_prompt``: plain LM-loss prompt tuning for an eval-lm method: windows of ``seq_len`` tokens of the
  training documents (the RETRO-fit's ``--train`` files, or ``ralm diagnose --train``; every 10th document is
  held out for the choice of learning rate), the virtual tokens before each window. ``LMPrompt.scorer`` then
  scores the evaluated documents' targets as ``eval-lm`` does, on sliding windows N tokens shorter so that
  prompt + window fit the model's context.
- ``task_prompt``: ``ralm tune --peft prompt`` with a task run's settings (task, data, base model, steps,
  input sizes) but no retrieved chunks (``--arch gpt --docs 0``): the static prefix alone; one run per
  learning rate under ``out``, the one of the lowest final validation loss kept.

diagnose (ralm.eval) never imports this module (eval and tuning are apart): the CLI hands it these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ralm.core.targets import Targets, default_stride, make_targets, window_plan
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.methods.peft import WEIGHTS, PeftConfig, PeftHandle, apply_peft
from ralm.methods.task_model import device
from ralm.tuning import loop
from ralm.tuning.loop import TrainConfig
from ralm.tuning.tune import TuneConfig, tune

IGNORE = -100


def _warmup(steps: int) -> int:
    return min(50, max(1, steps // 10))


@dataclass
class LMPrompt:
    """The chosen baseline on the (still prompted) base model; ``close()`` takes the virtual tokens out."""

    handle: PeftHandle
    lr: float
    sweep: dict[str, float]  # learning rate -> validation loss (nats per token)
    trainable: int
    steps: int
    window_stride: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def scorer(self, stride: int | None = None) -> Callable[[Targets, int], tuple[torch.Tensor, float]]:
        """An ``evaluate_lm`` scorer: (n_targets,) NLL of every target with the virtual tokens before each window."""
        def score(t: Targets, context: int) -> tuple[torch.Tensor, float]:
            room = context - self.handle.n_virtual
            if room < 2:
                raise RalmError(f"--n-virtual {self.handle.n_virtual}: leaves {room} of the model's {context} "
                                "positions for text")
            return prompted_nll(self.handle, t, room, default_stride(room, stride)), 0.0
        return score

    def close(self) -> None:
        self.handle.remove()


@torch.no_grad()
def prompted_nll(handle: PeftHandle, t: Targets, context: int, stride: int) -> torch.Tensor:
    """(n_targets,) NLL in nats of every target of ``t`` on sliding windows of ``context`` tokens, each after
    the handle's virtual tokens (the plain LM's ``token_nll`` with a prompt)."""
    dev = next(handle.model.parameters()).device
    handle.model.eval()
    out = []
    for begin, end, first in window_plan(len(t.ids), context, stride):
        inp = t.ids[begin:end].unsqueeze(0).to(dev)  # (1, L)
        kw = handle.inputs(inp, torch.ones_like(inp))
        logits = handle.strip(handle.model(**kw).logits)[0, first - begin - 1:end - begin - 1].float()  # (end-first, V)
        out.append(torch.nn.functional.cross_entropy(logits, t.ids[first:end].to(dev), reduction="none").cpu())
    return torch.cat(out)


def _windows(ids: list[torch.Tensor], seq_len: int) -> list[torch.Tensor]:
    return [x[b:b + seq_len] for x in ids for b in range(0, len(x), seq_len) if len(x[b:b + seq_len]) >= 2]


def _collate(ws: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids, mask and labels (-100 on padding)."""
    L = max(len(w) for w in ws)
    inp = torch.full((len(ws), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ws), L), dtype=torch.long)
    for b, w in enumerate(ws):
        inp[b, :len(w)], mask[b, :len(w)] = w, 1
    return inp, mask, torch.where(mask.bool(), inp, IGNORE)


def _lm_loss(handle: PeftHandle, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    dev = next(handle.model.parameters()).device
    inp, mask, labels = (x.to(dev) for x in batch)
    logits = handle.strip(handle.model(**handle.inputs(inp, mask)).logits)  # (B, L, V): the real positions
    lab = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab.flatten(),
                                             ignore_index=IGNORE)
    return loss, int((lab != IGNORE).sum())


@torch.no_grad()
def _val_loss(handle: PeftHandle, ws: list[torch.Tensor], pad_id: int, batch: int) -> float:
    handle.model.eval()
    total, n = 0.0, 0
    for i in range(0, len(ws), batch):
        loss, cnt = _lm_loss(handle, _collate(ws[i:i + batch], pad_id))
        total, n = total + float(loss) * cnt, n + cnt
    return total / max(n, 1)


def lm_prompt(model: Any, tokenizer: Any, docs: Sequence[Document], out: str | Path, n_virtual: int = 16,
              lrs: Sequence[float] = (3e-3, 3e-2, 3e-1), steps: int = 100, batch_size: int = 4, seq_len: int = 128,
              seed: int = 0, progress: bool = True) -> LMPrompt:
    """Train the LM-loss prompt-tuning baseline on ``docs`` (see the module docstring) for every learning rate
    of ``lrs`` (one loop run each, in ``out/lr-<lr>``) and leave the best one on ``model``."""
    if not lrs:
        raise RalmError("--baseline-lrs: give at least one learning rate")
    ids = []
    for d in docs:
        try:
            ids.append(make_targets(d, tokenizer).ids)
        except RalmError:  # nothing to score is nothing to train on either
            continue
    held = set(range(0, len(ids), 10)) if len(ids) >= 2 else set()
    train_w = _windows([x for i, x in enumerate(ids) if i not in held], seq_len)
    val_w = _windows([x for i, x in enumerate(ids) if i in held], seq_len) or train_w
    if not train_w:
        raise RalmError("--train: no training document has 2 tokens for the prompt-tuning baseline")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.to(device())
    pcfg = PeftConfig(method="prompt", n_virtual=n_virtual)
    sweep: dict[str, float] = {}
    best: tuple[float, float, Path] | None = None
    for lr in lrs:
        root = Path(out) / f"lr-{lr:g}"
        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)  # the same initial prompt for every learning rate
        handle = apply_peft(model, pcfg, "gpt")
        try:
            cfg = TrainConfig(steps=steps, lr=lr, warmup=_warmup(steps), eval_every=0, save_every=0, seed=seed)
            task = loop.Task(name=f"prompt baseline lr {lr:g}", resume_key={"baseline": "lm-prompt"},
                             batch=lambda step: _collate(loop.step_items(train_w, step, batch_size, seed), pad_id),
                             loss=lambda _m, b, h=handle: _lm_loss(h, b),
                             save=lambda r, _s, h=handle: h.save(r / WEIGHTS))
            (root / loop.STATE).unlink(missing_ok=True)  # a fresh run every time
            (root / loop.LOG).unlink(missing_ok=True)
            loop.train(model, cfg, task, root, state=None, progress=progress)
            val = _val_loss(handle, val_w, pad_id, batch_size)
        finally:
            handle.remove()
        sweep[f"{lr:g}"] = round(val, 6)
        if math.isfinite(val) and (best is None or val < best[0]):
            best = (val, lr, root)
    if best is None:
        raise RalmError("prompt-tuning baseline: every learning rate diverged (non-finite validation loss)")
    handle = apply_peft(model, pcfg, "gpt")
    handle.load(best[2] / WEIGHTS)
    model.eval()
    return LMPrompt(handle, best[1], sweep, handle.counts()["trainable"], steps)


def task_prompt(run: dict[str, Any], out: str | Path, n_virtual: int = 16, lrs: Sequence[float] = (3e-3, 3e-2, 3e-1),
                steps: int = 100, seed: int | None = None, progress: bool = True) -> dict[str, Any]:
    """``ralm tune --peft prompt --arch gpt --docs 0`` with the run's settings (``run``: its run.json) for every
    learning rate of ``lrs``; returns the chosen run folder, its learning rate, the sweep (final validation loss
    per learning rate) and its trained parameter count."""
    if not lrs:
        raise RalmError("--baseline-lrs: give at least one learning rate")
    s = run["settings"]
    sweep: dict[str, float] = {}
    best: tuple[float, float, str, int] | None = None
    for lr in lrs:
        cfg = TuneConfig(task=run["task"], out=str(Path(out) / f"lr-{lr:g}"), arch="gpt",
                         peft=PeftConfig(method="prompt", n_virtual=n_virtual), task_file=run["task_file"],
                         datastore=None, model=run["model"], docs=0, doc_tokens=s["doc_tokens"], max_len=s["max_len"],
                         max_target=s["max_target"], max_new_tokens=s["max_new_tokens"], batch_size=s["batch_size"],
                         steps=steps, lr=lr, warmup=_warmup(steps), eval_every=0, save_every=0,
                         seed=run["seed"] if seed is None else seed, force=True)
        summary = tune(cfg, progress=progress)
        val = float(summary["validation"]["loss"])
        sweep[f"{lr:g}"] = val
        if math.isfinite(val) and (best is None or val < best[0]):
            best = (val, lr, summary["run"], int(summary["trainable"]))
    if best is None:
        raise RalmError("prompt-tuning baseline: every learning rate diverged (non-finite validation loss)")
    return {"run": best[2], "lr": best[1], "sweep": sweep, "trainable": best[3], "steps": steps}


class PromptTuner:
    """What ``ralm.eval.diagnose.run_diagnose`` trains its baseline with (eval cannot import tuning)."""

    lm = staticmethod(lm_prompt)
    task = staticmethod(task_prompt)

    @staticmethod
    def retroprompt(run: str, split: str = "test", limit: int | None = None) -> Any:
        """A RetroPrompt run as diagnose's subject (its baseline: prompt tuning on the run's few-shot draw)."""
        from ralm.tuning.retroprompt_diagnose import RetroPromptSubject  # loads torch models: only when asked

        return RetroPromptSubject(run, split, limit)
