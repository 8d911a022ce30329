"""Full fine-tuning, the upper reference: every weight of the parts switched on trains (a plain LM: all of it;
a RETRO-fit model: the base LM and the encoder and CCA layers). Nothing is injected."""

from __future__ import annotations

from torch import nn

from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.parts import Part
from ralm.methods.peft.registry import Injection, register_peft_method


def apply_full(model: nn.Module, cfg: PeftConfig, parts: list[Part]) -> Injection:
    for part in parts:
        for p in part.module.parameters():
            p.requires_grad_(True)
    return Injection(remove=lambda: None)


register_peft_method("full", apply_full)
