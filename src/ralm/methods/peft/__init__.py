"""Parameter-efficient fine-tuning on a plain LM ("gpt") or a RETRO-fit model ("retro"): LoRA (HF peft),
bottleneck adapters (written here), prompt tuning and P-tuning (peft's prompt modules), full fine-tuning.

``apply_peft(model, PeftConfig(...), arch) -> PeftHandle``. Importing the package registers every method,
one module and one ``register_peft_method`` line each.
"""
# ruff: noqa: I001  (the registering modules first, the handle that looks them up last)

from ralm.methods.peft import lora, adapter, prompt, full  # noqa: F401  registers each method
from ralm.methods.peft.config import PeftConfig
from ralm.methods.peft.handle import WEIGHTS, PeftHandle, apply_peft, read_peft_header

__all__ = ["WEIGHTS", "PeftConfig", "PeftHandle", "apply_peft", "read_peft_header"]
