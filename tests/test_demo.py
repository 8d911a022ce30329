"""The front door (issue 12, "The front door"): ``make demo`` (scripts/demo.py + scripts/demo_report.py) shows
where retrieval helps and where not, every number measured, saved as JSON, markdown and a PNG chart.

The demo itself runs real models for minutes; these tests pin its pure parts on generated data: the splits
that make the leakage and clean settings mean what they say, the report files, and verdicts that are read
off the measured numbers (no hard-coded result).
"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from squad_data import squad_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import demo  # noqa: E402
import demo_report  # noqa: E402

from ralm.data.squad import parse_squad  # noqa: E402


def _bbc(path: Path, n: int = 60) -> Path:
    """BBC-like lines: {"text", "label"} without ids; every third one mid-length (1500-2500 characters)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Story {i}. " + "word " * (400 if i % 3 == 0 else 50), "label": "x"}) + "\n")
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_bbc_splits_give_evaluated_articles_their_store_ids(tmp_path):
    """Same-document exclusion goes by id: the evaluated articles carry the ids of their copies in both stores
    (the leakage setting can retrieve them, the clean setting can exclude them); validation articles are in
    the retrieval store's range but not the kNN-LM store; 'other topic' articles are in no store."""
    args = Namespace(store_docs=40, knn_docs=20, eval_docs=2)
    files = demo.bbc_splits(_bbc(tmp_path / "bbc.jsonl"), tmp_path, args)
    store, knn, ev, valid, other = (set(_ids(files[k])) for k in ("store", "knn", "eval", "valid", "other"))
    assert len(store) == 40 and len(knn) == 20 and len(ev) == 2 == len(valid) == len(other)
    assert ev <= knn <= store
    assert not valid & knn
    assert not other & store
    again = demo.bbc_splits(_bbc(tmp_path / "bbc.jsonl"), tmp_path, args)  # a rerun keeps the same files
    assert again == files


def test_squad_subset_keeps_paragraph_ids(tmp_path):
    """The QA store's paragraphs and the questions' gold paragraph ids come from the subset file: they must be
    the full file's ids, so recall@1 and 'gold paragraph retrieved' count the right hits."""
    full = tmp_path / "dev.json"
    full.write_text(json.dumps(squad_record(n_articles=8, n_paras=3)), encoding="utf-8")
    sub, info = demo.squad_subset(full, tmp_path, 3)
    assert info["articles"] == ["Article_0", "Article_2", "Article_4"]
    assert (info["file_articles"], info["file_paragraphs"], info["file_questions"]) == (8, 24, 24)
    full_paras = {p.id: p.context for p in parse_squad(full)[0]}
    sub_paras, sub_qs = parse_squad(sub)
    assert len(sub_paras) == 9 and all(full_paras[p.id] == p.context for p in sub_paras)
    assert {q.paragraph_id for q in sub_qs} == {p.id for p in sub_paras}


@pytest.mark.parametrize(("value", "base", "lower", "word"), [
    (20.0, 30.0, True, "helps"), (33.0, 30.0, True, "hurts"), (30.2, 30.0, True, "no measurable change"),
    (29.8, 30.0, True, "no measurable change"),
    (17.0, 5.0, False, "helps"), (4.0, 5.0, False, "hurts")])
def test_change_verdict_follows_the_numbers(value, base, lower, word):
    assert demo_report.change(value, base, lower).startswith(word)


def _rows(open_f1: float, ic_clean: float, knn_clean: float, other_ic: float) -> list:
    R = demo_report.Row
    return [R("qa", "closed book", "F1", 6.0, ""), R("qa", "open book (top-1 retrieved paragraph in the prompt)", "F1",
                                                     open_f1, ""),
            R("lm", "no retrieval", "perplexity", 30.0, ""), R("lm", "in-context RALM, leakage", "perplexity", 3.0, ""),
            R("lm", "in-context RALM, clean", "perplexity", ic_clean, ""),
            R("lm", "kNN-LM, leakage", "perplexity", 3.0, ""), R("lm", "kNN-LM, clean", "perplexity", knn_clean, ""),
            R("lm", "other topic: no retrieval", "perplexity", 25.0, ""),
            R("lm", "other topic: in-context RALM, clean", "perplexity", other_ic, "")]


QA = {"f1_gold_retrieved": {"n": 3, "open": 40.0, "closed": 10.0}, "f1_gold_missed": {"n": 2, "open": 1.0,
                                                                                      "closed": 2.0}}
LM = {"runs": {"knn-lm clean": {"lmbda": 0.0}}, "neighbour": {"doc": "bbc-1", "clean": {"doc": "bbc-9"}}}


def test_summary_is_read_off_the_measurements():
    """The closing lines say helps or hurts from the numbers given, not from a fixed story."""
    good = " ".join(demo._summary(_rows(17.0, 27.0, 30.0, 27.0), QA, LM))
    assert "open book beats closed book (+11.0 F1" in good
    assert "in-context RALM helps (-10.0%)" in good and "kNN-LM no measurable change" in good
    assert "λ chosen on the validation articles is 0" in good
    assert "in-context RALM hurts (+8.0%): a passage on another subject only takes room" in good
    bad = " ".join(demo._summary(_rows(4.0, 33.0, 27.0, 24.0), QA, {**LM, "runs": {"knn-lm clean": {"lmbda": 0.1}}}))
    assert "open book does not beat closed book (-2.0 F1" in bad
    assert "in-context RALM hurts (+10.0%)" in bad and "kNN-LM helps (-10.0%)" in bad
    assert "is 0" not in bad and "only takes room" not in bad


def test_report_writes_json_markdown_and_png(tmp_path):
    """results.json (every row with its meaning), results.md (the closing table) and a PNG chart."""
    rows = [demo_report.Row("qa", "closed book", "F1", 5.5, "the LM alone", 4),
            demo_report.Row("qa", "retriever", "recall@1", 0.5, "top hit is gold", 4),
            demo_report.Row("lm", "no retrieval", "perplexity", 29.75, "baseline", 100)]
    panels = [("QA", "F1", [("all", [("closed book", 5.5), ("open book", 17.0)])]),
              ("LM", "perplexity", [("in-context", [("no retrieval", 29.75), ("leakage", 2.0), ("clean", 27.0)])])]
    paths = demo_report.write_all(tmp_path, rows, ["a line"], panels, {"total_seconds": 1.0})
    data = json.loads(paths["json"].read_text())
    assert [r["meaning"] for r in data["rows"]] == ["the LM alone", "top hit is gold", "baseline"]
    assert data["summary"] == ["a line"] and data["total_seconds"] == 1.0
    md = paths["md"].read_text()
    assert "| SQuAD dev, 4 questions | closed book | F1 | 5.50 | the LM alone |" in md
    assert "| retriever | recall@1 | 50% |" in md and "| BBC News, 100 tokens | no retrieval |" in md
    assert "- a line" in md and "![chart](results.png)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, no leftovers
