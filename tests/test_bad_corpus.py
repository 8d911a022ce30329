"""Bad corpus input: every case gets a one-line error naming the input, a non-zero exit where it is fatal,
and never a half-written store (checked through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from badinput import all_chunks, cli_build, fails, good, no_store, runner, summary_of, write_jsonl
from ralm import Datastore
from ralm.cli import app
from ralm.datastore.build import build
from ralm.errors import RalmError, StoreError


# ---- inputs: missing, unknown, empty ---------------------------------------------------------------
def test_missing_input_path(tmp_path, build_args, build_config):
    missing = tmp_path / "nope.jsonl"
    fails(cli_build([missing], tmp_path / "ds", build_args), str(missing), "no such file")
    assert not (tmp_path / "ds").exists()
    with pytest.raises(RalmError, match="no such file"):
        build(build_config([missing], tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds").exists()


def test_missing_input_among_good_ones_touches_nothing(tmp_path, corpus, build_args):
    missing = tmp_path / "later.jsonl"
    fails(cli_build([corpus, missing], tmp_path / "ds", build_args), str(missing))
    assert not (tmp_path / "ds").exists()


def test_unknown_suffix(tmp_path, build_args):
    csv = tmp_path / "corpus.csv"
    csv.write_text("id,text\n1,hello\n")
    fails(cli_build([csv], tmp_path / "ds", build_args), str(csv), ".csv", "unsupported")
    assert not (tmp_path / "ds").exists()


def test_folder_without_corpus_files(tmp_path, build_args):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.md").write_text("# not a corpus\n")
    fails(cli_build([folder], tmp_path / "ds", build_args), str(folder), "no ")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("content,blank", [
    ("", 0),
    ("\n\n  \n", 0),
    ('{"id": "a", "text": ""}\n{"id": "b", "text": "   \\n\\t "}\n{"text": " "}\n', 3),
], ids=["empty-file", "blank-lines", "blank-docs"])
def test_empty_corpus_is_fatal_and_leaves_no_store(tmp_path, build_args, content, blank):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    line = fails(cli_build([path], tmp_path / "ds", build_args), str(path), "empty corpus", only=False)
    assert f"{blank} blank" in line
    no_store(tmp_path / "ds")
    with pytest.raises(StoreError):
        Datastore.open(tmp_path / "ds")


def test_empty_txt_file_is_an_empty_corpus(tmp_path, build_args):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    fails(cli_build([path], tmp_path / "ds", build_args), "empty corpus", only=False)
    no_store(tmp_path / "ds")


def test_empty_corpus_into_existing_empty_dir_keeps_the_dir(tmp_path, build_args):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    (tmp_path / "ds").mkdir()
    fails(cli_build([path], tmp_path / "ds", build_args), "empty corpus", only=False)
    assert (tmp_path / "ds").is_dir() and not any((tmp_path / "ds").iterdir())


def test_blank_documents_are_skipped_and_counted(tmp_path, build_args):
    path = write_jsonl(tmp_path / "c.jsonl", [good(0), {"id": "b1", "text": ""}, good(1), "",
                                              {"id": "b2", "text": " \n \t"}, good(2), {"id": "b3", "text": "\n"}])
    s = summary_of(cli_build([path], tmp_path / "ds", build_args, "--json"))
    assert s["documents"] == 3
    assert s["skipped"]["blank"] == 3  # the empty line is not a document at all
    assert {r["doc_id"] for r in all_chunks(tmp_path / "ds")} == {"g0", "g1", "g2"}
    r = runner.invoke(app, ["build", str(path), "--out", str(tmp_path / "ds2"), *build_args])
    assert r.exit_code == 0 and "skipped 3 blank" in r.stdout


# ---- invalid UTF-8 ---------------------------------------------------------------------------------
def _bad_utf8_jsonl(path: Path) -> Path:
    with open(path, "wb") as f:
        f.write((json.dumps(good(0)) + "\n").encode())
        f.write(b'{"id": "bad", "text": "River caf\xe9 and mountain \xff\xfe music ocean planet."}\n')
        f.write((json.dumps(good(2)) + "\n").encode())
    return path


def test_invalid_utf8_jsonl_replaced_by_default(tmp_path, build_args):
    path = _bad_utf8_jsonl(tmp_path / "c.jsonl")
    r = cli_build([path], tmp_path / "ds", build_args, "--json")
    s = summary_of(r)
    assert s["documents"] == 3
    assert s["skipped"]["invalid_utf8"] == 1 and s["skipped"]["invalid_utf8_skipped"] == 0
    assert f"{path}:2" in r.stderr and "invalid UTF-8" in r.stderr and "replaced" in r.stderr
    text = "".join(row["text"] for row in all_chunks(tmp_path / "ds") if row["doc_id"] == "bad")
    assert "\ufffd" in text and text.startswith("River caf")


def test_invalid_utf8_jsonl_skip(tmp_path, build_args):
    path = _bad_utf8_jsonl(tmp_path / "c.jsonl")
    r = cli_build([path], tmp_path / "ds", build_args, "--json", "--invalid-utf8", "skip")
    s = summary_of(r)
    assert s["documents"] == 2
    assert s["skipped"]["invalid_utf8"] == 1 and s["skipped"]["invalid_utf8_skipped"] == 1
    assert f"{path}:2" in r.stderr and "skipped" in r.stderr
    assert {row["doc_id"] for row in all_chunks(tmp_path / "ds")} == {"g0", "g2"}


@pytest.mark.parametrize("mode", ["replace", "skip"])
def test_invalid_utf8_txt(tmp_path, build_args, mode):
    good_file = write_jsonl(tmp_path / "good.jsonl", [good(0)])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"Forest music \xc3\x28 ocean planet garden winter summer engine.\n")
    s = summary_of(cli_build([good_file, bad], tmp_path / "ds", build_args, "--json", "--invalid-utf8", mode))
    assert s["skipped"]["invalid_utf8"] == 1
    ids = {row["doc_id"] for row in all_chunks(tmp_path / "ds")}
    if mode == "replace":
        assert s["documents"] == 2 and "bad.txt" in ids
        text = "".join(row["text"] for row in all_chunks(tmp_path / "ds") if row["doc_id"] == "bad.txt")
        assert "\ufffd" in text
    else:
        assert s["documents"] == 1 and ids == {"g0"} and s["skipped"]["invalid_utf8_skipped"] == 1


def test_invalid_utf8_mode_is_validated_and_documented(tmp_path, corpus, build_args):
    fails(cli_build([corpus], tmp_path / "ds", build_args, "--invalid-utf8", "drop"), "--invalid-utf8", "'drop'")
    assert not (tmp_path / "ds").exists()
    help_text = runner.invoke(app, ["build", "--help"]).stdout
    assert "--invalid-utf8" in help_text and "replace" in help_text


# ---- missing fields, malformed lines ---------------------------------------------------------------
def test_missing_text_field_is_fatal_then_text_field_flag_works(tmp_path, build_args):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": f"b{i}", "body": good(i)["text"]} for i in range(4)])
    out = tmp_path / "ds"
    fails(cli_build([path], out, build_args), f"{path}:1", "'text'", "--text-field", only=False)
    no_store(out)
    # the message says what to do, and doing it works (no stale unfinished build stands in the way)
    s = summary_of(cli_build([path], out, build_args, "--json", "--text-field", "body"))
    assert s["documents"] == 4
    assert Datastore.open(out).search(["alpha river"], k=2)[0][0].doc_id.startswith("b")


def test_missing_text_field_midway_names_the_line_and_leaves_no_finished_store(tmp_path, build_args):
    recs: list = [good(i) for i in range(11)] + [{"id": "x", "content": "no text here"}] + [good(20)]
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    fails(cli_build([path], tmp_path / "ds", build_args, "--shard-docs", "5"), f"{path}:12", "'text'", only=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(StoreError):
        Datastore.open(tmp_path / "ds")


@pytest.mark.parametrize("line,needle", [
    ('{"id": "x", "text": "unterminated', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"id": "x", "text": 42}', "not a string"),
])
def test_malformed_jsonl_line_is_fatal(tmp_path, build_args, line, needle):
    path = write_jsonl(tmp_path / "c.jsonl", [good(0), good(1), line, good(3)])
    fails(cli_build([path], tmp_path / "ds", build_args), f"{path}:3", needle, only=False)
    no_store(tmp_path / "ds")


def test_parquet_without_text_column(tmp_path, build_args):
    import pyarrow as pa

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["a"], "body": ["hello world"]}), path)
    fails(cli_build([path], tmp_path / "ds", build_args), str(path), "'text'", "--text-field", only=False)
    no_store(tmp_path / "ds")


# ---- a 50 MB single-line document ------------------------------------------------------------------
def test_50mb_single_line_document_is_skipped_and_counted(tmp_path, build_args):
    path = tmp_path / "c.jsonl"
    unit = "alpha beta gamma river "
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(good(0)) + "\n")
        f.write('{"id": "huge", "text": "')
        f.write(unit * (50_000_000 // len(unit) + 1))
        f.write('"}\n')
        f.write(json.dumps(good(2)) + "\n")
    assert path.stat().st_size > 50_000_000
    r = cli_build([path], tmp_path / "ds", build_args, "--json")
    s = summary_of(r)
    assert s["documents"] == 2 and s["skipped"]["too_large"] == 1
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{path}:2" in warnings[0] and "--max-doc-mb" in warnings[0]
    assert {row["doc_id"] for row in all_chunks(tmp_path / "ds")} == {"g0", "g2"}
    Datastore.open(tmp_path / "ds", verify=True)


def test_50mb_txt_document_is_skipped_and_counted(tmp_path, build_args):
    good_file = write_jsonl(tmp_path / "good.jsonl", [good(0)])
    big = tmp_path / "big.txt"
    with open(big, "w", encoding="utf-8") as f:
        f.write("river ocean " * (50_000_000 // 12 + 1))
    r = cli_build([good_file, big], tmp_path / "ds", build_args, "--json")
    s = summary_of(r)
    assert s["documents"] == 1 and s["skipped"]["too_large"] == 1
    assert any(str(big) in line for line in r.stderr.splitlines() if line.startswith("warning:"))


def test_max_doc_mb_is_validated(tmp_path, corpus, build_args):
    fails(cli_build([corpus], tmp_path / "ds", build_args, "--max-doc-mb", "0"), "--max-doc-mb")
    fails(cli_build([corpus], tmp_path / "ds", build_args, "--shard-docs", "0"), "--shard-docs")
    assert not (tmp_path / "ds").exists()


