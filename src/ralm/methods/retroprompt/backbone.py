"""What the RetroPrompt trainer trains: a backbone turning labelled examples into class log-probabilities and a
representation (the ``Backbone`` protocol), and the text one, ``TextBackbone``, over a ``PromptModel``.

The trainer (``ralm.tuning.retroprompt``) only calls the protocol, so a vision backbone (frozen image
features through a trained head, ``vision.py``) plugs into the same store, loss, interpolation and
demonstrations. ``represent`` is what the knowledge store keys on and every search queries with: prompts
WITHOUT demonstrations, in eval mode (no dropout), without gradient.

Which LM weights train is a PEFT choice (``ralm.methods.peft``): ``full`` (prompt-based fine-tuning of every
weight, as the paper), ``lora``, ``adapter``, or the prompt methods (``prompt``, ``ptuning``), whose virtual
tokens ``PromptModel`` puts in front of every prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError
from ralm.methods.peft import PeftConfig, PeftHandle, apply_peft
from ralm.methods.retroprompt.prompt import PromptConfig, PromptModel, PromptOutput
from ralm.utils.tensors import load_into, write_safetensors

FORMAT = "ralm-retroprompt-weights"


class Backbone(Protocol):
    classes: tuple[str, ...]  # class names, label-index order

    @property
    def n_classes(self) -> int: ...

    def represent(self, examples: Sequence[LabelledExample], batch_size: int = 16) -> torch.Tensor:
        """(n, d) float32 representations WITHOUT demonstrations, no grad, eval-mode (store keys and queries)."""
        ...

    def forward(self, examples: Sequence[LabelledExample], demo_vectors: torch.Tensor | None) -> PromptOutput:
        """PromptOutput(class_logits (B, C) log p_model, reps (B, d)); demo_vectors (B, C, d) or None."""
        ...

    def module(self) -> nn.Module:
        """The nn.Module holding every trained parameter (requires_grad True exactly on what trains)."""
        ...


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block, back to its own mode after (the trainer calls it mid-step)."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def trained(backbone: Backbone) -> dict[str, nn.Parameter]:
    """The backbone's trained parameters by name (``--peft full``: every LM weight; else the PEFT ones)."""
    return {n: p for n, p in backbone.module().named_parameters() if p.requires_grad}


def save_trained(backbone: Backbone, path: Path) -> None:
    """Write the trained parameters (and nothing frozen) to ``path`` (safetensors)."""
    write_safetensors(path, {n: p.detach() for n, p in trained(backbone).items()}, {"format": FORMAT})


def load_trained(backbone: Backbone, path: Path) -> None:
    """Copy ``save_trained``'s parameters back in; refuses a file of another layout (one line)."""
    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise RalmError(f"{path}: not a RetroPrompt weights file")
        load_into(path, trained(backbone))
    except (SafetensorError, OSError) as e:
        raise RalmError(f"{path}: not readable ({str(e).splitlines()[0]})") from None

def label_indices(backbone: Backbone, examples: Sequence[LabelledExample]) -> torch.Tensor:
    """(n,) int64 class index of each example's label; a label outside the classes is refused (one line)."""
    index = {c: i for i, c in enumerate(backbone.classes)}
    if bad := [e for e in examples if e.label not in index]:
        raise RalmError(f"example {bad[0].id}: label {bad[0].label!r} is missing from the classes "
                        f"({', '.join(backbone.classes)})")
    return torch.tensor([index[e.label] for e in examples], dtype=torch.long)


class TextBackbone:
    """A causal LM with a template and verbalizer (``PromptModel``) and the PEFT method that trains it."""

    def __init__(self, prompt_model: PromptModel, handle: PeftHandle):
        self.pm, self.handle = prompt_model, handle
        self.classes = prompt_model.verbalizer.classes

    @classmethod
    def build(cls, model: Any, tokenizer: Any, prompt: PromptConfig, peft: PeftConfig) -> TextBackbone:
        """Freeze ``model``, inject ``peft`` (seed torch first: it initialises LoRA / the virtual tokens) and
        wrap it; the model stays on its device."""
        device = next(model.parameters()).device
        handle = apply_peft(model, peft, "gpt")
        model.to(device)  # what the method added (virtual tokens, LoRA) is made on the CPU
        return cls(PromptModel(model, tokenizer, prompt, virtual=handle.prompt), handle)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def module(self) -> nn.Module:
        return self.pm.model  # the virtual tokens are a child of the model (peft.prompt.CHILD)

    def label_index(self, example: LabelledExample) -> int:
        return self.pm.verbalizer.label_index(example.label)

    def represent(self, examples: Sequence[LabelledExample], batch_size: int = 16) -> torch.Tensor:
        with eval_mode(self.module()):
            return self.pm.represent([_text(e) for e in examples], batch_size)  # (n, d)

    def forward(self, examples: Sequence[LabelledExample], demo_vectors: torch.Tensor | None) -> PromptOutput:
        batch = self.pm.batch([_text(e) for e in examples], demos=demo_vectors is not None)
        return self.pm.forward(batch, demo_vectors)


def _text(e: LabelledExample) -> str:
    if e.image is not None:
        raise RalmError(f"example {e.id}: an image; the text backbone reads texts")
    return e.text
