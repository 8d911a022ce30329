"""Cut documents into chunks of LM tokens (RETRO: 64 tokens + the next 64 as continuation).

A chunk's ``text`` is an exact substring of its document, located with the tokenizer's offset mapping,
so chunk texts concatenate back to the document and nothing is lost in a decode round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ralm.data.document import Document
from ralm.errors import RalmError


@dataclass
class ChunkingConfig:
    chunk_tokens: int = field(default=64, metadata={"help": "LM tokens per chunk (RETRO: 64; passages: 256)"})
    continuation: bool = field(
        default=True, metadata={"help": "store the next chunk's tokens as continuation (RETRO neighbours)"}
    )

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_tokens <= 8192:
            raise RalmError(f"--chunk-tokens {self.chunk_tokens}: must be between 1 and 8192")


@dataclass
class Chunks:
    """Column-wise chunks of one shard (the layout of a chunks part file)."""

    doc_id: list[str] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)
    position: list[int] = field(default_factory=list)  # chunk index within its document
    char_start: list[int] = field(default_factory=list)  # offset of the chunk text in the document
    text: list[str] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    continuation: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def chunk_documents(docs: Sequence[Document], tokenizer: Any, cfg: ChunkingConfig) -> Chunks:
    """Tokenize ``docs`` in one batch (the fast tokenizer parallelises it) and cut them into chunks."""
    out = Chunks()
    if not docs:
        return out
    # trailing whitespace carries no content and would become whitespace-only chunks
    texts = [d.text.rstrip() for d in docs]
    enc = tokenizer(
        texts, add_special_tokens=False, return_offsets_mapping=True,
        return_attention_mask=False, verbose=False,
    )
    m = cfg.chunk_tokens
    for doc, text, ids, offsets in zip(docs, texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        if not ids:
            continue
        starts = list(range(0, len(ids), m))
        # char span of chunk i: from its first token's start to the next chunk's first token's start;
        # max() keeps spans monotone when a multi-byte character is split across byte-level tokens
        bounds = [offsets[0][0]]
        for s in starts[1:]:
            bounds.append(max(bounds[-1], offsets[s][0]))
        bounds.append(len(text))
        for i, s in enumerate(starts):
            out.doc_id.append(doc.id)
            out.domain.append(doc.domain)
            out.position.append(i)
            out.char_start.append(bounds[i])
            out.text.append(text[bounds[i]:bounds[i + 1]])
            out.tokens.append(list(ids[s:s + m]))
            out.continuation.append(list(ids[s + m:s + 2 * m]) if cfg.continuation else [])
    return out
