"""Task examples -> model inputs for PEFT on both archs, with THE SAME retrieved chunks (issue 13).

Retrieval (``TaskRetrieval.rows``): the query is the question (QA, multiple choice) or ``"{aspect}: {title}"``
(summaries); the top ``docs`` rows come from the store through a ``StoreRetriever``. SQuAD searches its store of
paragraphs as it is; ACLSum searches a *restriction* of the store to the rows of the paper's own doc id (the
store is built from the ACLSum file, doc id = paper id), as the paper retrieves from a long document's own
chunks; multiple choice searches any store given, or none (no chunks). The row ids are what both archs read.
``wrap`` wraps every retriever it searches through, as ``MethodContext.wrap_retriever`` does for the LM
methods (the store ablations of ``ralm diagnose``); the encoder reads the rows' records from
``TaskRetrieval.store`` (the store, or the wrapper's payload view: ralm.core.retriever.payload_store).

Layout (``encode`` + ``collate``), one row per (example, target)::

    [left padding][prompt][target][right padding]          labels: -100 everywhere but the target

- gpt: the prompt carries the k chunks' texts (each cut to ``doc_tokens`` tokens), then the question or
  instruction; the target is the answer, the summary or a choice (+ EOS where the tokenizer has one).
- retro: the prompt carries no passages; the k chunks are the neighbours (chunk + continuation tokens,
  ``neighbour_len`` of them, PAD-padded as retro scoring pads them), read through CCA by every whole chunk of
  the window. The prompt is left-padded to a multiple of the chunk size m (at least m), so the target's first
  token is predicted from the last position of a whole chunk, the first that reads neighbours.

All rows of a batch share the prompt end ``P`` (left padding to the longest prompt), which also lets greedy
generation append one column per step for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ralm.core.retriever import Retriever, StoreRetriever, payload_store
from ralm.core.start_token import start_token_id
from ralm.data.tasks.base import ChoiceExample, QAExample, SummaryExample
from ralm.errors import RalmError
from ralm.methods.retro.model import PAD

IGNORE = -100
Example = QAExample | SummaryExample | ChoiceExample


def query(ex: Example) -> str:
    """What retrieval searches with: the question, or the aspect and the title of the paper."""
    if isinstance(ex, SummaryExample):
        return f"{ex.aspect}: {ex.title}"
    return ex.question


def instruction(ex: Example) -> str:
    """The text after the passages and before the target."""
    if isinstance(ex, SummaryExample):
        return f"Title: {ex.title}\nSummarize the {ex.aspect} of this paper.\nSummary:"
    return f"Question: {ex.question}\nAnswer:"


def targets(ex: Example) -> list[str]:
    """The training target (one), or for multiple choice every choice (scored; the true one trains)."""
    if isinstance(ex, QAExample):
        return [ex.answers[0]]
    if isinstance(ex, SummaryExample):
        return [ex.summary]
    return list(ex.choices)


def gold_target(ex: Example) -> str:
    return ex.choices[ex.label] if isinstance(ex, ChoiceExample) else targets(ex)[0]


class TaskRetrieval:
    """Top-``docs`` store rows per example (``ds`` None: no retrieval, every example gets no rows); ``wrap``:
    applied to each retriever it searches (one for the store, one per ACLSum paper's restriction)."""

    def __init__(self, ds: Any | None, docs: int, wrap: Callable[[Retriever], Retriever] | None = None):
        if docs < 0:
            raise RalmError(f"--docs {docs}: must be >= 0")
        self.ds, self.docs, self.wrap = ds, docs, wrap
        self._paper_rows: dict[str, np.ndarray] | None = None
        self.retriever = None if ds is None else self._retriever(ds)
        self.store = None if ds is None else payload_store(self.retriever, ds)  # what the encoder reads rows from

    def _retriever(self, store: Any) -> Retriever:
        r = StoreRetriever(store)
        return r if self.wrap is None else self.wrap(r)

    def rows(self, examples: Sequence[Example]) -> list[list[int]]:
        """The retrieved row ids per example, best first (what gpt puts in context and retro reads)."""
        if self.ds is None or self.docs == 0 or not examples:
            return [[] for _ in examples]
        if isinstance(examples[0], SummaryExample):
            return [self._own_rows(ex) for ex in examples]  # a search per paper: each its own restriction
        _, ids = self.retriever.search([query(e) for e in examples], min(self.docs, len(self.ds)))
        return [[int(r) for r in row if r >= 0] for row in ids]

    def _own_rows(self, ex: SummaryExample) -> list[int]:
        if self._paper_rows is None:  # doc id of every row, once: (rows,) -> grouped by paper
            all_rows = np.arange(len(self.ds), dtype=np.int64)
            doc_ids = self.ds._doc_ids(all_rows)  # noqa: SLF001 (the store's one vectorised doc-id lookup)
            self._paper_rows = {}
            for d in np.unique(doc_ids):
                self._paper_rows[str(d)] = all_rows[doc_ids == d]
        own = self._paper_rows.get(ex.paper_id)
        if own is None:
            raise RalmError(f"--datastore {self.ds.root}: no chunk of paper {ex.paper_id!r}; build the store "
                            "from the ACLSum file (`ralm build aclsum.jsonl`)")
        view = self.ds.restrict(own)
        _, ids = self._retriever(view).search([query(ex)], min(self.docs, len(own)))
        return [int(r) for r in ids[0] if r >= 0]


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]  # start token first
    target: list[int]
    neighbours: torch.Tensor | None  # (K, R) retro: the chunks' tokens, PAD-padded; None for gpt


