"""Bottleneck adapters (Houlsby et al. 2019), written here: HF ``peft`` has none (its issue #244) and the
``adapters`` library pins transformers 4.x.

Each adapter follows one sublayer (``parts.sublayers``): the sublayer's output ``h`` (B, L, d) becomes

    h + up(GELU(down(h)))        down: d -> adapter_dim, up: adapter_dim -> d, up zero-initialised

before the layer's own residual addition. It rides on a forward hook of the unmodified HF (or RETRO-fit)
module and sits in it as the child ``ralm_adapter`` (so ``named_parameters`` names it where it acts, and
``.to(device)`` moves it); ``remove`` takes both away again. Up starts at zero, so an untrained adapter adds
exactly zero: the model's logits bit for bit. The adapter keeps fp32 weights whatever the model's dtype and
casts its input, then its output back.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ralm.errors import RalmError
from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.parts import Part, sublayers, width
from ralm.methods.peft.registry import Injection, register_peft_method

CHILD = "ralm_adapter"


class Bottleneck(nn.Module):
    def __init__(self, d: int, dim: int):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(d, dim), nn.GELU(), nn.Linear(dim, d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _hook(module: nn.Module, args: Any, output: Any) -> Any:
    adapter = getattr(module, CHILD)
    if isinstance(output, tuple):  # attention modules return (output, attention weights, ...)
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def apply_adapter(model: nn.Module, cfg: PeftConfig, parts: list[Part]) -> Injection:
    kinds = ("attn", "mlp") if cfg.adapter_where == "both" else (cfg.adapter_where,)
    targets = [(*t, width(part)) for part in parts for kind in kinds for t in sublayers(part, kind)]
    if not targets:
        raise RalmError(f"--adapter-where {cfg.adapter_where}: the {', '.join(p.name for p in parts)} "
                        "have no such sublayer (CCA blocks have no MLP)")
    handles = []
    for name, module, d in targets:
        if hasattr(module, CHILD):
            raise RalmError(f"{name}: already holds an adapter")
        module.add_module(CHILD, Bottleneck(d, cfg.adapter_dim).to(next(module.parameters()).device))
        handles.append(module.register_forward_hook(_hook))

    def remove() -> None:
        for h in handles:
            h.remove()
        for _, module, _ in targets:
            delattr(module, CHILD)

    return Injection(remove=remove)


register_peft_method("adapter", apply_adapter)
