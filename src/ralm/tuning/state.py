"""The resumption state of a training run: ``trainer.safetensors``, rewritten atomically at each checkpoint.

Tensors: every trained parameter (``weights.NAME``) and AdamW's per-parameter tensors (``optimizer.NAME.KEY``),
keyed by parameter *name*, not by position, so a run whose optimiser lists its parameters in another order
still resumes each one onto itself. Everything else (step, counters, resume key, optimiser groups and
scalars, scheduler, RNG states) is JSON in the same file's header, with a sha256 over the tensors; one
atomic rename writes both. Nothing here ever unpickles a file: a pickle can run code, and these folders
come from users.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ralm.errors import IncompatibleError, RalmError
from ralm.utils.tensors import write_safetensors

# 1 was trainer.pt (a torch pickle, refused unread); 2 was "ralm-retrofit-trainer" with the optimiser state
# numbered by position; 3 keys everything by parameter name and serves any model
FORMAT, VERSION = "ralm-trainer", 3
OLD_FORMATS = {"ralm-retrofit-trainer"}
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW (amsgrad off) keeps per parameter

Params = dict[str, nn.Parameter]  # the trained parameters by name (model.named_parameters())


@dataclass
class TrainerState:
    """A read, type-checked ``trainer.safetensors``; ``restore`` checks it against the live run and loads it."""

    path: Path
    step: int
    trained_tokens: int
    resume_key: dict[str, Any]
    model_fingerprint: str
    head: dict[str, Any]  # optimizer (param groups, non-tensor values), scheduler, rng
    tensors: dict[str, torch.Tensor]

    def fail(self, what: str) -> RalmError:
        return _state_error(self.path, what)

    def restore(self, params: Params, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Load weights, optimiser and scheduler state onto ``params``; refuse what does not fit."""
        weights = {k[8:]: v for k, v in self.tensors.items() if k.startswith("weights.")}
        if set(weights) != set(params):
            missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
            raise self.fail(f"the state does not fit this run's trained parameters (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
        for name, p in params.items():
            w = weights[name]
            if w.shape != p.shape or w.dtype != p.dtype:
                raise self.fail(f"weight {name} has shape {tuple(w.shape)} {w.dtype}, expected {tuple(p.shape)} "
                                f"{p.dtype}")
        opt_state = self._optimizer(params, opt)
        sched_state = self.head["scheduler"]
        self._conforms(sched.state_dict(), sched_state, "scheduler")
        with torch.no_grad():  # only once everything has been accepted: a refusal leaves the model as it was
            for name, p in params.items():
                p.copy_(weights[name])
        opt.load_state_dict(opt_state)
        sched.load_state_dict(sched_state)

    def restore_rng(self) -> None:
        """The RNG states of the checkpoint step (dropout draws continue as in an uninterrupted run)."""
        rng = self.head["rng"]
        torch.set_rng_state(torch.tensor(rng["cpu"], dtype=torch.uint8))
        if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])

    def _optimizer(self, params: Params, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The saved optimiser state renumbered for ``opt``: parameter names mapped to this run's indices."""
        saved, order = self.head["optimizer"], _order(params, opt)
        index = {n: i for i, n in enumerate(order)}
        current = opt.state_dict()["param_groups"]
        want = json.loads(json.dumps(_named_groups(current, order)))
        self._conforms(want, saved["param_groups"], "optimizer.param_groups")
        if [sorted(g["params"]) for g in saved["param_groups"]] != [sorted(g["params"]) for g in want]:
            raise self.fail("optimizer parameter groups do not fit this run")
        per_param: dict[str, dict[str, Any]] = {}
        for name, values in saved["scalars"].items():
            per_param.setdefault(self._known(name, index), {}).update(values)
        for key, t in self.tensors.items():
            if key.startswith("optimizer."):
                name, _, what = key[10:].rpartition(".")  # parameter names hold dots, AdamW's keys do not
                per_param.setdefault(self._known(name, index), {})[what] = t
        for name, values in per_param.items():
            if set(values) != ADAMW_STATE:
                raise self.fail(f"optimizer state of parameter {name} has {sorted(values)}, not {sorted(ADAMW_STATE)}")
            p = params[name]
            for what, t in values.items():
                if not isinstance(t, torch.Tensor):
                    continue
                shape, dtype = ((), t.dtype) if what == "step" else (p.shape, p.dtype)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_floating_point():
                    raise self.fail(f"optimizer tensor {name}.{what} is {t.dtype} {tuple(t.shape)}, expected "
                                    f"{dtype} {tuple(shape)}")
        # this run's own numbering of each group, with the saved hyper-parameters (lr, initial_lr, ...)
        groups = [{**g, "params": c["params"]} for g, c in zip(saved["param_groups"], current, strict=True)]
        return {"state": {index[n]: v for n, v in per_param.items()}, "param_groups": groups}

    def _known(self, name: str, index: dict[str, int]) -> str:
        if name not in index:
            raise self.fail(f"optimizer state for parameter {name!r}, which this run does not have")
        return name

    def _conforms(self, want: Any, got: Any, where: str) -> None:
        """Refuse ``got`` unless it has ``want``'s keys, lengths and leaf types (JSON's view of it)."""
        want = json.loads(json.dumps(want))
        bad = _first_difference(want, got, where)
        if bad is not None:
            raise self.fail(f"{bad} is missing or of the wrong type")


def _order(params: Params, opt: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``opt.state_dict()`` numbers them."""
    names = {id(p): n for n, p in params.items()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _named_groups(groups: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    return [{**g, "params": [order[i] for i in g["params"]]} for g in groups]


def _state_error(path: Path, what: str) -> RalmError:
    return RalmError(f"{path}: {what}; rerun with --force to start over")


def _first_difference(want: Any, got: Any, where: str) -> str | None:
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return where
        return next((w for k in want if (w := _first_difference(want[k], got[k], f"{where}.{k}"))), None)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return where
        pairs = enumerate(zip(want, got, strict=True))
        return next((w for i, (a, b) in pairs if (w := _first_difference(a, b, f"{where}[{i}]"))), None)
    return None if type(got) is type(want) else where


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes in name order: the header's check that the data is what was written."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_trainer_state(path: Path, params: Params, opt: torch.optim.Optimizer, sched: Any,
                       meta: dict[str, Any]) -> None:
    """One atomic file: trained weights + optimiser tensors by name, ``meta`` + scheduler + RNG in its header."""
    tensors: dict[str, torch.Tensor] = {f"weights.{n}": p for n, p in params.items()}
    scalars: dict[str, dict[str, Any]] = {}
    opt_state, order = opt.state_dict(), _order(params, opt)
    for idx, values in opt_state["state"].items():
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{order[idx]}.{key}"] = v
            else:
                scalars.setdefault(order[idx], {})[key] = v
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    head = {"format": FORMAT, "version": VERSION, **meta,
            "optimizer": {"param_groups": _named_groups(opt_state["param_groups"], order), "scalars": scalars},
            "scheduler": sched.state_dict(), "rng": {"cpu": torch.get_rng_state().tolist(), "cuda": cuda},
            "sha256": digest(tensors)}
    write_safetensors(path, tensors, {"ralm": json.dumps(head)})


_TOP = {"step": int, "trained_tokens": int, "resume_key": dict, "model_fingerprint": str, "optimizer": dict,
        "scheduler": dict, "rng": dict, "sha256": str}


def read_trainer_state(path: Path, label: str) -> TrainerState:
    """Read and type-check a resumption state (never a pickle); one-line errors for anything malformed.

    ``label`` names the trainer in messages ("RETRO-fit").
    """
    def fail(what: str) -> RalmError:
        return _state_error(path, what)

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("ralm")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise fail(f"unreadable {label} trainer state ({e})") from None
    try:
        head = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as e:
        raise fail(f"corrupt {label} trainer state header ({e})") from None
    if not isinstance(head, dict) or head.get("format") not in {FORMAT, *OLD_FORMATS}:
        raise fail(f"not a {label} trainer state")
    if head.get("format") != FORMAT or head.get("version") != VERSION:
        raise IncompatibleError(f"{path}: trainer state format {head.get('version')!r}, this ralm reads "
                                f"{VERSION}; rerun with --force to start over")
    for key, kind in _TOP.items():
        if key not in head:
            raise fail(f"trainer state has no {key!r}")
        if not isinstance(head[key], kind) or isinstance(head[key], bool):
            raise fail(f"trainer state {key!r} is {type(head[key]).__name__}, not {kind.__name__}")
    if head["step"] < 1 or head["trained_tokens"] < 0:
        raise fail(f"trainer state step {head['step']} / trained_tokens {head['trained_tokens']} out of range")
    if digest(tensors) != head["sha256"]:
        raise fail(f"corrupt {label} trainer state (its tensors do not match the checksum written with them)")
    opt = head["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict) or not all(
            isinstance(v, dict) for v in opt["scalars"].values()):
        raise fail("trainer state 'optimizer' lacks its param_groups or scalars")
    rng = head["rng"]
    cpu = rng.get("cpu")
    if (not isinstance(cpu, list) or len(cpu) != len(torch.get_rng_state())
            or not isinstance(rng.get("cuda"), list)
            or not all(isinstance(s, list) for s in rng["cuda"])
            or not all(type(b) is int and 0 <= b < 256 for s in [cpu, *rng["cuda"]] for b in s)):
        raise fail("trainer state 'rng' is not the RNG states this ralm writes")
    unknown = sorted(k for k in tensors if not k.startswith(("weights.", "optimizer.")))
    if unknown:
        raise fail(f"trainer state holds unknown tensors {unknown[:3]}")
    return TrainerState(path, head["step"], head["trained_tokens"], head["resume_key"], head["model_fingerprint"],
                        head, tensors)
