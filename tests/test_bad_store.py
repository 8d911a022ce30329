"""Bad stores and uses: unfinished, truncated or corrupt stores, k out of range, another encoder or
tokenizer, and --out/--force/--add misuse. One-line errors, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from badinput import cli_build, fails, good, runner, snapshot, summary_of, write_jsonl
from conftest import write_corpus
from ralm import Datastore
from ralm.cli import app
from ralm.datastore.build import build
from ralm.errors import IncompatibleError, RalmError, StoreError


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
