"""One build step: a shard of documents -> chunks part (Parquet) + keys part (fp16 .npy) + done marker.

A pure function of (shard, config), so it runs the same in the driver or as a Ray task. Each file is
written to a temporary name and renamed; the done marker is written last, so a shard counts as finished
only when both of its parts are complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ralm.data.document import Document
from ralm.datastore import layout
from ralm.datastore.chunking import ChunkingConfig, chunk_documents
from ralm.datastore.encoders import EncoderConfig, load_encoder
from ralm.lm.presets import load_tokenizer
from ralm.utils.atomic import atomic_path, sha256_file, write_json


@dataclass
class ShardTask:
    part: int
    docs: list[Document]
    root: str
    tokenizer: str
    chunking: ChunkingConfig
    encoder: EncoderConfig  # with its dtype resolved, so every worker encodes the same way


def _file_record(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


# the columns of a chunk part; the reader (store.py) checks a part's types against it
CHUNK_SCHEMA = pa.schema({"chunk_id": pa.int64(), "doc_id": pa.string(), "domain": pa.string(),
                          "position": pa.int32(), "char_start": pa.int64(), "text": pa.string(),
                          "tokens": pa.list_(pa.int32()), "continuation": pa.list_(pa.int32())})


def process_shard(task: ShardTask) -> dict:
    """Chunk, encode and write one shard; return its part record (also written as the done marker)."""
    root = Path(task.root)
    t0 = time.perf_counter()
    chunks = chunk_documents(task.docs, load_tokenizer(task.tokenizer), task.chunking)
    n = len(chunks)
    table = pa.Table.from_pydict({
        "chunk_id": [layout.chunk_id(task.part, r) for r in range(n)], "doc_id": chunks.doc_id,
        "domain": chunks.domain, "position": chunks.position, "char_start": chunks.char_start,
        "text": chunks.text, "tokens": chunks.tokens, "continuation": chunks.continuation,
    }, schema=CHUNK_SCHEMA)
    cpath = layout.chunks_path(root, task.part)
    with atomic_path(cpath) as tmp:
        # page CRCs: a reader refuses a damaged page instead of returning altered text (store.py checks them)
        pq.write_table(table, tmp, row_group_size=4096, compression="zstd", write_page_checksum=True)
    t_chunk = time.perf_counter() - t0
    record = {"part": task.part, "documents": len(task.docs), "chunks": n, "tokens": chunks.num_tokens,
              "chunks_file": _file_record(cpath, root)}
    domains: dict[str, int] = {}
    for d in chunks.domain:
        domains[d] = domains.get(d, 0) + 1
    record["domains"] = domains
    if not task.encoder.sparse:
        xb = load_encoder(task.encoder).encode(chunks.text).astype(np.float16)  # (n, dim)
        kpath = layout.keys_path(root, task.part)
        with atomic_path(kpath) as tmp, open(tmp, "wb") as f:
            np.save(f, xb)
        record["keys_file"] = _file_record(kpath, root)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["chunk_seconds"] = round(t_chunk, 3)
    write_json(layout.done_path(root, task.part), record)
    return record
