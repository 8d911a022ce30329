"""SQuAD-format question answering files: questions with gold answers, and their paragraphs as documents.

The format (SQuAD v1.1)::

    {"data": [{"title": str, "paragraphs": [{"context": str,
                                             "qas": [{"id": str, "question": str,
                                                      "answers": [{"text": str, ...}, ...]}, ...]}, ...]}, ...],
     ...any other top-level keys (version, ...) are ignored}

Paragraph ids are ``f"{title}#{i}"`` with ``i`` the paragraph's position (from 0) among the paragraphs of
that title, counted over the whole file (so a title that appears in two articles keeps counting instead of
reusing ids). They depend only on the file's content and order, so a datastore built from the file
(``ralm build squad.json``, see ``ralm.data.corpus``) has these ids as its hits' ``doc_id`` and the
gold paragraph of a question can be looked up among the hits. An article without a ``title`` is named
``article{j}`` (its position in ``data``).

The whole file is parsed in memory (SQuAD dev is 8 MB). Anything that does not fit the format raises a
one-line ``RalmError`` naming the file and the location, e.g. ``dev.json: data[3].paragraphs[2].qas[0]:
no 'answers' list``. Unanswerable questions (SQuAD 2.0 ``is_impossible``) are refused: EM/F1 here are the
v1.1 metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ralm.data.document import Document
from ralm.errors import RalmError

DOMAIN = "squad"


@dataclass(frozen=True)
class Paragraph:
    id: str  # f"{title}#{i}"
    title: str
    context: str


@dataclass(frozen=True)
class QAExample:
    id: str
    question: str
    answers: tuple[str, ...]  # gold answer texts (duplicates kept, as in the file)
    context: str  # the gold paragraph
    title: str
    paragraph_id: str  # id of the gold paragraph (see the module docstring)


def _load_json(path: Path) -> object:
    if not path.exists():
        raise RalmError(f"{path}: no such file")
    if not path.is_file():
        raise RalmError(f"{path}: not a file")
    raw = path.read_bytes()
    if not raw.strip():
        raise RalmError(f"{path}: empty file (expected a SQuAD-format JSON object)")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RalmError(f"{path}: not UTF-8 (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise RalmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _kind(x: object) -> str:
    return "null" if x is None else {dict: "object", list: "list", str: "string"}.get(type(x), type(x).__name__)


def _get(obj: object, key: str, typ: type, where: str, path: Path) -> object:
    """``obj[key]`` checked to be of type ``typ``; a RalmError naming the file and location otherwise."""
    if not isinstance(obj, dict):
        raise RalmError(f"{path}: {where}: expected a JSON object, got {_kind(obj)}")
    if key not in obj:
        raise RalmError(f"{path}: {where}: no {key!r} {'list' if typ is list else 'field'}")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool):
        expected = {list: "a list", str: "a string", dict: "an object"}[typ]
        raise RalmError(f"{path}: {where}.{key}: expected {expected}, got {_kind(value)}")
    return value


def parse_squad(path: str | Path) -> tuple[list[Paragraph], list[QAExample]]:
    """All paragraphs and all questions of a SQuAD-format file, in file order; validates the whole file."""
    path = Path(path)
    top = _load_json(path)
    if not isinstance(top, dict):
        raise RalmError(f"{path}: expected a JSON object with a 'data' list at the top level, got {_kind(top)}")
    articles = _get(top, "data", list, "top level", path)
    paragraphs: list[Paragraph] = []
    examples: list[QAExample] = []
    seen_titles: dict[str, int] = {}
    seen_qids: set[str] = set()
    for j, art in enumerate(articles):
        where_a = f"data[{j}]"
        paras = _get(art, "paragraphs", list, where_a, path)
        title = art.get("title", f"article{j}")  # type: ignore[union-attr]
        if not isinstance(title, str):
            raise RalmError(f"{path}: {where_a}.title: expected a string, got {_kind(title)}")
        for i, p in enumerate(paras):
            where_p = f"{where_a}.paragraphs[{i}]"
            context = _get(p, "context", str, where_p, path)
            if not context.strip():  # type: ignore[union-attr]
                raise RalmError(f"{path}: {where_p}.context: empty")
            n = seen_titles.get(title, 0)
            seen_titles[title] = n + 1
            para = Paragraph(f"{title}#{n}", title, context)  # type: ignore[arg-type]
            paragraphs.append(para)
            qas = p.get("qas", [])  # type: ignore[union-attr]
            if not isinstance(qas, list):
                raise RalmError(f"{path}: {where_p}.qas: expected a list, got {_kind(qas)}")
            for q_i, qa in enumerate(qas):
                examples.append(_parse_qa(qa, f"{where_p}.qas[{q_i}]", para, seen_qids, path))
    return paragraphs, examples


def _parse_qa(qa: object, where: str, para: Paragraph, seen: set[str], path: Path) -> QAExample:
    question = _get(qa, "question", str, where, path)
    if not question.strip():  # type: ignore[union-attr]
        raise RalmError(f"{path}: {where}.question: empty")
    qid = qa.get("id", f"{para.id}/{where}")  # type: ignore[union-attr]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise RalmError(f"{path}: {where}.id: expected a string, got {_kind(qid)}")
    qid = str(qid)
    if qid in seen:
        raise RalmError(f"{path}: {where}.id: duplicate question id {qid!r}")
    seen.add(qid)
    if qa.get("is_impossible"):  # type: ignore[union-attr]
        raise RalmError(f"{path}: {where}: unanswerable question (SQuAD 2.0 'is_impossible'); "
                        "only answerable (v1.1) questions are supported")
    answers = _get(qa, "answers", list, where, path)
    if not answers:
        raise RalmError(f"{path}: {where}.answers: empty list (every question needs a gold answer)")
    texts = []
    for a_i, ans in enumerate(answers):  # type: ignore[arg-type]
        text = _get(ans, "text", str, f"{where}.answers[{a_i}]", path)
        if not text.strip():  # type: ignore[union-attr]
            raise RalmError(f"{path}: {where}.answers[{a_i}].text: empty")
        texts.append(text)
    return QAExample(qid, question.strip(), tuple(texts), para.context, para.title, para.id)  # type: ignore[union-attr]


def load_squad(path: str | Path) -> list[QAExample]:
    """The questions of a SQuAD-format file in file order; ``RalmError`` if malformed or without questions."""
    _, examples = parse_squad(path)
    if not examples:
        raise RalmError(f"{path}: no questions (no paragraph has a non-empty 'qas' list)")
    return examples


def squad_documents(path: str | Path, domain: str = DOMAIN) -> list[Document]:
    """The paragraphs of a SQuAD-format file as ``Document(id=paragraph id, text=context, domain)``."""
    paragraphs, _ = parse_squad(path)
    if not paragraphs:
        raise RalmError(f"{path}: no paragraphs (the 'data' list has no article with paragraphs)")
    return [Document(p.id, p.context, domain) for p in paragraphs]
