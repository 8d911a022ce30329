"""RETRO-fit checkpoints: only the new parameters (safetensors) plus the config that rebuilds them.

A checkpoint folder holds ``retro.safetensors`` (encoder + CCA weights) and ``retro.json`` (the
``RetroConfig``, the base model's name, weights fingerprint and tokenizer fingerprint, the store it was
trained with, the training step). The frozen base model is never copied: loading fits a fresh RETRO-fit
wrapper onto the named (or given) base model and refuses one with other weights.

A training run's folder also holds ``trainer.safetensors``, the state an exact resumption needs, which the
shared training loop writes and reads (``tuning/state.py``); an older ralm's ``trainer.pt`` (a pickle) is
refused unread. Nothing here ever unpickles a file: a pickle can run code, and these folders come from users.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from ralm.errors import IncompatibleError, RalmError
from ralm.lm.hidden import model_fingerprints
from ralm.lm.presets import start_token_change, tokenizer_fingerprint
from ralm.methods.retro.model import RetroConfig, RetroFit
from ralm.utils.atomic import write_json
from ralm.utils.tensors import write_safetensors

WEIGHTS, CONFIG = "retro.safetensors", "retro.json"
LEGACY_TRAINER_STATE = "trainer.pt"  # an older ralm's resumption state: a torch pickle, refused unread
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
