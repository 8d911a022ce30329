"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): N virtual tokens before the input.

The virtual tokens come from HF ``peft``'s own modules, used standalone (its ``get_peft_model`` route needs an
HF model, and a RETRO-fit model is not one): ``PromptEmbedding`` (prompt tuning: N embeddings, started from
the embeddings of random or given vocabulary tokens) and ``PromptEncoder`` (P-tuning: an MLP, or a
bidirectional LSTM and an MLP, over N learned inputs). ``VirtualTokens`` turns either into
``forward(batch) -> (B, N, d)``; ``extend_inputs`` prepends them to the input's embeddings.

RETRO-fit: chunks sit on a grid of absolute positions, and N tokens before the window would move every chunk.
Instead the window is given the offset ``offset - N``: the virtual tokens occupy the N absolute positions
before the window, so the real tokens keep their absolute positions and their chunks, any N. Whole chunks
the virtual tokens create (wholly or partly virtual) get no neighbour (PAD), and their tokens are PAD for the
match gate, so every real position reads exactly the neighbours it read without the prompt
(``retro_inputs``; tested in ``tests/test_peft.py``). The decoder's own positions do shift by N, as in any
prompt tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit
from peft.tuners.p_tuning import PromptEncoder
from peft.tuners.prompt_tuning import PromptEmbedding
from torch import nn

from ralm.errors import RalmError
from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.parts import Part
from ralm.methods.peft.registry import Injection, register_peft_method
from ralm.methods.retro.model import PAD, RetroFit, window_chunks

CHILD = "ralm_prompt"
IGNORE = -100  # the label HF causal LMs leave out of the loss


class VirtualTokens(nn.Module):
    """N virtual-token embeddings from ``encoder`` (indices (B, N) -> (B, N, d)); ``context``: the model's."""

    def __init__(self, encoder: nn.Module, n: int, context: int):
        super().__init__()
        self.encoder, self.n, self.context = encoder, n, context
        self.register_buffer("index", torch.arange(n), persistent=False)

    def forward(self, batch: int) -> torch.Tensor:
        return self.encoder(self.index.expand(batch, -1))  # (B, N, d)


def extend_inputs(prompt: VirtualTokens, embed: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids (B, L), mask (B, L), labels (B, L)) -> (inputs_embeds (B, N+L, d), mask (B, N+L) with the
    virtual positions attended, labels (B, N+L) with -100 on them); None stays None. Pad on the right."""
    B, L = input_ids.shape
    if prompt.n + L > prompt.context:
        raise RalmError(f"--n-virtual {prompt.n}: with {L} input tokens that exceeds the model's context of "
                        f"{prompt.context} positions")
    x = embed(input_ids)  # (B, L, d), with the model's own embedding scale (Gemma 3 multiplies by sqrt(d))
    v = prompt(B).to(device=x.device, dtype=x.dtype)  # (B, N, d)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(B, prompt.n), attention_mask], 1)
    if labels is not None:
        labels = torch.cat([labels.new_full((B, prompt.n), IGNORE), labels], 1)
    return torch.cat([v, x], 1), attention_mask, labels


def retro_inputs(prompt: VirtualTokens, model: RetroFit, input_ids: torch.Tensor,
                 neighbours: torch.Tensor | None = None, offset: int = 0, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> dict[str, Any]:
    """``model(**retro_inputs(...))`` for a RETRO-fit model: ``extend_inputs`` plus the neighbours of the chunks
    the virtual tokens add (PAD, in front) and the window's offset moved back by N (see the module's note)."""
    embeds, mask, lab = extend_inputs(prompt, model.base.get_input_embeddings(), input_ids, attention_mask, labels)
    B, L = input_ids.shape
    n = prompt.n
    ids = torch.cat([input_ids.new_full((B, n), PAD), input_ids], 1)  # shapes and the match gate's tokens only
    out: dict[str, Any] = {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask, "labels": lab}
    if neighbours is not None:
        m = model.cfg.chunk_size
        extra = window_chunks(offset - n, n + L, m)[2] - window_chunks(offset, L, m)[2]
        pad = neighbours.new_full((B, extra, *neighbours.shape[2:]), PAD)  # the same last chunk: added in front
        out.update(neighbours=torch.cat([pad, neighbours], 1), offset=offset - n)
    return out


def _context(decoder: nn.Module) -> int:
    return getattr(decoder.config.get_text_config(), "max_position_embeddings", None) or 2048


def _prompt_tuning(cfg: PeftConfig, embed: nn.Embedding, d: int) -> nn.Module:
    init = PromptTuningInit.SAMPLE_VOCAB if cfg.prompt_init_ids is None else PromptTuningInit.RANDOM
    enc = PromptEmbedding(PromptTuningConfig(num_virtual_tokens=cfg.n_virtual, token_dim=d,
                                             num_transformer_submodules=1, prompt_tuning_init=init), embed)
    if cfg.prompt_init_ids is not None:
        vocab = embed.num_embeddings
        if max(cfg.prompt_init_ids) >= vocab:
            raise RalmError(f"--prompt-init-ids {cfg.prompt_init_ids}: the vocabulary has {vocab} ids")
        ids = torch.tensor(cfg.prompt_init_ids).repeat(cfg.n_virtual // len(cfg.prompt_init_ids) + 1)[:cfg.n_virtual]
        with torch.no_grad():
            enc.embedding.weight.copy_(embed(ids.to(embed.weight.device)).float())
    return enc


def _p_tuning(cfg: PeftConfig, d: int) -> nn.Module:
    return PromptEncoder(PromptEncoderConfig(num_virtual_tokens=cfg.n_virtual, token_dim=d,
                                             num_transformer_submodules=1, inference_mode=False,
                                             encoder_reparameterization_type=cfg.ptuning_encoder.upper(),
                                             encoder_hidden_size=cfg.ptuning_hidden or d))


def apply_prompt(model: nn.Module, cfg: PeftConfig, parts: list[Part]) -> Injection:
    decoder = next(p.module for p in parts if p.name == "decoder")  # parts() refuses prompt methods without it
    context = _context(decoder)
    if cfg.n_virtual >= context:
        raise RalmError(f"--n-virtual {cfg.n_virtual}: the model's context holds {context} positions, "
                        "which leaves no room for the input")
    embed = decoder.get_input_embeddings()
    d = decoder.config.get_text_config().hidden_size
    enc = _prompt_tuning(cfg, embed, d) if cfg.method == "prompt" else _p_tuning(cfg, d)
    prompt = VirtualTokens(enc, cfg.n_virtual, context).to(embed.weight.device)
    model.add_module(CHILD, prompt)
    return Injection(remove=lambda: delattr(model, CHILD), prompt=prompt)


register_peft_method("prompt", apply_prompt)
register_peft_method("ptuning", apply_prompt)
