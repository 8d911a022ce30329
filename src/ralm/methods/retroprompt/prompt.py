"""Prompt learning with a causal LM: a template, a verbalizer, p_model over the classes and the representation.

A template turns an example's text into a prompt that ends where the label word comes next
(``"Review: {text} It was"``); the verbalizer maps each class to one or more label words. At the prompt's last
position::

    p_model(y) = Σ_{w ∈ words(y)} softmax_{w' ∈ all label words}(logit_w')      (class_logits = log of it)
    rep        = the LM head's input there (the final hidden state, ``ralm.lm.hidden.head_inputs``)

A label word is scored by its FIRST token (with ``label_prefix``, a space by default, before it): a word of
several tokens is allowed, and two label words whose first tokens coincide are refused (they could not be
told apart). The reference (RoBERTa, one mask) sums a multi-token word's logits; a causal LM predicts only the
first token at that position.

Neural demonstrations (``demos.py``) add, after the start token and before the prompt, one block per class:
``[placeholder][that class's label word]``; the placeholder's input embedding is overwritten by the class's
demonstration vector (the reference puts ``[placeholder, label word]`` pairs after the input; a causal LM
must read them before the position it predicts from). ``demo_norm="embedding"`` rescales each to the mean
norm of the input embedding rows first (the reference writes the representation as it is: ``raw``).

Batches pad on the left (default: every row's prediction is the last column) or on the right (each row's
last real token is gathered); positions are counted from each row's first real token, so a row's output does
not depend on its batch.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ralm.core.start_token import start_token_id
from ralm.errors import RalmError
from ralm.lm.hidden import head_inputs

DEMO_NORMS = ("raw", "embedding")  # how a neural demonstration enters the input (PromptConfig.demo_norm)


@dataclass
class PromptConfig:
    template: str = field(default="{text} It was", metadata={
        "help": "prompt with a {text} slot, ending where the label word comes next"})
    verbalizer: list[str] = field(default_factory=lambda: ["0=terrible", "1=great"], metadata={
        "help": "class=word (several words: class=word1|word2), repeatable; the label words come after the prompt"})
    label_prefix: str = field(default=" ", metadata={"help": "text put before each label word when it is tokenized"})
    max_tokens: int = field(default=256, metadata={"help": "longest prompt in tokens (longer texts are cut)"})
    demo_norm: str = field(default="raw", metadata={
        "help": "neural demonstrations enter the input as the representations are (raw, the reference's) or "
                "rescaled to the mean norm of the input embedding rows (embedding)"})

    def __post_init__(self) -> None:
        try:
            slots = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as e:
            raise RalmError(f"--template {self.template!r}: {e}") from None
        if slots != ["text"]:
            raise RalmError(f"--template {self.template!r}: needs exactly one {{text}} slot and no other "
                            f"{{...}} field (found {slots or 'none'})")
        if self.max_tokens < 2:
            raise RalmError(f"--max-tokens {self.max_tokens}: must be >= 2")
        if self.demo_norm not in DEMO_NORMS:
            raise RalmError(f"--demo-norm {self.demo_norm!r}: choose {' or '.join(DEMO_NORMS)}")
        self.words  # noqa: B018  (parses and checks the verbalizer)

    @property
    def words(self) -> dict[str, tuple[str, ...]]:
        """class -> its label words, in the order given (the order of the classes)."""
        out: dict[str, tuple[str, ...]] = {}
        for entry in self.verbalizer:
            cls, sep, words = entry.partition("=")
            ws = tuple(w.strip() for w in words.split("|"))
            if not sep or not cls.strip() or not all(ws):
                raise RalmError(f"--verbalizer {entry!r}: expected class=word or class=word1|word2")
            if cls.strip() in out:
                raise RalmError(f"--verbalizer {entry!r}: class {cls.strip()!r} given twice")
            out[cls.strip()] = ws
        if len(out) < 2:
            raise RalmError(f"--verbalizer {self.verbalizer!r}: needs at least two classes")
        seen: dict[str, str] = {}
        for cls, ws in out.items():
            for w in ws:
                if w in seen:
                    raise RalmError(f"--verbalizer: label word {w!r} is given for {seen[w]!r} and {cls!r}")
                seen[w] = cls
        return out


@dataclass(frozen=True)
class Verbalizer:
    """The classes (in order) and the first token id of every label word, with the class each belongs to."""

    classes: tuple[str, ...]
    token_ids: tuple[int, ...]  # (W,) one per label word
    word_class: tuple[int, ...]  # (W,) class index of each label word

    @classmethod
    def build(cls, config: PromptConfig, tokenizer: Any) -> Verbalizer:
        words = config.words
        ids: list[int] = []
        owner: list[int] = []
        first_of: dict[int, str] = {}
        for c, (name, ws) in enumerate(words.items()):
            for w in ws:
                toks = tokenizer.encode(config.label_prefix + w, add_special_tokens=False)
                if not toks:
                    raise RalmError(f"--verbalizer: label word {w!r} of class {name!r} has no token")
                if toks[0] in first_of:
                    raise RalmError(f"--verbalizer: label words {first_of[toks[0]]!r} and {w!r} start with the "
                                    f"same token {tokenizer.convert_ids_to_tokens(toks[0])!r} (a word is scored "
                                    "by its first token)")
                first_of[toks[0]] = w
                ids.append(toks[0])
                owner.append(c)
        return cls(tuple(words), tuple(ids), tuple(owner))

    def label_index(self, label: Any) -> int:
        """The class index of a label as the data gives it (a class name, or an int/bool written the same)."""
        key = str(label).strip()
        try:
            return self.classes.index(key)
        except ValueError:
            raise RalmError(f"label {label!r} is missing from --verbalizer (classes: {', '.join(self.classes)})"
                            ) from None

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, V) next-token logits -> (B, C) float32 log p_model(class) (log-softmax over the label words,
        summed in probability per class)."""
        ids = torch.tensor(self.token_ids, device=logits.device)
        logp = torch.log_softmax(logits.float()[:, ids], dim=-1)  # (B, W)
        if len(self.token_ids) == len(self.classes):  # one word per class, in class order: no sum needed
            return logp
        owner = torch.tensor(self.word_class, device=logits.device)
        out = logp.new_full((logp.shape[0], len(self.classes)), float("-inf"))
        for c in range(len(self.classes)):
            out[:, c] = torch.logsumexp(logp[:, owner == c], dim=-1)
        return out


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L) counted from each row's first real token
    last: torch.Tensor  # (B,) the column whose next-token logits score the label words
    demo_slots: torch.Tensor | None  # (B, C) columns of the class placeholders; None without demonstrations


