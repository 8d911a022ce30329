"""``apply_peft``: freeze a model, inject one PEFT method, and hand back what was added (``PeftHandle``).

The shared training loop trains and saves exactly the parameters that require gradients, so after
``apply_peft`` those are the method's own (``full``: every weight of the parts switched on). A run saves them
by name with ``PeftHandle.save`` (safetensors, never a pickle; the header names the method, the arch and the
config); ``read_peft_header`` + ``apply_peft`` + ``PeftHandle.load`` rebuild the model from its base.

On a RETRO-fit model, load its checkpoint (``RetroFit.load_new_state_dict``) *before* ``apply_peft``: LoRA
renames the linear layers it wraps (``q.weight`` -> ``q.base_layer.weight``) and adapters add parameters, so
RetroFit's own checkpoint names only fit the model without PEFT (or after ``merge`` / ``remove``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ralm.errors import RalmError
from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.parts import parts
from ralm.methods.peft.prompt import extend_inputs, retro_inputs
from ralm.methods.peft.registry import Injection, get_peft_method
from ralm.methods.retro.model import RetroFit
from ralm.utils.tensors import load_into, write_safetensors

WEIGHTS = "peft.safetensors"  # the name a run folder gives the file (``save`` takes any path)
FORMAT, VERSION = "ralm-peft", "1"


@dataclass
class PeftHandle:
    model: nn.Module
    cfg: PeftConfig
    arch: str
    _injection: Injection = field(repr=False)
    _was_trainable: dict[str, bool] = field(repr=False)
    closed: bool = False  # merged or removed: the PEFT modules are gone

    # ---- what was added ---------------------------------------------------------------------------------
    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def counts(self) -> dict[str, Any]:
        """Trained parameters, all parameters of the model with them, and the trained share in percent."""
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trained, "total": total, "percent": 100.0 * trained / total}

    # ---- forward -----------------------------------------------------------------------------------------
    @property
    def n_virtual(self) -> int:
        """Positions the method prepends to every input (0 but for the prompt methods)."""
        return self._injection.prompt.n if self._injection.prompt is not None else 0

    @property
    def prompt(self) -> nn.Module | None:
        """The virtual-token module of the prompt methods (``forward(batch) -> (B, N, d)``), else None: for a
        caller that builds its own input embeddings (``retroprompt.PromptModel(virtual=...)``)."""
        return self._injection.prompt

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, neighbours: torch.Tensor | None = None,
               offset: int = 0) -> dict[str, Any]:
        """The keywords of ``model(**kw)`` for this batch: as given, or with the virtual tokens prepended
        (N more positions; labels -100 there). ``neighbours`` / ``offset``: RETRO-fit's (see RetroFit)."""
        prompt = self._injection.prompt
        if prompt is None:
            kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            if isinstance(self.model, RetroFit):
                kw.update(neighbours=neighbours, offset=offset)
            return kw
        if isinstance(self.model, RetroFit):
            return retro_inputs(prompt, self.model, input_ids, neighbours, offset, attention_mask, labels)
        embeds, mask, lab = extend_inputs(prompt, self.model.get_input_embeddings(), input_ids, attention_mask,
                                          labels)
        return {"inputs_embeds": embeds, "attention_mask": mask, "labels": lab}

    def strip(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N+L, V) logits -> (B, L, V): those of the real positions."""
        return logits[:, self.n_virtual:]

    # ---- merge / remove ----------------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Fold the update into the base weights (LoRA) and return the model without PEFT modules."""
        if self._injection.merge is None:
            raise RalmError(f"--peft {self.cfg.method}: only LoRA merges into the base weights")
        self._live()
        self.closed = True
        return self._injection.merge()

    def remove(self) -> nn.Module:
        """Take the PEFT modules out again; the model is as before ``apply_peft`` (trainable flags included)."""
        self._live()
        self._injection.remove()
        self.closed = True
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._was_trainable.get(n, False))
        return self.model

    def _live(self) -> None:
        if self.closed:
            raise RalmError("these PEFT modules were merged or removed already")

    # ---- weights -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, path: str | Path) -> None:
        self._live()
        write_safetensors(Path(path), self.state_dict(), {"format": FORMAT, "version": VERSION, "arch": self.arch,
                                                          "peft": json.dumps(asdict(self.cfg))})

    def load(self, path: str | Path) -> None:
        """Copy saved PEFT weights in; refuses another method, arch, config or layout (one line)."""
        self._live()
        cfg, arch = read_peft_header(path)
        if (cfg, arch) != (self.cfg, self.arch):
            raise RalmError(f"{path}: PEFT weights of --peft {cfg.method} --arch {arch} with other settings than "
                            f"this model's (--peft {self.cfg.method} --arch {self.arch})")
        load_into(path, {n: p for n, p in self.model.named_parameters() if p.requires_grad})

def read_peft_header(path: str | Path) -> tuple[PeftConfig, str]:
    """The (config, arch) a PEFT weights file was saved with, to rebuild its model before ``load``."""
    path = Path(path)
    if not path.is_file():
        raise RalmError(f"{path}: no PEFT weights file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise RalmError(f"{path}: not a safetensors file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RalmError(f"{path}: not a ralm PEFT weights file (format {FORMAT} version {VERSION})")
    try:
        return PeftConfig(**json.loads(meta["peft"])), meta["arch"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise RalmError(f"{path}: corrupt PEFT header ({e})") from None


def apply_peft(model: nn.Module, cfg: PeftConfig, arch: str) -> PeftHandle:
    """Freeze ``model``, inject ``cfg.method`` into the parts ``arch`` and the switches name, and return the
    handle; afterwards exactly the method's parameters require gradients (``full``: the parts' weights)."""
    if arch == "retro" and cfg.method == "lora" and cfg.lora_dropout > 0 and cfg.decoder:
        # RetroFit keeps its frozen decoder in eval mode (RetroFit.train), so dropout there would silently be off
        raise RalmError(f"--lora-dropout {cfg.lora_dropout:g}: the RETRO-fit decoder always runs in eval mode, so "
                        "its LoRA dropout would never apply; use --lora-dropout 0 or --no-peft-decoder with --arch retro")
    chosen = parts(model, cfg, arch)
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        injection = get_peft_method(cfg.method)(model, cfg, chosen)
    except BaseException:
        for n, p in model.named_parameters():
            p.requires_grad_(was.get(n, False))
        raise
    return PeftHandle(model, cfg, arch, injection, was)
