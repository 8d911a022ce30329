"""Corpus readers: JSONL, plain text, Parquet files and folders of them, streamed as ``Document``s.

An explicitly named ``.json`` file is read as a SQuAD-format file: one document per paragraph, with the
paragraph id ``f"{title}#{i}"`` as doc id (``ralm.data.squad``), so a store built from it finds gold
paragraphs by id. Folders are not searched for ``.json`` files.

Default document ids are ``name:line`` (``name:row`` for Parquet, ``name`` for a .txt file), where a file's
name is its file name, or ``folder/relative/path`` inside a named folder; where two input files would share
a name, their names take on parent folders until they differ (``a/x.jsonl``, ``b/x.jsonl``), so generated
ids never merge two documents. Explicit ids that repeat are counted and warned about, or refused
(``--duplicate-ids error``): same-document exclusion treats documents sharing an id as one document.

Everything is streamed (one line / one file / one record batch at a time), so memory grows with the
corpus only by the set of ids seen (for the duplicate check). Recoverable problems (blank documents,
invalid UTF-8, oversized documents) are skipped or repaired and counted in ``ReadStats``; unrecoverable
ones (missing path, malformed JSON, a missing text field) raise ``RalmError`` naming the file and line.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ralm.data.document import Document
from ralm.data.squad import DOMAIN, squad_documents
from ralm.errors import RalmError

SUFFIXES = (".jsonl", ".txt", ".parquet")
SQUAD_SUFFIX = ".json"  # only as an explicitly named file: a SQuAD-format file, one document per paragraph


@dataclass
class CorpusConfig:
    text_field: str = field(default="text", metadata={"help": "JSONL/Parquet field holding the text"})
    id_field: str = field(default="id", metadata={"help": "field holding the document id (else file:line)"})
    domain: str | None = field(default=None, metadata={"help": "domain tag for every document read"})
    max_doc_mb: float = field(
        default=16.0,
        metadata={"help": "documents larger than this (MB of UTF-8) are skipped and counted: a single "
                  "'document' that large is almost always a mis-formatted corpus, and it would make "
                  "same-document exclusion meaningless"},
    )
    invalid_utf8: str = field(
        default="replace", metadata={"help": "'replace' bad bytes with U+FFFD, or 'skip' the document"}
    )
    duplicate_ids: str = field(
        default="warn",
        metadata={"help": "documents whose id repeats an earlier one: 'warn' (counted, with examples, and kept) "
                  "or 'error' (refuse the corpus); same-document exclusion treats documents sharing an id as one"},
    )

    def __post_init__(self) -> None:
        if self.invalid_utf8 not in ("replace", "skip"):
            raise RalmError(f"--invalid-utf8 {self.invalid_utf8!r}: expected 'replace' or 'skip'")
        if self.duplicate_ids not in ("warn", "error"):
            raise RalmError(f"--duplicate-ids {self.duplicate_ids!r}: expected 'warn' or 'error'")
        if self.max_doc_mb <= 0:
            raise RalmError(f"--max-doc-mb {self.max_doc_mb}: must be > 0")
        if not self.text_field:
            raise RalmError("--text-field must not be empty")

    @property
    def max_doc_bytes(self) -> int:
        return int(self.max_doc_mb * 1_000_000)


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    blank: int = 0
    invalid_utf8: int = 0  # documents with bad bytes, repaired (--invalid-utf8 replace) or skipped
    invalid_utf8_skipped: int = 0
    too_large: int = 0
    duplicate_ids: int = 0  # documents whose id repeats an earlier document's (kept, under --duplicate-ids warn)
    skipped_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.blank + self.too_large + self.invalid_utf8_skipped


def list_input_files(inputs: Sequence[str | Path], stats: ReadStats | None = None) -> list[tuple[Path, str]]:
    """Expand inputs into ``(file, name)`` pairs; ``name`` (used in default doc ids) is stable across runs.

    Folders are walked recursively in sorted order; files in them with other suffixes are skipped
    (and recorded), while an explicitly named file with an unknown suffix is an error. Names are unique
    (``_unique_names``); a file named twice (directly, or also inside a named folder) is an error.
    """
    if not inputs:
        raise RalmError("no input given: name at least one JSONL, .txt, Parquet file or folder")
    out: list[tuple[Path, str]] = []
    given: dict[Path, str] = {}  # resolved file -> the input that named it first
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise RalmError(f"{raw}: no such file or folder")
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                if f.name.startswith("."):
                    continue
                if f.suffix in SUFFIXES:
                    out.append((f, f"{p.name}/{f.relative_to(p).as_posix()}"))
                elif stats is not None:
                    stats.skipped_files.append(str(f))
        elif p.suffix in SUFFIXES or p.suffix == SQUAD_SUFFIX:
            out.append((p, p.name))
        else:
            raise RalmError(f"{raw}: unsupported input type {p.suffix or '(none)'}; expected {', '.join(SUFFIXES)} "
                            f"or a SQuAD-format {SQUAD_SUFFIX} file")
    if not out:
        raise RalmError(f"{', '.join(map(str, inputs))}: no {', '.join(SUFFIXES)} files found")
    for f, _ in out:
        real = f.resolve()
        if real in given:
            also = f" (also as {given[real]})" if given[real] != str(f) else ""
            raise RalmError(f"{f}: named twice in the inputs{also}; its documents would be read twice")
        given[real] = str(f)
    return _unique_names(out)


def _unique_names(files: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """The same files, every name unique: names two files share take on parent folders until they differ.

    Names that are already unique are kept, so the ids of a single input (and of inputs with distinct file
    names) do not change; only files that would have given the same ids get longer names.
    """
    names = [name for _, name in files]
    parts = [Path(os.path.abspath(f)).parts for f, _ in files]
    depth = [len(PurePosixPath(name).parts) for name in names]
    for _ in range(max(map(len, parts))):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(names):
            groups[name].append(i)
        clashes = [i for group in groups.values() if len(group) > 1 for i in group]
        if not clashes:
            break
        for i in clashes:
            depth[i] = min(depth[i] + 1, len(parts[i]))
            names[i] = PurePosixPath(*parts[i][-depth[i]:]).as_posix()
    return [(f, name) for (f, _), name in zip(files, names, strict=True)]


def iter_documents(
    inputs: Sequence[str | Path], cfg: CorpusConfig, stats: ReadStats | None = None
) -> Iterator[Document]:
    """Stream the documents of all inputs in a deterministic order; repeated ids are warned about or refused."""
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    repeats: dict[str, int] = {}  # repeated id -> times it repeats
    for path, name in list_input_files(inputs, stats):
        stats.files += 1
        if path.suffix == ".jsonl":
            docs = _read_jsonl(path, name, cfg, stats)
        elif path.suffix == ".txt":
            docs = _read_txt(path, name, cfg, stats)
        elif path.suffix == SQUAD_SUFFIX:
            docs = _read_squad(path, cfg, stats)
        else:
            docs = _read_parquet(path, name, cfg, stats)
        for doc in docs:
            if doc.id in seen:
                if cfg.duplicate_ids == "error":
                    raise RalmError(f"{path}: document id {doc.id!r} is also the id of an earlier document "
                                    "(--duplicate-ids error; give every document its own id)")
                stats.duplicate_ids += 1
                repeats[doc.id] = repeats.get(doc.id, 0) + 1
            seen.add(doc.id)
            yield doc
    if repeats:  # first in the list: build logs only the first warnings
        examples = ", ".join(f"{i!r} x{n + 1}" for i, n in list(repeats.items())[:5])
        stats.warnings.insert(0, f"{stats.duplicate_ids} document(s) repeat an earlier document's id ({len(repeats)} "
                              f"id(s) shared, e.g. {examples}); same-document exclusion treats documents sharing "
                              "an id as one document: give them unique ids, or refuse with --duplicate-ids error")


def _decode(raw: bytes, where: str, cfg: CorpusConfig, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.invalid_utf8 += 1
        action = "replaced bad bytes" if cfg.invalid_utf8 == "replace" else "skipped"
        stats.warnings.append(f"{where}: invalid UTF-8 at byte {e.start}; {action}")
        if cfg.invalid_utf8 == "replace":
            return raw.decode("utf-8", errors="replace")
        stats.invalid_utf8_skipped += 1
        return None


def _emit(text: str, doc_id: str, domain: str, stats: ReadStats) -> Iterator[Document]:
    if not text.strip():
        stats.blank += 1
        return
    stats.documents += 1
    yield Document(doc_id, text, domain)


def _too_large(size: int, where: str, cfg: CorpusConfig, stats: ReadStats) -> bool:
    if size <= cfg.max_doc_bytes:
        return False
    stats.too_large += 1
    stats.warnings.append(f"{where}: document of {size / 1e6:.1f} MB exceeds --max-doc-mb {cfg.max_doc_mb:g}; skipped")
    return True


def _read_jsonl(path: Path, name: str, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            if _too_large(len(raw), where, cfg, stats):
                continue
            line = _decode(raw, where, cfg, stats)
            if line is None:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RalmError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise RalmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if cfg.text_field not in rec:
                raise RalmError(f"{where}: no {cfg.text_field!r} field (fields: {', '.join(rec)[:120]}; "
                                "use --text-field)")
            text = rec[cfg.text_field]
            if not isinstance(text, str):
                raise RalmError(f"{where}: field {cfg.text_field!r} is {type(text).__name__}, not a string")
            doc_id = str(rec[cfg.id_field]) if rec.get(cfg.id_field) is not None else f"{name}:{lineno}"
            domain = cfg.domain or str(rec.get("domain") or "default")
            yield from _emit(text, doc_id, domain, stats)


def _read_txt(path: Path, name: str, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Document]:
    if _too_large(path.stat().st_size, str(path), cfg, stats):
        return
    text = _decode(path.read_bytes(), str(path), cfg, stats)
    if text is not None:
        yield from _emit(text, name, cfg.domain or "default", stats)


def _read_parquet(path: Path, name: str, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq  # only for Parquet inputs

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise RalmError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise RalmError(f"{path}: no {cfg.text_field!r} column (columns: {', '.join(names)[:120]}; use --text-field)")
    cols = [c for c in (cfg.text_field, cfg.id_field, "domain") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        data = batch.to_pydict()
        for i, text in enumerate(data[cfg.text_field]):
            row += 1
            where = f"{path}:row {row}"
            if text is None:
                text = ""
            if _too_large(len(text.encode("utf-8", errors="replace")), where, cfg, stats):
                continue
            ids = data.get(cfg.id_field)
            doc_id = str(ids[i]) if ids is not None and ids[i] is not None else f"{name}:{row}"
            domain = cfg.domain or str((data.get("domain") or [None] * (i + 1))[i] or "default")
            yield from _emit(text, doc_id, domain, stats)


def _read_squad(path: Path, cfg: CorpusConfig, stats: ReadStats) -> Iterator[Document]:
    for doc in squad_documents(path, domain=cfg.domain or DOMAIN):
        if not _too_large(len(doc.text.encode("utf-8")), f"{path}:{doc.id}", cfg, stats):
            yield from _emit(doc.text, doc.id, doc.domain, stats)
