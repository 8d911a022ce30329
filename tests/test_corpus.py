"""Corpus readers (JSONL, .txt, Parquet, folders) and chunking modes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents
from ralm.datastore.chunking import ChunkingConfig, chunk_documents
from ralm.lm.presets import load_tokenizer


def test_jsonl_ids_domains_and_defaults(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join([
        json.dumps({"id": 7, "text": "first", "domain": "news"}),
        json.dumps({"text": "second"}),
        "",
        json.dumps({"text": "third", "domain": "wiki"}),
    ]) + "\n")
    docs = list(iter_documents([p], CorpusConfig()))
    assert [(d.id, d.text, d.domain) for d in docs] == [
        ("7", "first", "news"), ("a.jsonl:2", "second", "default"), ("a.jsonl:4", "third", "wiki")]
    # --domain tags every document of the inputs
    assert {d.domain for d in iter_documents([p], CorpusConfig(domain="mine"))} == {"mine"}


def test_folder_of_txt_and_parquet_with_custom_fields(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee text")
    (root / "sub" / "a.txt").write_text("ay text")
    (root / "notes.md").write_text("ignored")
    pq.write_table(pa.table({"body": ["p one", "p two"], "key": ["k1", None]}), root / "c.parquet")
    stats = ReadStats()
    docs = list(iter_documents([root], CorpusConfig(text_field="body", id_field="key"), stats))
    # sorted walk: b.txt, c.parquet, sub/a.txt; .txt files are whole documents regardless of --text-field
    assert [(d.id, d.text) for d in docs] == [
        ("corpus/b.txt", "bee text"), ("k1", "p one"), ("corpus/c.parquet:2", "p two"), ("corpus/sub/a.txt", "ay text")]
    assert stats.files == 3 and stats.documents == 4
    assert stats.skipped_files == [str(root / "notes.md")]


def test_passage_mode_has_no_continuation(tiny_tokenizer):
    from ralm.data.document import Document

    tok = load_tokenizer(tiny_tokenizer)
    doc = Document("x", "alpha beta gamma delta " * 40, "d")
    chunks = chunk_documents([doc], tok, ChunkingConfig(chunk_tokens=32, continuation=False))
    assert len(chunks) > 2 and all(c == [] for c in chunks.continuation)
    assert all(len(t) == 32 for t in chunks.tokens[:-1])
    with_cont = chunk_documents([doc], tok, ChunkingConfig(chunk_tokens=32))
    assert with_cont.continuation[0] == with_cont.tokens[1]
    assert "".join(chunks.text) == doc.text.rstrip()