@dataclass
class PromptOutput:
    class_logits: torch.Tensor  # (B, C) float32 log p_model(y), differentiable
    reps: torch.Tensor  # (B, d) float32 representation at the prediction position, detached


class PromptModel:
    """A causal LM + tokenizer + prompt config: batches of texts -> p_model over the classes and representations.

    ``model`` may carry LoRA or adapters (``ralm.methods.peft.apply_peft``) as long as it takes ``inputs_embeds``
    and keeps its output embedding. ``virtual``: prompt tuning / P-tuning's virtual tokens (a module with ``n``
    and ``forward(batch) -> (B, N, d)``, ``ralm.methods.peft.prompt.VirtualTokens``), put before every row
    (before its left padding) at positions 0..N-1. Gradients flow through ``class_logits`` only (``reps`` is
    detached: the store, p_kNN and the demonstrations are read without gradient, as in the reference).
    """

    def __init__(self, model: Any, tokenizer: Any, config: PromptConfig, virtual: Any | None = None):
        self.model, self.tokenizer, self.config, self.virtual = model, tokenizer, config, virtual
        self.verbalizer = Verbalizer.build(config, tokenizer)
        self.start = start_token_id(tokenizer)
        self.placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limit = getattr(model.config, "max_position_embeddings", None)
        n_virtual = virtual.n if virtual is not None else 0
        self.max_tokens = min(config.max_tokens, limit - n_virtual) if limit else config.max_tokens
        self._head, tail = config.template.split("{text}")  # head + text are tokenized together (BPE merges)
        self._tail = tokenizer.encode(tail, add_special_tokens=False) if tail else []
        # a pre-norm causal LM's head inputs are far longer than its token embeddings (SmolLM2-135M: ~41 vs ~3);
        # RoBERTa's, the reference's, are comparable. The target norm is taken once, at load.
        self._embed_norm = float(model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())

    @property
    def n_classes(self) -> int:
        return len(self.verbalizer.classes)

    def _demo_block(self) -> tuple[list[int], list[int]]:
        """Tokens of the demonstration blocks and the offsets of the placeholders within them."""
        ids: list[int] = []
        slots: list[int] = []
        for c in range(self.n_classes):
            slots.append(len(ids))
            ids += [self.placeholder, self.verbalizer.token_ids[self.verbalizer.word_class.index(c)]]
        return ids, slots

    def encode(self, text: str, demos: bool = False) -> tuple[list[int], list[int]]:
        """One prompt's token ids (start token first) and its placeholder columns ([] without demos). A long
        text is cut from its end, keeping the template's ending (where the label word comes next)."""
        prefix = [self.start] if self.start is not None else []
        block, slots = self._demo_block() if demos else ([], [])
        budget = self.max_tokens - len(prefix) - len(block) - len(self._tail)
        if budget < 1:
            raise RalmError(f"--max-tokens {self.max_tokens}: leaves no room for the text after the template "
                            f"and {'demonstrations' if demos else 'start token'}")
        head = self.tokenizer.encode(self._head + text, add_special_tokens=False)
        ids = prefix + block + head[:budget] + self._tail
        return ids, [len(prefix) + s for s in slots]

    def batch(self, texts: Sequence[str], demos: bool = False, padding_side: str = "left") -> PromptBatch:
        if padding_side not in ("left", "right"):
            raise RalmError(f"padding side {padding_side!r}: choose left or right")
        if not texts:
            raise RalmError("prompt batch: no texts")
        rows = [self.encode(t, demos) for t in texts]
        width = max(len(r) for r, _ in rows)
        B = len(rows)
        ids = torch.full((B, width), self.placeholder, dtype=torch.long)
        mask = torch.zeros(B, width, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.long)
        slots = torch.zeros(B, self.n_classes, dtype=torch.long) if demos else None
        for i, (r, s) in enumerate(rows):
            start = width - len(r) if padding_side == "left" else 0
            ids[i, start:start + len(r)] = torch.tensor(r)
            mask[i, start:start + len(r)] = 1
            last[i] = start + len(r) - 1
            if slots is not None:
                slots[i] = torch.tensor(s) + start
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        return PromptBatch(ids, mask, position_ids, last, slots)

    def forward(self, batch: PromptBatch, demo_vectors: torch.Tensor | None = None) -> PromptOutput:
        """``demo_vectors`` (B, C, d): one demonstration per class, written at the placeholders (the batch
        must be made with ``demos=True``, and the other way round)."""
        if (demo_vectors is None) != (batch.demo_slots is None):
            raise RalmError("neural demonstrations: give demonstration vectors exactly when the batch has "
                            "placeholders (batch(..., demos=True))")
        device = next(self.model.parameters()).device
        ids = batch.input_ids.to(device)
        embeds = self.model.get_input_embeddings()(ids)  # (B, L, d), with the model's own embedding scale
        if demo_vectors is not None:
            B, C = batch.demo_slots.shape
            if demo_vectors.shape[:2] != (B, C) or demo_vectors.shape[2] != embeds.shape[2]:
                raise RalmError(f"neural demonstrations: expected ({B}, {C}, {embeds.shape[2]}) vectors, got "
                                f"{tuple(demo_vectors.shape)}")
            if self.config.demo_norm == "embedding":  # a zero demonstration (no neighbour found) stays zero
                demo_vectors = demo_vectors * (self._embed_norm / demo_vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12))
            rows = torch.arange(B, device=device)[:, None].expand(B, C)
            embeds = embeds.index_put((rows, batch.demo_slots.to(device)),
                                      demo_vectors.to(device=device, dtype=embeds.dtype))
        mask, positions, last = (t.to(device) for t in (batch.attention_mask, batch.position_ids, batch.last))
        if self.virtual is not None:  # (B, N, d) in front; the real positions move up by N
            v = self.virtual(ids.shape[0]).to(device=device, dtype=embeds.dtype)
            n = v.shape[1]
            embeds = torch.cat([v, embeds], 1)
            mask = torch.cat([mask.new_ones(ids.shape[0], n), mask], 1)
            positions = torch.cat([torch.arange(n, device=device).expand(ids.shape[0], n), positions + n], 1)
            last = last + n
        left = bool((last == embeds.shape[1] - 1).all())
        with head_inputs(self.model) as seen:
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             logits_to_keep=1 if left else 0)
        rows = torch.arange(ids.shape[0], device=device)
        col = -1 if left else last
        logits = out.logits[rows, col]  # (B, V)
        reps = seen[-1][rows, col].float()  # (B, d)
        return PromptOutput(self.verbalizer.class_logits(logits), reps)

    @torch.no_grad()
    def represent(self, texts: Sequence[str], batch_size: int = 16,
                  demo_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d) float32 representations of ``texts`` (what the knowledge store keys on), without gradient, in
        the model's current mode (``eval()`` first: dropout would make the keys noisy); ``demo_vectors``
        (N, C, d) when the prompts carry demonstrations."""
        if batch_size < 1:
            raise RalmError(f"--batch-size {batch_size}: must be >= 1")
        out = []
        for b in range(0, len(texts), batch_size):
            demos = None if demo_vectors is None else demo_vectors[b:b + batch_size]
            batch = self.batch(texts[b:b + batch_size], demos=demos is not None)
            out.append(self.forward(batch, demos).reps.cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.get_input_embeddings().embedding_dim)
