"""Where PEFT modules go: the parts of a plain LM ("gpt") or of a RETRO-fit model ("retro") and their sublayers.

A part is a module of the model: the decoder (the HF causal LM, ``RetroFit.base`` on retro), the retrieval
encoder (``RetroFit.encoder``) and the CCA blocks (``RetroFit.cca``). Inside each part the sublayers an
adapter follows, or whose projections LoRA adapts by default, are:

- decoder: each decoder layer's attention module (``self_attn`` / ``attn`` / ...) and its MLP;
- retrieval encoder: each layer's self- and cross-attention, and its feed-forward block;
- CCA: each block's cross-attention (before its RMS scaling, chunk mask and match gate, so the chunked
  causality and "no neighbour reads nothing" hold whatever the adapter learns); it has no MLP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ralm.errors import RalmError
from ralm.methods.peft.config import ARCHS, PeftConfig
from ralm.methods.retro.model import RetroFit, decoder_layers

ATTENTION = ("self_attn", "attn", "attention", "self_attention")  # Llama/Gemma, GPT-2, ...
MLP = ("mlp", "feed_forward", "ffn")
LINEAR = (nn.Linear, Conv1D)  # the layer kinds LoRA adapts here (GPT-2's projections are Conv1D)
SWITCHES = {"decoder": "--peft-decoder", "retrieval_encoder": "--peft-encoder", "cca": "--peft-cca"}


@dataclass
class Part:
    name: str  # "decoder" | "retrieval_encoder" | "cca"
    prefix: str  # its path in the model ("" for a plain LM, "base." / "encoder." / "cca." in a RetroFit)
    module: nn.Module


def parts(model: nn.Module, cfg: PeftConfig, arch: str) -> list[Part]:
    """The parts of ``model`` that receive PEFT modules, checked against the architecture and the switches."""
    if arch not in ARCHS:
        raise RalmError(f"--arch {arch!r}: unknown architecture (choose from {', '.join(ARCHS)})")
    off = [SWITCHES[s] for s in SWITCHES if not getattr(cfg, s)]
    if arch == "gpt":
        if isinstance(model, RetroFit):
            raise RalmError("--arch gpt: got a RETRO-fit model; pass the plain LM, or --arch retro")
        if off:
            raise RalmError(f"--no-{off[0][2:]}: only for --arch retro (a plain LM has one part, the decoder)")
        return [Part("decoder", "", model)]
    if not isinstance(model, RetroFit):
        raise RalmError(f"--arch retro: needs a RETRO-fit model, got {type(model).__name__}")
    if cfg.prompt_based and not cfg.decoder:
        raise RalmError(f"--peft {cfg.method} --no-peft-decoder: virtual tokens go into the decoder's input")
    chosen = [Part(name, prefix, module) for name, prefix, module in (
        ("decoder", "base.", model.base), ("retrieval_encoder", "encoder.", model.encoder), ("cca", "cca.", model.cca))
        if getattr(cfg, name)]
    if not chosen:
        raise RalmError(f"{' '.join('--no-' + f[2:] for f in off)}: --arch retro needs at least one part for PEFT")
    return chosen


def _child(module: nn.Module, names: tuple[str, ...], what: str, owner: str) -> nn.Module:
    for n in names:
        if isinstance(getattr(module, n, None), nn.Module):
            return getattr(module, n)
    raise RalmError(f"{owner}: cannot find the {what} module of its decoder layers (looked for {', '.join(names)})")


def sublayers(part: Part, kind: str) -> list[tuple[str, nn.Module]]:
    """(name in the model, module) of the part's attention (``kind="attn"``) or MLP (``"mlp"``) sublayers."""
    out: list[tuple[str, Any]] = []
    if part.name == "decoder":
        owner = type(part.module).__name__
        names = {id(m): n for n, m in part.module.named_modules()}
        for layer in decoder_layers(part.module):
            sub = _child(layer, ATTENTION if kind == "attn" else MLP, "attention" if kind == "attn" else "MLP", owner)
            out.append((part.prefix + names[id(sub)], sub))
    elif part.name == "retrieval_encoder":
        for i, layer in enumerate(part.module.layers):
            subs = ("self_attn", "cross_attn") if kind == "attn" else ("ffn",)
            out += [(f"{part.prefix}layers.{i}.{s}", getattr(layer, s)) for s in subs]
    elif kind == "attn":  # CCA blocks: their cross-attention only
        out += [(f"{part.prefix}{k}.attn", block.attn) for k, block in part.module.items()]
    return out


def width(part: Part) -> int:
    """The width of the part's residual stream: what its sublayers output and its adapters read."""
    if part.name == "decoder":
        return part.module.config.get_text_config().hidden_size
    if part.name == "retrieval_encoder":
        return part.module.cfg.enc_dim
    return next(iter(part.module.values())).attn.out.out_features  # CCA writes into the decoder's stream


def linears(part: Part, suffixes: list[str] | None) -> list[str]:
    """Names (in the model) of the part's linear layers LoRA adapts: those ending in one of ``suffixes``, or
    by default every linear layer inside the part's attention sublayers."""
    if suffixes is None:
        return [f"{name}.{n}" for name, sub in sublayers(part, "attn") for n, m in sub.named_modules()
                if isinstance(m, LINEAR)]
    return [part.prefix + n for n, m in part.module.named_modules()
            if isinstance(m, LINEAR) and any(n == s or n.endswith("." + s) for s in suffixes)]
