"""Task readers (ralm.data.tasks) on generated files in each task's real format: splits disjoint, complete,
deterministic and of the documented sizes; one-line errors naming the file and line for malformed input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ralm.data import registry
from ralm.data.tasks import SPLITS, load_splits, load_task, task_names
from ralm.data.tasks.base import seeded_split
from ralm.errors import RalmError
from squad_data import squad_record, write_squad
from test_data_registry import _aclsum_wheel, _unchecked

# the shared copy of `ralm data get squad-dev` (the same bytes: registry sha256)
SHARED_SQUAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad_dev_v1.1.json"


def _aclsum_record(pid: str, split: str) -> dict:
    return {"id": pid, "split": split, "title": f"Paper {pid}",
            "summary": {"challenge": f"{pid} challenge.", "approach": f"{pid} approach.",
                        "outcome": f"{pid} outcome."},
            "sections": {"abstract": ["We do x ."], "introduction": ["X matters ."], "conclusion": ["X works ."]},
            "text": f"Full text of {pid}.\n\nIntroduction\nMore."}


def write_aclsum(path: Path, records: list[dict] | None = None) -> Path:
    if records is None:
        records = [_aclsum_record(p, s) for p, s in [("A", "train"), ("B", "train"), ("C", "validation"),
                                                      ("D", "test")]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _tqa_record(i: int, rng: random.Random) -> dict:
    n = rng.randint(2, 5)
    return {"id": f"tqa-{i:03d}", "question": f"Question {i}?", "category": "Myths",
            "mc1_targets": {"choices": [f"true {i}"] + [f"false {i}.{j}" for j in range(n - 1)],
                            "labels": [1] + [0] * (n - 1)},
            "mc2_targets": {"choices": [f"true {i}", f"also true {i}", f"false {i}.0"], "labels": [1, 1, 0]}}


def write_tqa(path: Path, n: int = 40, records: list[dict] | None = None) -> Path:
    rng = random.Random(0)
    records = records if records is not None else [_tqa_record(i, rng) for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_task_names() -> None:
    assert task_names() == ["squad", "aclsum", "truthfulqa-mc"]
    assert all(t in registry.DATASETS for t in ("squad-dev", "aclsum", "truthfulqa-mc"))


def test_seeded_split_sizes_and_order_independence() -> None:
    keys = [f"k{i}" for i in range(20)]
    a = seeded_split(keys, (0.8, 0.1, 0.1), seed=0, salt="t")
    assert [sum(v == s for v in a.values()) for s in SPLITS] == [16, 2, 2]
    assert seeded_split(reversed(keys + keys), (0.8, 0.1, 0.1), seed=0, salt="t") == a  # set of keys only
    assert seeded_split(keys, (0.8, 0.1, 0.1), seed=1, salt="t") != a


def test_squad_splits_by_article(tmp_path: Path) -> None:
    path = write_squad(tmp_path / "squad.json", n_articles=20, n_paras=3)
    splits = load_splits("squad", path)
    titles = {s: {e.title for e in ex} for s, ex in splits.items()}
    paras = {s: {e.paragraph_id for e in ex} for s, ex in splits.items()}
    assert [len(titles[s]) for s in SPLITS] == [16, 2, 2]  # 80 / 10 / 10 % of 20 articles
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not titles[a] & titles[b] and not paras[a] & paras[b]
    ids = [e.id for s in SPLITS for e in splits[s]]
    assert sorted(ids) == sorted(f"q{a}-{i}" for a in range(20) for i in range(3))  # every question once
    assert load_splits("squad", path) == splits  # deterministic
    for s in SPLITS:
        assert list(load_task("squad", s, path)) == splits[s]
    # the split depends on the articles, not on their order in the file
    rec = squad_record(n_articles=20, n_paras=3)
    rec["data"].reverse()
    rev = load_splits("squad", write_squad(tmp_path / "rev.json", rec))
    assert {s: {e.title for e in ex} for s, ex in rev.items()} == titles
    other = load_splits("squad", path, seed=1)
    assert {e.title for e in other["test"]} != titles["test"]


@pytest.mark.skipif(not SHARED_SQUAD.exists(), reason="needs the shared SQuAD dev file")
def test_squad_real_split_sizes_are_the_documented_ones() -> None:
    splits = load_splits("squad", SHARED_SQUAD)
    assert [len({e.title for e in splits[s]}) for s in SPLITS] == [38, 5, 5]
    assert [len({e.paragraph_id for e in splits[s]}) for s in SPLITS] == [1619, 253, 195]
    assert [len(splits[s]) for s in SPLITS] == [7771, 1323, 1471]


def test_aclsum_examples_per_paper_and_aspect(tmp_path: Path) -> None:
    splits = load_splits("aclsum", write_aclsum(tmp_path / "aclsum.jsonl"))
    assert [len(splits[s]) for s in SPLITS] == [6, 3, 3]
    ex = splits["validation"]
    assert [e.id for e in ex] == ["C/challenge", "C/approach", "C/outcome"]
    assert ex[1].summary == "C approach." and ex[1].aspect == "approach" and ex[1].title == "Paper C"
    assert ex[1].document == "Full text of C.\n\nIntroduction\nMore."
    assert ex[1].source == "We do x . X matters . X works ."
    assert {e.paper_id for e in splits["train"]} == {"A", "B"}


def test_aclsum_reads_what_data_get_writes(tmp_path: Path) -> None:
    out = registry.fetch(_unchecked("aclsum"), _aclsum_wheel(tmp_path), tmp_path / "data" / "aclsum.jsonl")
    splits = load_splits("aclsum", data_dir=tmp_path / "data")  # found in the data folder by name
    assert [len(splits[s]) for s in SPLITS] == [6, 3, 3] and out.exists()
    assert splits["test"][2].id == "P4/outcome" and splits["test"][2].summary == "P4 o."


def test_truthfulqa_split_and_targets(tmp_path: Path) -> None:
    path = write_tqa(tmp_path / "tqa.jsonl", n=40)
    splits = load_splits("truthfulqa-mc", path)
    assert [len(splits[s]) for s in SPLITS] == [20, 10, 10]  # 50 / 25 / 25 %
    ids = {s: {e.id for e in ex} for s, ex in splits.items()}
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"] and not ids["validation"] & ids["test"]
    assert set().union(*ids.values()) == {f"tqa-{i:03d}" for i in range(40)}
    e = next(x for s in SPLITS for x in splits[s] if x.id == "tqa-007")
    assert e.choices[e.label] == "true 7" and e.question == "Question 7?" and e.category == "Myths"
    assert e.mc2_choices == ("true 7", "also true 7", "false 7.0") and e.mc2_labels == (1, 1, 0)
    assert load_splits("truthfulqa-mc", path) == splits


def test_truthfulqa_without_mc2_and_with_the_true_choice_anywhere(tmp_path: Path) -> None:
    rec = {"id": "x", "question": "Q?", "mc1_targets": {"choices": ["no", "yes", "maybe"], "labels": [0, 1, 0]}}
    (e,) = [x for s in SPLITS for x in load_splits("truthfulqa-mc", write_tqa(tmp_path / "t.jsonl", records=[rec]))[s]]
    assert e.label == 1 and e.mc2_choices == () and e.category == ""


def test_unknown_task_and_split_list_the_known(tmp_path: Path) -> None:
    with pytest.raises(RalmError, match=r"unknown task 'nope'; known: squad, aclsum, truthfulqa-mc"):
        load_task("nope", "train", tmp_path / "x")
    with pytest.raises(RalmError, match=r"unknown split 'dev' of task squad; known: train, validation, test"):
        load_task("squad", "dev", tmp_path / "x")


def test_missing_file_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(RalmError, match=r"no data file .*aclsum\.jsonl; fetch it with `ralm data get aclsum`"):
        load_task("aclsum", "train", data_dir=tmp_path)
    with pytest.raises(RalmError, match=r"nothere\.jsonl: no such file"):
        load_task("truthfulqa-mc", "train", tmp_path / "nothere.jsonl")


def _one_line_error(task: str, path: Path, match: str) -> None:
    with pytest.raises(RalmError, match=match) as e:
        load_task(task, "train", path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_malformed_aclsum_names_file_line_and_field(tmp_path: Path) -> None:
    good = _aclsum_record("A", "train")
    cases = [
        ("{not json\n", r"line 1: not valid JSON"),
        ("[1, 2]\n", r"line 1: expected a JSON object, got list"),
        (json.dumps(good) + "\n" + json.dumps({**good, "id": "B", "split": "dev"}) + "\n",
         r"line 2: 'split': 'dev' is not one of train, validation, test"),
        (json.dumps(good) + "\n\n" + json.dumps(good) + "\n", r"line 3: 'id': duplicate paper id 'A'"),
        (json.dumps({**good, "summary": {"challenge": "c", "approach": "a"}}), r"line 1: 'summary': no 'outcome'"),
        (json.dumps({**good, "summary": {**good["summary"], "outcome": " "}}), r"'summary': 'outcome': empty"),
        (json.dumps({**good, "text": 3}), r"line 1: 'text': expected str, got int"),
        (json.dumps({**good, "sections": {**good["sections"], "conclusion": [1]}}),
         r"'sections': 'conclusion': expected a list of strings"),
        ("\n", r"no papers"),
    ]
    for i, (content, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(content, encoding="utf-8")
        _one_line_error("aclsum", path, match)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "caf\xe9"}\n')
    _one_line_error("aclsum", tmp_path / "latin1.jsonl", r"line 1: not UTF-8")


def test_malformed_truthfulqa_names_file_line_and_field(tmp_path: Path) -> None:
    good = _tqa_record(0, random.Random(0))
    mc1 = good["mc1_targets"]
    cases = [
        ({**good, "mc1_targets": {"choices": mc1["choices"], "labels": [1] * len(mc1["choices"])}},
         r"line 1: 'mc1_targets': 'labels': \d true choices, MC1 needs exactly 1"),
        ({**good, "mc1_targets": {"choices": ["a", "b"], "labels": [1]}}, r"'labels': expected one 0 or 1 per choice"),
        ({**good, "mc1_targets": {"choices": ["a", "a"], "labels": [1, 0]}}, r"a choice appears twice"),
        ({**good, "mc1_targets": {"choices": ["a"], "labels": [1]}}, r"1 choice\(s\), need at least 2"),
        ({**good, "mc1_targets": {"choices": ["a", ""], "labels": [1, 0]}}, r"expected non-empty strings"),
        ({k: v for k, v in good.items() if k != "mc1_targets"}, r"line 1: no 'mc1_targets' field"),
        ({**good, "mc2_targets": {"choices": ["a", "b"], "labels": [1, 2]}}, r"'mc2_targets': 'labels'"),
        ({**good, "question": ""}, r"line 1: 'question': empty"),
    ]
    for i, (rec, match) in enumerate(cases):
        _one_line_error("truthfulqa-mc", write_tqa(tmp_path / f"bad{i}.jsonl", records=[rec]), match)
    _one_line_error("truthfulqa-mc", write_tqa(tmp_path / "dup.jsonl", records=[good, good]),
                    r"line 2: 'id': duplicate question id")


def test_malformed_squad_is_the_squad_readers_one_line_error(tmp_path: Path) -> None:
    rec = squad_record(n_articles=2)
    del rec["data"][1]["paragraphs"][0]["qas"][0]["answers"]
    _one_line_error("squad", write_squad(tmp_path / "bad.json", rec), r"data\[1\]\.paragraphs\[0\]\.qas\[0\]: no 'answers'")
