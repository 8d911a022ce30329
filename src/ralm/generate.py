"""``ralm generate``: continue a prompt with retrieval at every chunk boundary.

- ``retro``: a RETRO-fit checkpoint. Whenever the text completes a chunk of m tokens (on RETRO's grid, the start
  token included), that chunk's text retrieves its neighbours; the tokens after it read them through CCA.
- ``in-context``: every ``stride`` tokens (and once for the prompt) the last ``query_len`` tokens retrieve
  the top passages, which are prepended to the context of what follows.
- ``none``: the plain LM, for comparison.

Each step recomputes the window of the last ``context`` tokens (no KV cache): simple and exact, and cheap
for the short continuations this is for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ralm.core.start_token import start_token_id
from ralm.errors import RalmError
from ralm.methods.in_context import block_input
from ralm.methods.retro.model import PAD, pad_neighbours
from ralm.methods.retro.neighbours import window_neighbours

GEN_METHODS = ("none", "in-context", "retro")


@dataclass
class GenerateConfig:
    method: str = field(default="none", metadata={"help": "none, in-context or retro"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; otherwise sample at this temperature"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    context: int = field(default=1024, metadata={"help": "tokens of the window each step reads"})
    stride: int = field(default=64, metadata={"help": "in-context: tokens between retrievals"})
    query_len: int = field(default=32, metadata={"help": "in-context: last tokens used as the query"})
    docs: int = field(default=1, metadata={"help": "in-context: passages prepended"})
    doc_tokens: int = field(default=256, metadata={"help": "in-context: each passage truncated to this"})

    def __post_init__(self) -> None:
        if self.method not in GEN_METHODS:
            raise RalmError(f"--method {self.method!r}: expected one of {', '.join(GEN_METHODS)}")
        for name in ("max_new_tokens", "context", "stride", "query_len", "docs", "doc_tokens"):
            if getattr(self, name) < 1:
                raise RalmError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.temperature < 0:
            raise RalmError(f"--temperature {self.temperature}: must be >= 0")


def _hits(ds: Any, query: str, k: int) -> list[dict[str, Any]]:
    """Top-k chunks for one query: LM tokens (chunk + continuation), doc id, score, text."""
    out = []
    for h in ds.search([query], k=min(k, len(ds)))[0]:
        rec = ds.chunk(h.row)
        out.append({"doc_id": h.doc_id, "score": round(h.score, 4), "text": h.text + h.continuation,
                    "tokens": list(rec["tokens"]) + list(rec["continuation"])})
    return out


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompt: str, cfg: GenerateConfig, ds: Any = None,
             retro: Any = None) -> dict[str, Any]:
    """Continue ``prompt``; return the continuation, its token count and every retrieval made on the way.

    ``retro``: a ``RetroFit`` model (method retro; ``model`` is then its base); ``ds``: the retrieval store.
    """
    if cfg.method != "none" and ds is None:
        raise RalmError(f"--method {cfg.method} needs --datastore")
    if cfg.method == "retro" and retro is None:
        raise RalmError("--method retro needs --checkpoint")
    device = next(model.parameters()).device

    bos = start_token_id(tokenizer)  # the start token plain text is scored after (eval-lm's too)
    ids = ([bos] if bos is not None else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RalmError("PROMPT: empty prompt and the tokenizer has no start (BOS) token to start from")
    n_prompt = len(ids)
    g = torch.Generator().manual_seed(cfg.seed)
    retrievals: list[dict[str, Any]] = []
    special = set(tokenizer.all_special_ids)
    m = retro.cfg.chunk_size if retro is not None else cfg.stride
    chunk_nb: list[torch.Tensor] = []  # retro: (K, R) neighbours of each whole chunk so far
    passage: list[int] = []
    for _ in range(cfg.max_new_tokens):
        n = len(ids)
        t = torch.tensor(ids, dtype=torch.long)
        if cfg.method == "retro":
            while len(chunk_nb) < n // m:  # a chunk was completed: retrieve its neighbours
                u = len(chunk_nb)
                text = tokenizer.decode([i for i in ids[u * m:(u + 1) * m] if i not in special])
                hits = _hits(ds, text, retro.cfg.neighbours)
                chunk_nb.append(pad_neighbours([[h["tokens"] for h in hits]], retro.cfg.neighbours,
                                               retro.cfg.neighbour_len)[0])
                retrievals.append({"position": (u + 1) * m, "query": text,
                                   "neighbours": [{k: v for k, v in h.items() if k != "tokens"} for h in hits]})
            begin = max(0, n - cfg.context)
            inp = t[begin:].unsqueeze(0).to(device)
            nbs = torch.stack(chunk_nb) if chunk_nb else torch.full((0, retro.cfg.neighbours, 1), PAD)
            win = window_neighbours(nbs, begin, n - begin, m).unsqueeze(0)
            logits = retro(inp, neighbours=win, offset=begin, logits_to_keep=1).logits[0, -1]
        else:
            if cfg.method == "in-context" and (n - n_prompt) % cfg.stride == 0:
                query = tokenizer.decode([i for i in ids[max(0, n - cfg.query_len):] if i not in special])
                hits = _hits(ds, query, cfg.docs)
                passage = [tok for h in hits for tok in h["tokens"][: cfg.doc_tokens]]
                retrievals.append({"position": n, "query": query,
                                   "neighbours": [{k: v for k, v in h.items() if k != "tokens"} for h in hits]})
            inp = block_input(t, n - 1, n, passage, cfg.context, bos).unsqueeze(0).to(device)
            logits = model(input_ids=inp, logits_to_keep=1).logits[0, -1]
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
