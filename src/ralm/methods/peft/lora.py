"""LoRA (Hu et al. 2021) through HF ``peft`` on any module: a plain HF LM or a whole RETRO-fit model.

``peft``'s ``LoraModel`` (what ``inject_adapter_in_model`` builds and drops) replaces each targeted linear
layer *in place*, so module paths do not change (no ``base_model.model.`` prefix: that comes with
``get_peft_model``'s wrapper, not used here) and the decoder layers RetroFit hooked stay the same objects,
their hooks firing as before. It is kept, because its ``merge_and_unload`` folds the update into the weights.
Targets are resolved here to full module names inside the parts switched on, so a suffix such as ``q`` can
never reach a part that is off.
"""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.lora import LoraModel
from torch import nn
from transformers.pytorch_utils import Conv1D

from ralm.errors import RalmError
from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.parts import Part, linears
from ralm.methods.peft.registry import Injection, register_peft_method

ADAPTER = "default"  # peft's adapter name: it appears in the parameter names (``lora_A.default.weight``)


def apply_lora(model: nn.Module, cfg: PeftConfig, parts: list[Part]) -> Injection:
    targets = [name for part in parts for name in linears(part, cfg.target_modules)]
    if not targets:
        where = ", ".join(p.name for p in parts)
        raise RalmError(f"--lora-targets {cfg.target_modules}: match no linear layer in the {where}")
    # GPT-2's projections are Conv1D (weights stored in x out): peft needs fan_in_fan_out for them (it would
    # switch it on itself, with a warning on every run)
    modules = dict(model.named_modules())
    conv1d = any(isinstance(modules[n], Conv1D) for n in targets)
    conf = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", fan_in_fan_out=conv1d)
    tuner = LoraModel(model, conf, ADAPTER)  # injects in place; only the lora_A / lora_B weights train

    def merge() -> nn.Module:
        return tuner.merge_and_unload()

    def remove() -> None:
        tuner.unload()

    return Injection(remove=remove, merge=merge)


register_peft_method("lora", apply_lora)
