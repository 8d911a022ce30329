"""``ralm generate``: continue a prompt, the method retrieving as it goes.

The method comes from the registry (``Method.generate``: a step function from the tokens so far to the next
token's logits, recording its retrievals); ``method_names(generates=True)`` lists those that can. Each step
recomputes the window of the last ``context`` tokens (no KV cache): simple and exact, and cheap for the short
continuations this is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import ralm.methods  # noqa: F401  registers the built-in methods
from ralm.core.registry import get_method
from ralm.core.start_token import start_token_id
from ralm.errors import RalmError, refuse_below


@dataclass
class GenerateConfig:
    method: str = field(default="none", metadata={"help": "a method that generates (`ralm methods`)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; otherwise sample at this temperature"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    context: int = field(default=1024, metadata={"help": "tokens of the window each step reads"})
    stride: int = field(default=64, metadata={"help": "in-context: tokens between retrievals"})
    query_len: int = field(default=32, metadata={"help": "in-context: last tokens used as the query"})
    docs: int = field(default=1, metadata={"help": "in-context: passages prepended"})
    doc_tokens: int = field(default=256, metadata={"help": "in-context: each passage truncated to this"})
    checkpoint: str | None = field(default=None, metadata={"help": "retro: the RETRO-fit checkpoint folder"})
    datastore: str | None = field(default=None, metadata={"help": "retrieval store (retro defaults to its "
                                                                  "checkpoint's)"})

    def __post_init__(self) -> None:
        get_method(self.method, generates=True)
        refuse_below(self, ("max_new_tokens", "context", "stride", "query_len", "docs", "doc_tokens"))
        if self.temperature < 0:
            raise RalmError(f"--temperature {self.temperature}: must be >= 0")


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompt: str, cfg: GenerateConfig, ds: Any = None,
             retro: Any = None, state: Any = None) -> dict[str, Any]:
    """Continue ``prompt``; return the continuation, its token count and every retrieval made on the way.

    ``ds``: the retrieval store; ``state``: what the method's ``load_generation`` loaded (``retro``: its
    older name, a ``RetroFit`` whose ``model`` is the base).
    """
    method = get_method(cfg.method, generates=True)
    if method.store != "none" and ds is None:
        raise RalmError(f"--method {cfg.method} needs --datastore")
    step = method.generate(model, tokenizer, cfg, ds, state if state is not None else retro)

    bos = start_token_id(tokenizer)  # the start token plain text is scored after (eval-lm's too)
    ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RalmError("PROMPT: empty prompt and the tokenizer has no start (BOS) token to start from")
    n_prompt = len(ids)
    g = torch.Generator().manual_seed(cfg.seed)
    retrievals: list[dict[str, Any]] = []
    for _ in range(cfg.max_new_tokens):
        logits = step(ids, n_prompt, retrievals)
        if cfg.temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits.float().cpu() / cfg.temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=g))
        ids.append(nxt)
        if nxt == tokenizer.eos_token_id:
            break
    new = ids[n_prompt:]
    return {"method": cfg.method, "prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True),
            "new_tokens": len(new), "retrievals": retrievals}
