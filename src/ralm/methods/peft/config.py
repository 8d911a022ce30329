"""What a PEFT run injects: the method, its sizes, and (RETRO-fit) which parts receive it.

Validated on construction with one-line errors naming the flag, so ``ralm tune`` refuses a bad value before
any model loads. Checks that need the model (the context length, the parts of a RETRO-fit model, the
vocabulary) happen in ``apply_peft``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ralm.errors import RalmError

METHODS = ("lora", "adapter", "prompt", "ptuning", "full")  # the registry (registry.py) holds one apply per name
ARCHS = ("gpt", "retro")
WHERE = ("attn", "mlp", "both")
ENCODERS = ("mlp", "lstm")


@dataclass
class PeftConfig:
    method: str = field(default="lora", metadata={"flag": "--peft", "help": "parameter-efficient method: "
                                                  + ", ".join(METHODS) + " (full: every weight, the reference)"})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank r (the GPT-vs-RETRO NeMo configs: 32)"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha: the update is scaled by alpha / rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input while training"})
    target_modules: list[str] | None = field(default=None, metadata={
        "flag": "--lora-targets",
        "help": "module name suffixes LoRA adapts, within the parts switched on (default: every attention "
                "projection of the decoder; on --arch retro also the retrieval encoder's and the CCA's q, kv, out)"})
    adapter_dim: int = field(default=32, metadata={"help": "bottleneck width of each adapter"})
    adapter_where: str = field(default="both", metadata={
        "help": "adapters after each attention block, each MLP, or both (attn, mlp, both)"})
    n_virtual: int = field(default=16, metadata={"help": "virtual tokens prepended by prompt tuning and P-tuning"})
    prompt_init_ids: list[int] | None = field(default=None, metadata={
        "help": "comma-separated vocabulary ids whose embeddings start the prompt-tuning tokens, repeated to "
                "--n-virtual (default: random vocabulary tokens)"})
    ptuning_encoder: str = field(default="mlp", metadata={"help": "P-tuning prompt encoder: mlp or lstm"})
    ptuning_hidden: int | None = field(default=None, metadata={
        "help": "hidden width of the P-tuning prompt encoder (default: the model's width)"})
    decoder: bool = field(default=True, metadata={
        "flag": "--peft-decoder", "help": "--arch retro: PEFT modules in the frozen decoder (the base LM)"})
    retrieval_encoder: bool = field(default=True, metadata={
        "flag": "--peft-encoder", "help": "--arch retro: PEFT modules in the retrieval encoder"})
    cca: bool = field(default=True, metadata={
        "flag": "--peft-cca", "help": "--arch retro: PEFT modules in the chunked cross-attention blocks"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RalmError(f"--peft {self.method!r}: unknown method (choose from {', '.join(METHODS)})")
        if self.lora_rank < 1:
            raise RalmError(f"--lora-rank {self.lora_rank}: must be >= 1")
        if not self.lora_alpha > 0 or math.isinf(self.lora_alpha):  # `not > 0` refuses NaN too
            raise RalmError(f"--lora-alpha {self.lora_alpha}: must be a finite number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RalmError(f"--lora-dropout {self.lora_dropout}: must be in [0, 1)")
        if self.target_modules is not None:
            self.target_modules = [t.strip().strip(".") for t in self.target_modules]
            if not self.target_modules or not all(self.target_modules):
                raise RalmError(f"--lora-targets {self.target_modules}: give module name suffixes such as q_proj")
        if self.adapter_dim < 1:
            raise RalmError(f"--adapter-dim {self.adapter_dim}: must be >= 1")
        if self.adapter_where not in WHERE:
            raise RalmError(f"--adapter-where {self.adapter_where!r}: choose from {', '.join(WHERE)}")
        if self.n_virtual < 1:
            raise RalmError(f"--n-virtual {self.n_virtual}: must be >= 1")
        if self.prompt_init_ids is not None:
            self.prompt_init_ids = [int(i) for i in self.prompt_init_ids]
            if not self.prompt_init_ids or min(self.prompt_init_ids) < 0:
                raise RalmError(f"--prompt-init-ids {self.prompt_init_ids}: need vocabulary ids >= 0")
        if self.ptuning_encoder not in ENCODERS:
            raise RalmError(f"--ptuning-encoder {self.ptuning_encoder!r}: choose from {', '.join(ENCODERS)}")
        if self.ptuning_hidden is not None and self.ptuning_hidden < 1:
            raise RalmError(f"--ptuning-hidden {self.ptuning_hidden}: must be >= 1")

    @property
    def prompt_based(self) -> bool:
        """The method prepends virtual tokens (and so changes the inputs, not the modules)."""
        return self.method in ("prompt", "ptuning")
