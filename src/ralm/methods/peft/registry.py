"""The PEFT methods by name: one ``register_peft_method(name, apply)`` line per method (HF peft's habit).

``apply(model, cfg, parts)`` runs on a model whose every parameter is already frozen; it injects its modules
into ``parts`` (``parts.py``), leaves exactly its own parameters trainable and returns an ``Injection``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ralm.errors import RalmError
from ralm.methods.peft.config import METHODS, PeftConfig
from ralm.methods.peft.parts import Part


@dataclass
class Injection:
    remove: Callable[[], None]  # back to the model as it was (hooks and added modules gone)
    merge: Callable[[], nn.Module] | None = None  # fold the update into the base weights (LoRA)
    prompt: nn.Module | None = None  # the virtual-token module (prompt methods): forward(batch) -> (B, N, d)


Apply = Callable[[nn.Module, PeftConfig, list[Part]], Injection]
_METHODS: dict[str, Apply] = {}


def register_peft_method(name: str, apply: Apply) -> None:
    if name not in METHODS:  # the config validates --peft against METHODS, so a new method is added there too
        raise ValueError(f"PEFT method {name!r} is not in config.METHODS")
    _METHODS[name] = apply


def get_peft_method(name: str) -> Apply:
    if name not in _METHODS:
        raise RalmError(f"--peft {name!r}: unknown method (choose from {', '.join(_METHODS)})")
    return _METHODS[name]


def peft_method_names() -> list[str]:
    return list(_METHODS)
