"""SQuAD files: examples, paragraph ids, every malformed case as one error line, paragraphs as a corpus."""

from __future__ import annotations

import json

import pytest

from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents
from ralm.data.squad import load_squad, parse_squad, squad_documents
from ralm.errors import RalmError
from squad_data import squad_record, write_squad


# ---- SQuAD files ----------------------------------------------------------------------------------
def test_load_squad_examples_and_paragraph_ids(tmp_path):
    rec = squad_record(n_articles=2, n_paras=2)
    rec["data"].append({"title": "Article_0", "paragraphs": [{"context": "Repeated title paragraph.", "qas": []}]})
    path = write_squad(tmp_path / "s.json", rec)
    paras, examples = parse_squad(path)
    assert [p.id for p in paras] == ["Article_0#0", "Article_0#1", "Article_1#0", "Article_1#1", "Article_0#2"]
    assert len(examples) == 4 and len(load_squad(path)) == 4
    e = examples[3]
    assert (e.id, e.title, e.paragraph_id) == ("q1-1", "Article_1", "Article_1#1")
    assert e.context == rec["data"][1]["paragraphs"][1]["context"]
    assert e.answers == tuple(a["text"] for a in rec["data"][1]["paragraphs"][1]["qas"][0]["answers"])
    docs = squad_documents(path)
    assert [(d.id, d.text, d.domain) for d in docs] == [(p.id, p.context, "squad") for p in paras]


def _malformed(rec_edit):
    rec = squad_record(n_articles=2, n_paras=2)
    rec_edit(rec)
    return json.dumps(rec)


def _drop(d: dict, key: str) -> None:
    del d[key]


MALFORMED = {
    "empty": ("", "empty file"),
    "blank": ("  \n", "empty file"),
    "not-json": ('{"data": [', "not valid JSON"),
    "top-list": ("[1, 2]", "expected a JSON object"),
    "no-data": (json.dumps({"version": "1.1"}), "no 'data' list"),
    "data-not-list": (json.dumps({"data": {"title": "x"}}), "data: expected a list"),
    "article-not-object": (json.dumps({"data": ["x"]}), "data[0]: expected a JSON object"),
    "no-paragraphs": (_malformed(lambda r: _drop(r["data"][1], "paragraphs")), "data[1]: no 'paragraphs'"),
    "no-context": (_malformed(lambda r: _drop(r["data"][0]["paragraphs"][1], "context")),
                   "data[0].paragraphs[1]: no 'context'"),
    "context-not-string": (_malformed(lambda r: r["data"][0]["paragraphs"][0].update(context=3)),
                           "data[0].paragraphs[0].context: expected a string, got int"),
    "qas-not-list": (_malformed(lambda r: r["data"][0]["paragraphs"][0].update(qas={})),
                     "data[0].paragraphs[0].qas: expected a list"),
    "no-answers": (_malformed(lambda r: _drop(r["data"][1]["paragraphs"][0]["qas"][0], "answers")),
                   "data[1].paragraphs[0].qas[0]: no 'answers'"),
    "empty-answers": (_malformed(lambda r: r["data"][1]["paragraphs"][0]["qas"][0].update(answers=[])),
                      "data[1].paragraphs[0].qas[0].answers: empty"),
    "answer-no-text": (_malformed(lambda r: r["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].pop("text")),
                       "data[0].paragraphs[0].qas[0].answers[1]: no 'text'"),
    "no-question": (_malformed(lambda r: _drop(r["data"][0]["paragraphs"][1]["qas"][0], "question")),
                    "data[0].paragraphs[1].qas[0]: no 'question'"),
    "impossible": (_malformed(lambda r: r["data"][0]["paragraphs"][0]["qas"][0].update(is_impossible=True)),
                   "unanswerable"),
    "duplicate-id": (_malformed(lambda r: r["data"][0]["paragraphs"][1]["qas"][0].update(id="q0-0")),
                     "duplicate question id"),
    "no-questions": (json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": []}]}]}),
                     "no questions"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_squad_names_file_and_problem(tmp_path, case):
    content, needle = MALFORMED[case]
    path = tmp_path / f"{case}.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RalmError) as err:
        load_squad(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(RalmError, match="no such file"):
        load_squad(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"data": ["\xff"]}')
    with pytest.raises(RalmError, match=f"{bad}: not UTF-8"):
        load_squad(bad)


# ---- SQuAD files as a corpus ----------------------------------------------------------------------
def test_squad_json_reads_as_a_corpus_of_paragraphs(tmp_path):
    path = write_squad(tmp_path / "s.json", n_articles=2, n_paras=3)
    stats = ReadStats()
    docs = list(iter_documents([path], CorpusConfig(), stats))
    assert [d.id for d in docs] == [p.id for p in parse_squad(path)[0]]
    assert {d.domain for d in docs} == {"squad"} and stats.documents == 6 and stats.files == 1
    assert {d.domain for d in iter_documents([path], CorpusConfig(domain="dev"))} == {"dev"}
    # inside a folder a .json file is not a corpus file: skipped and recorded
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha beta")
    write_squad(tmp_path / "d" / "s.json")
    stats = ReadStats()
    assert [d.id for d in iter_documents([tmp_path / "d"], CorpusConfig(), stats)] == ["d/a.txt"]
    assert stats.skipped_files == [str(tmp_path / "d" / "s.json")]


def test_non_squad_json_corpus_is_an_error(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"text": "alpha"}]), encoding="utf-8")
    with pytest.raises(RalmError, match=f"{path}: expected a JSON object with a 'data' list"):
        list(iter_documents([path], CorpusConfig()))
