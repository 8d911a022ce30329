"""Bad input: every case gets a one-line error naming the input, a non-zero exit where it is fatal, and
never a half-written store.

Exit codes and messages are checked through the CLI (``CliRunner``); opening and searching stores
through the Python API.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_corpus
from ralm import Datastore
from ralm.cli import app
from ralm.datastore.build import build
from ralm.errors import IncompatibleError, RalmError, StoreError

runner = CliRunner()


# ---- helpers ---------------------------------------------------------------------------------------
def fails(r, *needles: str, only: bool = True) -> str:
    """Assert a non-zero exit with exactly one ``error:`` line (the last one) that contains ``needles``."""
    assert r.exit_code != 0, r.output
    lines = r.stderr.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    if only:  # nothing else was printed: the whole report is that one line
        assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def no_store(out: Path) -> None:
    """Nothing store-like is left behind: no folder at all (the build created it) or an empty one."""
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return path


def good(i: int) -> dict:
    return {"id": f"g{i}", "text": f"Alpha beta gamma river {i}. Mountain city forest music ocean planet."}


def cli_build(inputs, out, build_args, *extra) -> object:
    return runner.invoke(app, ["build", *map(str, inputs), "--out", str(out), *build_args, *extra])


def summary_of(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def all_chunks(out: Path) -> list[dict]:
    rows: list[dict] = []
    for part in sorted((out / "chunks").glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_tokenizer, tiny_encoder) -> Path:
    """A finished 8-document store (tiny models); tests that damage it work on a copy (``store``)."""
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    base = tmp_path_factory.mktemp("bad-input-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(base / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        corpus = write_corpus(base / "small.jsonl", n_docs=8, words=40)
        cfg = BuildConfig(inputs=[str(corpus)], out=str(base / "ds"), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(chunk_tokens=16), encoder=EncoderConfig(name=tiny_encoder, dtype="fp32"),
                          shard_docs=3)
        build(cfg, log=lambda m: None, progress=False)
    return base / "ds"


@pytest.fixture
def store(small_store, tmp_path) -> Path:
    out = tmp_path / "ds"
    shutil.copytree(small_store, out)
    return out


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


# ---- store directories: missing, unfinished, truncated, corrupt, not a store -------------------------
def test_open_nonexistent_store(tmp_path):
    with pytest.raises(StoreError, match="no such datastore"):
        Datastore.open(tmp_path / "nope")
    fails(runner.invoke(app, ["search", str(tmp_path / "nope"), "alpha"]), str(tmp_path / "nope"), "no such")
    fails(runner.invoke(app, ["info", str(tmp_path / "nope")]), str(tmp_path / "nope"))


def test_open_a_folder_that_is_not_a_store(tmp_path):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "data.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(StoreError, match="not a ralm datastore"):
        Datastore.open(folder)
    fails(runner.invoke(app, ["search", str(folder), "alpha"]), str(folder), "not a ralm datastore")


@pytest.mark.parametrize("content,needle", [("{not json", "corrupt manifest"),
                                            ('{"format": "other"}', "not a ralm datastore"),
                                            ('{"format": "ralm-datastore", "version": 99}', "version 99")])
def test_open_with_a_bad_manifest(store, content, needle):
    (store / "manifest.json").write_text(content)
    with pytest.raises(StoreError, match=needle):
        Datastore.open(store)
    fails(runner.invoke(app, ["info", str(store)]), "manifest.json", needle)


class _Crash(Exception):
    pass


def _interrupted_build(monkeypatch, build_config, corpus, out, shards_done: int = 1) -> None:
    """Run a build that dies after ``shards_done`` shards (as a kill would, leaving ``.build``)."""
    import ralm.datastore.build as build_mod

    real = build_mod.process_shard
    calls = []

    def dying(task):
        if len(calls) == shards_done:
            raise _Crash
        calls.append(task.part)
        return real(task)

    monkeypatch.setattr(build_mod, "process_shard", dying)
    with pytest.raises(_Crash):
        build(build_config([corpus], out, shard_docs=7), log=lambda m: None, progress=False)
    monkeypatch.setattr(build_mod, "process_shard", real)
    assert not (out / "manifest.json").exists()
    assert len(list((out / ".build" / "done").glob("*.json"))) == shards_done


def test_unfinished_store_is_refused(tmp_path, corpus, build_config, monkeypatch):
    out = tmp_path / "ds"
    _interrupted_build(monkeypatch, build_config, corpus, out)
    with pytest.raises(StoreError, match="unfinished"):
        Datastore.open(out)
    fails(runner.invoke(app, ["search", str(out), "alpha"]), str(out), "unfinished", "ralm build")
    fails(runner.invoke(app, ["info", str(out)]), str(out), "unfinished")


def test_rerun_unfinished_build_with_other_parameters_needs_force(tmp_path, corpus, build_config, build_args,
                                                                  monkeypatch):
    out = tmp_path / "ds"
    _interrupted_build(monkeypatch, build_config, corpus, out)
    before = snapshot(out)
    fails(cli_build([corpus], out, build_args, "--shard-docs", "7", "--chunk-tokens", "32"),
          str(out), "unfinished", "--force", only=False)
    assert snapshot(out) == before
    # other inputs are refused the same way
    other = write_corpus(tmp_path / "other.jsonl", n_docs=3, seed=5)
    fails(cli_build([other], out, build_args, "--shard-docs", "7"), "unfinished", "--force", only=False)
    assert snapshot(out) == before
    # --force starts over with the new parameters
    s = summary_of(cli_build([corpus], out, build_args, "--json", "--shard-docs", "7", "--chunk-tokens", "32",
                             "--force"))
    assert s["documents"] == 30
    assert Datastore.open(out, verify=True).manifest["chunking"]["chunk_tokens"] == 32


@pytest.mark.parametrize("which", ["chunks", "keys"])
def test_truncated_part_file_is_refused(store, which):
    suffix = "parquet" if which == "chunks" else "npy"
    part = store / which / f"part-00001.{suffix}"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated") as e:
        Datastore.open(store)
    assert str(part) in str(e.value)
    fails(runner.invoke(app, ["search", str(store), "alpha"]), str(part), "truncated")


def test_missing_part_file_is_refused(store):
    part = store / "keys" / "part-00002.npy"
    part.unlink()
    with pytest.raises(StoreError, match="missing"):
        Datastore.open(store)
    fails(runner.invoke(app, ["info", str(store)]), str(part), "missing")


@pytest.mark.parametrize("rel", ["keys/part-00000.npy", "chunks/part-00002.parquet", "index/dense-g0001.faiss"])
def test_flipped_byte_fails_checksums(store, rel):
    path = store / rel
    data = bytearray(path.read_bytes())
    data[len(data) - 40] ^= 0xFF
    path.write_bytes(bytes(data))
    Datastore.open(store)  # sizes match: only the checksums can tell
    with pytest.raises(StoreError, match="checksum mismatch") as e:
        Datastore.open(store, verify=True)
    assert str(path) in str(e.value)
    fails(runner.invoke(app, ["search", str(store), "alpha", "--verify"]), str(path), "checksum mismatch")
    fails(runner.invoke(app, ["info", str(store), "--verify"]), str(path), "checksum mismatch")


def test_intact_store_passes_verify(small_store):
    r = runner.invoke(app, ["search", str(small_store), "alpha river", "-k", "2", "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)[0]["hits"]) == 2


# ---- k ----------------------------------------------------------------------------------------------
def test_k_out_of_range_api(small_store):
    ds = Datastore.open(small_store)
    n = len(ds)
    for k in (0, -1, n + 1):
        with pytest.raises(RalmError, match=f"k={k}"):
            ds.search(["alpha"], k=k)
    with pytest.raises(RalmError, match="k="):
        ds.search(["alpha"], k=2.5)
    assert len(ds.search(["alpha"], k=n)[0]) == n  # the whole store is fine


@pytest.mark.parametrize("flag", ["-k=0", "--k=-1", "-k=100000"])
def test_k_out_of_range_cli(small_store, flag):
    flag_name, value = flag.split("=")
    fails(runner.invoke(app, ["search", str(small_store), "alpha", flag_name, value]), f"k={value}")


# ---- another encoder / tokenizer -------------------------------------------------------------------
def test_query_vectors_of_the_wrong_dim(small_store):
    ds = Datastore.open(small_store)
    dim = ds.manifest["encoder"]["dim"]
    with pytest.raises(IncompatibleError, match=f"dim {dim}"):
        ds.search(np.zeros((2, dim + 1), dtype=np.float32), k=1)
    with pytest.raises(IncompatibleError):
        ds.search(np.zeros(dim, dtype=np.float32), k=1)
    assert len(ds.search(np.ones((1, dim), dtype=np.float32), k=1)[0]) == 1


def test_search_with_another_encoder_is_refused(small_store, tiny_encoder):
    r = runner.invoke(app, ["search", str(small_store), "alpha", "--encoder", "minilm"])
    fails(r, "'minilm'", repr(tiny_encoder), str(small_store))
    ds = Datastore.open(small_store)
    with pytest.raises(IncompatibleError, match="minilm"):
        ds.check_compatible(encoder="minilm")
    ds.check_compatible(encoder=tiny_encoder)  # its own encoder is fine
    r = runner.invoke(app, ["search", str(small_store), "alpha", "--encoder", tiny_encoder, "-k", "1"])
    assert r.exit_code == 0, r.output


def test_another_tokenizer_is_refused(small_store):
    ds = Datastore.open(small_store)
    fp = ds.manifest["tokenizer"]["fingerprint"]
    with pytest.raises(IncompatibleError) as e:
        ds.check_compatible(tokenizer_fingerprint="0123456789abcdef", tokenizer_name="other-tok")
    assert fp in str(e.value) and "0123456789abcdef" in str(e.value) and "other-tok" in str(e.value)
    ds.check_compatible(tokenizer_fingerprint=fp)


def test_encoder_whose_weights_changed_is_refused(tmp_path, corpus, build_config, tiny_encoder, monkeypatch):
    """A store built with an encoder folder whose weights were later replaced: text queries refuse."""
    import torch
    from transformers import BertModel

    from ralm.datastore import encoders
    from ralm.datastore.encoders import EncoderConfig

    enc_dir = tmp_path / "enc"
    shutil.copytree(tiny_encoder, enc_dir)
    monkeypatch.setattr(encoders, "_LOADED", {})
    build(build_config([corpus], tmp_path / "ds", encoder=EncoderConfig(name=str(enc_dir), dtype="fp32")),
          log=lambda m: None, progress=False)
    model = BertModel.from_pretrained(enc_dir)
    torch.manual_seed(123)
    BertModel(model.config).eval().save_pretrained(enc_dir)
    monkeypatch.setattr(encoders, "_LOADED", {})  # a fresh process
    ds = Datastore.open(tmp_path / "ds", verify=True)
    with pytest.raises(IncompatibleError, match="different weights"):
        ds.search(["alpha river"], k=1)


def test_bm25_store_refuses_vectors(tmp_path, build_config):
    from ralm.datastore.encoders import EncoderConfig

    path = write_jsonl(tmp_path / "c.jsonl", [good(i) for i in range(4)])
    build(build_config([path], tmp_path / "ds", encoder=EncoderConfig(name="bm25")), log=lambda m: None,
          progress=False)
    ds = Datastore.open(tmp_path / "ds")
    with pytest.raises(IncompatibleError, match="BM25"):
        ds.search(np.zeros((1, 32), dtype=np.float32), k=1)
    with pytest.raises(IncompatibleError):
        ds.check_compatible(encoder="minilm")


# ---- --out, --force, --add -------------------------------------------------------------------------
def test_force_on_a_non_store_directory_is_refused_and_touches_nothing(tmp_path, corpus, build_args):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3\n")
    before = snapshot(out)
    fails(cli_build([corpus], out, build_args, "--force"), str(out), "not a ralm datastore", "--force")
    assert snapshot(out) == before
    fails(cli_build([corpus], out, build_args), str(out), "not a ralm datastore")
    assert snapshot(out) == before


def test_out_is_a_file(tmp_path, corpus, build_args):
    out = tmp_path / "file"
    out.write_text("x")
    fails(cli_build([corpus], out, build_args), str(out), "not a directory")
    fails(cli_build([corpus], out, build_args, "--force"), str(out), "not a directory")
    assert out.read_text() == "x"


def test_force_and_add_together(tmp_path, corpus, build_args, store):
    before = snapshot(store)
    fails(cli_build([corpus], store, build_args, "--force", "--add"), "--force", "--add")
    assert snapshot(store) == before
    fails(cli_build([corpus], tmp_path / "new", build_args, "--force", "--add"), "--force", "--add")
    assert not (tmp_path / "new").exists()


def test_add_to_a_missing_store(tmp_path, corpus, build_args):
    fails(cli_build([corpus], tmp_path / "nope", build_args, "--add"), "--add", str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_add_to_an_unfinished_first_build(tmp_path, corpus, build_config, build_args, monkeypatch):
    out = tmp_path / "ds"
    _interrupted_build(monkeypatch, build_config, corpus, out)
    before = snapshot(out)
    fails(cli_build([corpus], out, build_args, "--add"), "--add", str(out))
    assert snapshot(out) == before


def test_add_with_different_chunking_is_refused(tmp_path, build_args, store):
    more = write_corpus(tmp_path / "more.jsonl", n_docs=3, seed=9, prefix="m")
    before = snapshot(store)
    fails(cli_build([more], store, build_args, "--add", "--chunk-tokens", "32"), "--add", "chunking", only=False)
    assert snapshot(store) == before
    fails(cli_build([more], store, build_args, "--add", "--tokenizer", str(tmp_path)), only=False)
    assert snapshot(store) == before
    Datastore.open(store, verify=True)


def test_add_of_an_empty_corpus_is_refused_and_changes_nothing(tmp_path, build_args, store):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "z", "text": "  "}\n')
    before = snapshot(store)
    fails(cli_build([empty], store, build_args, "--add"), str(empty), "empty corpus", only=False)
    assert snapshot(store) == before
    assert not (store / ".build").exists()
    Datastore.open(store, verify=True)