class TaskEncoder:
    """Examples + their rows -> ``Encoded`` rows -> padded batches, for ``arch`` gpt or retro."""

    def __init__(self, tokenizer: Any, arch: str, ds: Any | None, doc_tokens: int = 128, max_len: int = 512,
                 max_target: int = 128, chunk_size: int | None = None, neighbour_len: int | None = None,
                 max_new: int = 32):
        if arch not in ("gpt", "retro"):
            raise RalmError(f"--arch {arch!r}: choose gpt or retro")
        if arch == "retro" and (chunk_size is None or neighbour_len is None):
            raise RalmError("--arch retro needs the RETRO-fit chunk size and neighbour length")
        for name, v in (("doc_tokens", doc_tokens), ("max_len", max_len), ("max_target", max_target)):
            if v < 1:
                raise RalmError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        self.tok, self.arch, self.ds = tokenizer, arch, ds
        self.doc_tokens, self.max_len, self.max_target, self.max_new = doc_tokens, max_len, max_target, max_new
        self.m, self.r = chunk_size, neighbour_len
        self.start = start_token_id(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or 0)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt(self, ex: Example, rows: Sequence[int]) -> list[int]:
        ids = [] if self.start is None else [self.start]
        if self.arch == "gpt":
            for r in rows:
                ids += self._ids("Passage: ") + self._ids(self.ds.chunk(r)["text"])[: self.doc_tokens] + self._ids("\n")
        return ids + self._ids(instruction(ex))

    def neighbours(self, rows: Sequence[int]) -> torch.Tensor | None:
        """(K, R) tokens of the k chunks with their continuations (K = len(rows), at least 1; PAD-padded)."""
        if self.arch != "retro":
            return None
        out = torch.full((max(1, len(rows)), self.r), PAD, dtype=torch.long)
        for j, r in enumerate(rows):
            rec = self.ds.chunk(r)
            toks = (list(rec["tokens"]) + list(rec["continuation"]))[: self.r]
            out[j, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        return out

    def target(self, text: str, eos: bool = True) -> list[int]:
        ids = self._ids(" " + text.strip())[: self.max_target]
        return ids + ([self.eos] if eos and self.eos is not None else [])

    def encode(self, ex: Example, rows: Sequence[int], target: str | None) -> Encoded:
        """One row; ``target`` None: the prompt alone (generation). Generated targets end in EOS, choices do
        not (a choice is scored as the continuation alone). Over ``max_len`` (with the tokens to generate): the
        prompt's left is cut (after the start token), the target kept."""
        p = self.prompt(ex, rows)
        t = self.target(target, eos=not isinstance(ex, ChoiceExample)) if target is not None else []
        gen = self.max_target if isinstance(ex, SummaryExample) else self.max_new
        room = self.max_len - (len(t) if target is not None else gen)
        if len(p) > room:
            keep = 1 if self.start is not None else 0
            if room <= keep:
                raise RalmError(f"--max-len {self.max_len}: leaves no room for the prompt of {ex.id!r}")
            p = p[:keep] + p[len(p) - (room - keep):]
        return Encoded(p, t, self.neighbours(rows))

    def prompt_end(self, encoded: Sequence[Encoded]) -> int:
        """P: where every row's prompt ends (retro: a multiple of m, at least m)."""
        P = max(len(e.prompt) for e in encoded)
        if self.arch == "retro":
            P = max(self.m, -(-P // self.m) * self.m)
        return P

    def collate(self, encoded: Sequence[Encoded], width: int | None = None) -> dict[str, Any]:
        """Padded batch: ``input_ids`` / ``attention_mask`` / ``labels`` (B, L), ``neighbours`` (B, U, K, R) or
        None, ``prompt_end`` P. ``width``: at least this many columns (generation grows it)."""
        P = self.prompt_end(encoded)
        L = max(P + max(len(e.target) for e in encoded), width or 0)
        B = len(encoded)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        labels = torch.full((B, L), IGNORE, dtype=torch.long)
        for b, e in enumerate(encoded):
            s = P - len(e.prompt)
            row = e.prompt + e.target
            ids[b, s:s + len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, s:s + len(row)] = 1
            labels[b, P:P + len(e.target)] = torch.tensor(e.target, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_end": P,
                "neighbours": self.batch_neighbours(encoded, L)}

    def batch_neighbours(self, encoded: Sequence[Encoded], length: int) -> torch.Tensor | None:
        """(B, U, K, R): every whole chunk of a ``length``-token window at offset 0 reads the row's k chunks."""
        if self.arch != "retro":
            return None
        K = max(e.neighbours.shape[0] for e in encoded)
        U = length // self.m
        nb = torch.full((len(encoded), K, self.r), PAD, dtype=torch.long)
        for b, e in enumerate(encoded):
            nb[b, : e.neighbours.shape[0]] = e.neighbours
        return nb[:, None].expand(-1, U, -1, -1).contiguous()
