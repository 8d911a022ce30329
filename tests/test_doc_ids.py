"""Document ids are unique per input file, and repeated explicit ids are warned about or refused (issue 11, item 6).

Same-document exclusion goes by document id: two documents sharing one are one document to it, so a
neighbour from the other is excluded (or kept) as if it came from the evaluated document.
"""

from __future__ import annotations

import json

import pytest

from badinput import all_chunks, cli_build, fails, no_store, write_jsonl
from ralm.data.corpus import CorpusConfig, ReadStats, iter_documents, list_input_files
from ralm.errors import RalmError

TEXT = "Alpha beta gamma river {}. Mountain city forest music ocean planet engine garden winter."


def _same_name_files(tmp_path, ids: bool = False):
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        recs = [{"text": TEXT.format(f"{sub}{i}"), **({"id": f"{sub}{i}"} if ids else {})} for i in range(3)]
        paths.append(write_jsonl(tmp_path / sub / "x.jsonl", recs))
    return paths


def test_same_file_name_in_two_folders_gives_distinct_ids(tmp_path):
    """Item 6: `build a/x.jsonl b/x.jsonl` without ids made both files' documents `x.jsonl:N`."""
    a, b = _same_name_files(tmp_path)
    ids = [d.id for d in iter_documents([a, b], CorpusConfig())]
    assert ids == ["a/x.jsonl:1", "a/x.jsonl:2", "a/x.jsonl:3", "b/x.jsonl:1", "b/x.jsonl:2", "b/x.jsonl:3"]
    # ids that were unique already do not change: one file, or files of distinct names
    assert [d.id for d in iter_documents([a], CorpusConfig())][0] == "x.jsonl:1"
    (tmp_path / "c").mkdir()
    y = write_jsonl(tmp_path / "c" / "y.jsonl", [{"text": "other"}])
    assert [name for _, name in list_input_files([a, y])] == ["x.jsonl", "y.jsonl"]
    # a folder's files are named folder/path already: no clash with a same-named file given directly
    assert [name for _, name in list_input_files([a, tmp_path / "b"])] == ["x.jsonl", "b/x.jsonl"]
    # names grow by just the parents that tell them apart
    (tmp_path / "p" / "data").mkdir(parents=True)
    (tmp_path / "q" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "p" / "data" / "z.jsonl", [{"text": "one"}])
    write_jsonl(tmp_path / "q" / "data" / "z.jsonl", [{"text": "two"}])
    assert [name for _, name in list_input_files([tmp_path / "p" / "data", tmp_path / "q" / "data"])] == [
        "p/data/z.jsonl", "q/data/z.jsonl"]


def test_build_of_two_same_named_files_keeps_their_documents_apart(tmp_path, build_args):
    """Item 6: the store's chunks carry one id per document, not one per pair of same-named files."""
    a, b = _same_name_files(tmp_path)
    r = cli_build([a, b], tmp_path / "ds", build_args)
    assert r.exit_code == 0, r.output
    assert "repeat" not in r.stderr  # generated ids never repeat
    assert {c["doc_id"] for c in all_chunks(tmp_path / "ds")} == {f"{s}/x.jsonl:{i}" for s in "ab" for i in (1, 2, 3)}


def test_a_file_named_twice_is_refused(tmp_path, build_args):
    """Item 6: one file given twice (directly, or also inside a given folder) would store each document twice."""
    a, _ = _same_name_files(tmp_path)
    with pytest.raises(RalmError, match="named twice"):
        list_input_files([a, a])
    with pytest.raises(RalmError, match="named twice"):
        list_input_files([tmp_path / "a", a])
    fails(cli_build([a, tmp_path / "a" / ".." / "a" / "x.jsonl"], tmp_path / "ds", build_args), "named twice")
    no_store(tmp_path / "ds")


def test_repeated_explicit_ids_are_counted_with_examples(tmp_path):
    """Item 6: three documents sharing an id were silently one document; now a warning counts them."""
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "dup", "text": TEXT.format(i)} for i in range(3)]
                    + [{"id": "u", "text": "unique"}, {"id": 7, "text": "seven"}, {"id": "7", "text": "seven again"}])
    stats = ReadStats()
    docs = list(iter_documents([p], CorpusConfig(), stats))
    assert len(docs) == 6  # kept: warn is the default
    assert stats.duplicate_ids == 3
    warning = stats.warnings[0]
    assert "3 document(s) repeat" in warning and "2 id(s)" in warning and "'dup' x3" in warning and "'7' x2" in warning
    assert "--duplicate-ids error" in warning


def test_duplicate_ids_error_refuses_the_corpus(tmp_path, build_args):
    """Item 6: `--duplicate-ids error` refuses a corpus with a repeated id, naming the file and the id."""
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "dup", "text": TEXT.format(i)} for i in range(3)])
    with pytest.raises(RalmError, match="'dup'"):
        list(iter_documents([p], CorpusConfig(duplicate_ids="error")))
    fails(cli_build([p], tmp_path / "ds", build_args, "--duplicate-ids", "error"), str(p), "'dup'", "--duplicate-ids")
    no_store(tmp_path / "ds")
    fails(cli_build([p], tmp_path / "ds", build_args, "--duplicate-ids", "maybe"), "--duplicate-ids", "'warn' or 'error'")


def test_build_warns_about_repeated_ids(tmp_path, build_args):
    """Item 6: the default build keeps the documents and says how many ids repeat."""
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "dup", "text": TEXT.format(i)} for i in range(3)]
                    + [{"id": "u", "text": TEXT.format("u")}])
    r = cli_build([p], tmp_path / "ds", build_args, "--json")
    assert r.exit_code == 0, r.output
    warn = [line for line in r.stderr.splitlines() if line.startswith("warning:") and "repeat" in line]
    assert len(warn) == 1 and "2 document(s)" in warn[0] and "'dup' x3" in warn[0], r.stderr
    assert json.loads(r.stdout)["documents"] == 4
