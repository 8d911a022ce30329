"""RETRO-fit checkpoints: only the new parameters (safetensors) plus the config that rebuilds them.

A checkpoint folder holds ``retro.safetensors`` (encoder + CCA weights) and ``retro.json`` (the
``RetroConfig``, the base model's name, weights fingerprint and tokenizer fingerprint, the store it was
trained with, the training step). The frozen base model is never copied: loading fits a fresh RETRO-fit
wrapper onto the named (or given) base model and refuses one with other weights.

A training run's folder also holds ``trainer.safetensors``, the state an exact resumption needs: the new
weights and the optimiser's tensors as safetensors, everything else (step, settings, scheduler, RNG) as JSON
in the same file's header, so one atomic rename writes both. Nothing here ever unpickles a file: a pickle
can run code, and these folders come from users.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ralm.errors import IncompatibleError, RalmError
from ralm.lm.hidden import model_fingerprints
from ralm.lm.presets import start_token_change, tokenizer_fingerprint
from ralm.methods.retro.model import RetroConfig, RetroFit
from ralm.utils.atomic import atomic_open, write_json

WEIGHTS, CONFIG = "retro.safetensors", "retro.json"
TRAINER_STATE, LEGACY_TRAINER_STATE = "trainer.safetensors", "trainer.pt"
# the resumption state's own format; 1 was trainer.pt, a torch pickle, which is refused unread
TRAINER_FORMAT, TRAINER_VERSION = "ralm-retrofit-trainer", 2
# 2: zero-initialised encoder branches and CCA outputs in units of the residual stream's RMS; a version-1
# checkpoint's weights mean something else under this code, so it is refused rather than misread
# 3: the match gate (RetroConfig.match_gate) and no weight decay on 1-d parameters or relative biases
VERSION = 3


def save_checkpoint(path: str | Path, model: RetroFit, meta: dict[str, Any]) -> None:
    """Write the new parameters, then the config (its presence marks a complete checkpoint)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(root / WEIGHTS, model.new_state_dict())
    write_json(root / CONFIG, {"format": "ralm-retrofit", "version": VERSION, "retro": asdict(model.cfg), **meta})


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    cfg = root / CONFIG
    if not root.is_dir():
        raise RalmError(f"--checkpoint {root}: no such checkpoint folder")
    if not cfg.exists() or not (root / WEIGHTS).exists():
        raise RalmError(f"--checkpoint {root}: not a RETRO-fit checkpoint (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RalmError(f"{cfg}: corrupt checkpoint config ({e})") from None
    if meta.get("format") != "ralm-retrofit":
        raise RalmError(f"{cfg}: not a RETRO-fit checkpoint config")
    if meta.get("version") != VERSION:
        raise IncompatibleError(f"--checkpoint {root}: written by another ralm version (checkpoint format "
                                f"{meta.get('version')}, this one reads {VERSION}); retrain it with `ralm retrofit`")
    return meta


def load_retrofit(path: str | Path, base: Any, tokenizer: Any, base_name: str | None = None) -> tuple[RetroFit, dict]:
    """Fit the checkpoint's layers onto ``base`` (its own frozen LM); return the model and the checkpoint config."""
    meta = read_checkpoint_config(path)
    fps, want = model_fingerprints(base), meta.get("model_fingerprint")
    fp = fps[0]
    if want not in fps:
        raise IncompatibleError(f"--checkpoint {path}: trained on base model {meta.get('model')!r} ({want}), "
                                f"not {base_name or 'the given model'!r} ({fp})")
    tok_fp = tokenizer_fingerprint(tokenizer)
    if tok_fp != meta.get("tokenizer_fingerprint"):
        raise IncompatibleError(f"--checkpoint {path}: trained with tokenizer {meta.get('tokenizer_fingerprint')}, "
                                f"not {tok_fp}")
    if (why := start_token_change(meta, tokenizer)) is not None:  # usable, but its layers saw other states
        print(f"warning: --checkpoint {path}: trained {why}; its new layers read slightly different states "
              "of the base model now; retrain it with `ralm retrofit` for comparable numbers", file=sys.stderr)
    model = RetroFit(base, RetroConfig(**meta["retro"]))
    try:
        state = load_file(str(Path(path) / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise RalmError(f"--checkpoint {path}: unreadable {WEIGHTS} ({e})") from None
    model.load_new_state_dict(state)
    return model.eval(), meta


# ---- safetensors files with ordinary permissions --------------------------------------------------------
def write_safetensors(dest: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` to ``dest`` with the mode any other file gets (0644 under umask 022).

    ``safetensors.torch.save_file`` writes through a temporary file of its own, created 0600 and renamed onto
    the target (so the checkpoint was the one file others could not read, and a kill left a stray
    ``.tmpXXXXXX``); serialising to bytes and writing them through ``atomic_open`` avoids both.
    """
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(dest, "wb") as f:
        f.write(data)


# ---- the resumption state of a training run -------------------------------------------------------------
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

    def restore(self, model: RetroFit, opt: torch.optim.Optimizer, sched: Any, state_keys: set[str]) -> None:
        """Load weights, optimiser (per-parameter ``state_keys``) and scheduler; refuse what does not fit."""
        weights = {k[8:]: v for k, v in self.tensors.items() if k.startswith("weights.")}
        try:
            model.load_new_state_dict(weights)
        except RalmError as e:
            raise self.fail(str(e)) from None
        opt.load_state_dict(self._optimizer(opt, state_keys))
        sched_state = self.head["scheduler"]
        self._conforms(sched.state_dict(), sched_state, "scheduler")
        sched.load_state_dict(sched_state)

    def restore_rng(self) -> None:
        """The RNG states of the checkpoint step (dropout draws continue as in an uninterrupted run)."""
        rng = self.head["rng"]
        torch.set_rng_state(torch.tensor(rng["cpu"], dtype=torch.uint8))
        if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])

    def _optimizer(self, opt: torch.optim.Optimizer, state_keys: set[str]) -> dict[str, Any]:
        saved = self.head["optimizer"]
        want = json.loads(json.dumps(opt.state_dict()["param_groups"]))
        self._conforms(want, saved["param_groups"], "optimizer.param_groups")
        if [g["params"] for g in saved["param_groups"]] != [g["params"] for g in want]:
            raise self.fail("optimizer parameter groups do not fit this run")
        params = [p for g in opt.param_groups for p in g["params"]]  # state_dict numbers them in this order
        per_param: dict[int, dict[str, Any]] = {}
        for idx, values in saved["scalars"].items():
            per_param.setdefault(self._index(idx, len(params)), {}).update(values)
        for name, t in self.tensors.items():
            if name.startswith("optimizer."):
                idx, _, key = name[10:].partition(".")
                per_param.setdefault(self._index(idx, len(params)), {})[key] = t
        for i, values in per_param.items():
            if set(values) != state_keys:
                raise self.fail(f"optimizer state of parameter {i} has {sorted(values)}, not {sorted(state_keys)}")
            for key, t in values.items():
                if not isinstance(t, torch.Tensor):
                    continue
                shape, dtype = ((), t.dtype) if key == "step" else (params[i].shape, params[i].dtype)
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_floating_point():
                    raise self.fail(f"optimizer tensor {i}.{key} is {t.dtype} {tuple(t.shape)}, expected "
                                    f"{dtype} {tuple(shape)}")
        return {"state": per_param, "param_groups": saved["param_groups"]}

    def _index(self, idx: str, n: int) -> int:
        if not idx.isdigit() or int(idx) >= n:
            raise self.fail(f"optimizer state for parameter {idx!r}, which this run does not have")
        return int(idx)

    def _conforms(self, want: Any, got: Any, where: str) -> None:
        """Refuse ``got`` unless it has ``want``'s keys, lengths and leaf types (JSON's view of it)."""
        want = json.loads(json.dumps(want))
        bad = _first_difference(want, got, where)
        if bad is not None:
            raise self.fail(f"{bad} is missing or of the wrong type")


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


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's bytes in name order: the header's check that the data is what was written."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_trainer_state(path: Path, model: RetroFit, opt: torch.optim.Optimizer, sched: Any,
                       meta: dict[str, Any]) -> None:
    """One atomic file: new weights + optimiser tensors, and ``meta`` + scheduler + RNG as JSON in its header."""
    tensors = {f"weights.{k}": v for k, v in model.new_state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    opt_state = opt.state_dict()
    for idx, values in opt_state["state"].items():
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = v
            else:
                scalars.setdefault(str(idx), {})[key] = v
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    head = {"format": TRAINER_FORMAT, "version": TRAINER_VERSION, **meta,
            "optimizer": {"param_groups": opt_state["param_groups"], "scalars": scalars},
            "scheduler": sched.state_dict(), "rng": {"cpu": torch.get_rng_state().tolist(), "cuda": cuda},
            "sha256": _digest(tensors)}
    write_safetensors(path, tensors, {"ralm": json.dumps(head)})


_TOP = {"step": int, "trained_tokens": int, "resume_key": dict, "model_fingerprint": str, "optimizer": dict,
        "scheduler": dict, "rng": dict, "sha256": str}


def read_trainer_state(path: Path) -> TrainerState:
    """Read and type-check a resumption state (never a pickle); one-line errors for anything malformed."""
    def fail(what: str) -> RalmError:
        return _state_error(path, what)

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("ralm")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise fail(f"unreadable RETRO-fit trainer state ({e})") from None
    try:
        head = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as e:
        raise fail(f"corrupt RETRO-fit trainer state header ({e})") from None
    if not isinstance(head, dict) or head.get("format") != TRAINER_FORMAT:
        raise fail("not a RETRO-fit trainer state")
    if head.get("version") != TRAINER_VERSION:
        raise IncompatibleError(f"{path}: trainer state format {head.get('version')!r}, this ralm reads "
                                f"{TRAINER_VERSION}; rerun with --force to start over")
    for key, kind in _TOP.items():
        if key not in head:
            raise fail(f"trainer state has no {key!r}")
        if not isinstance(head[key], kind) or isinstance(head[key], bool):
            raise fail(f"trainer state {key!r} is {type(head[key]).__name__}, not {kind.__name__}")
    if head["step"] < 1 or head["trained_tokens"] < 0:
        raise fail(f"trainer state step {head['step']} / trained_tokens {head['trained_tokens']} out of range")
    if _digest(tensors) != head["sha256"]:
        raise fail("corrupt RETRO-fit trainer state (its tensors do not match the checksum written with them)")
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
