"""A store's manifest is not trusted (issue 11, items 4, 5 and 7).

Item 4: every path a manifest names (or its part numbers name) stays inside the store — absolute paths,
``..`` and symlinks leading out are refused in one line naming the manifest and the field, for both store
kinds — and ``--verify`` covers the manifest itself (a checksum of its content, written by the builders).
Item 5: a part with one byte flipped and the same size, searched without ``--verify``, is one line naming
the part and ``ralm info DS --verify``, not a library traceback.
Item 7: an edited encoder name is reported as what the store records, not as a ``--encoder`` flag.

Every manifest edit here that must be caught by the path checks re-seals the manifest (as a crafted one
would be), so it is the path check that refuses it, not the checksum.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from badinput import fails, runner
from conftest import write_corpus
from ralm import Datastore
from ralm.cli import app
from ralm.errors import StoreError

KEY = "manifest_sha256"


def canonical(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def edit(store: Path, change, reseal: bool = True) -> None:
    """Apply ``change`` to the store's manifest; ``reseal`` recomputes its checksum as a crafter would."""
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    if reseal:
        m[KEY] = canonical(m)
    path.write_text(json.dumps(m, indent=2))


def outside_copy(store: Path, rel: str) -> Path:
    """A copy of a store file (or folder) outside the store: same size, same bytes."""
    src = store / rel
    dst = store.parent / "outside" / Path(rel).name
    dst.parent.mkdir(exist_ok=True)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def symlink_out(store: Path, rel: str) -> Path:
    dst = outside_copy(store, rel)
    p = store / rel
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    p.symlink_to(dst, target_is_directory=dst.is_dir())
    return dst


def refused(store: Path, *needles: str) -> None:
    """The API, ``info --verify`` and ``search`` all refuse in one line naming the manifest and ``needles``."""
    with pytest.raises(StoreError) as e:
        Datastore.open(store)
    for needle in ("manifest.json", *needles):
        assert needle in str(e.value), (needle, str(e.value))
    fails(runner.invoke(app, ["info", str(store), "--verify"]), "manifest.json", *needles)
    fails(runner.invoke(app, ["search", str(store), "alpha"]), "manifest.json", *needles)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer, tiny_encoder) -> dict[str, Path]:
    """A finished dense store and a BM25 store (tiny models); tests damage copies of them."""
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    base = tmp_path_factory.mktemp("trust")
    corpus = write_corpus(base / "c.jsonl", n_docs=8, words=40)
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(base / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        for name, enc in (("dense", EncoderConfig(name=tiny_encoder, dtype="fp32")), ("bm25", EncoderConfig(name="bm25"))):
            build(BuildConfig(inputs=[str(corpus)], out=str(base / name), tokenizer=tiny_tokenizer,
                              chunking=ChunkingConfig(chunk_tokens=16), encoder=enc, shard_docs=3),
                  log=lambda m: None, progress=False)
            out[name] = base / name
    return out


@pytest.fixture
def store(built, tmp_path) -> Path:
    shutil.copytree(built["dense"], tmp_path / "ds")
    return tmp_path / "ds"


@pytest.fixture
def bm25_store(built, tmp_path) -> Path:
    shutil.copytree(built["bm25"], tmp_path / "bm")
    return tmp_path / "bm"


# ---- item 4: paths that leave the store ----------------------------------------------------------------
def _absolute_index(store: Path) -> str:
    target = outside_copy(store, json.loads((store / "manifest.json").read_text())["index"]["path"])
    edit(store, lambda m: m["index"].update(path=str(target)))
    return "index.path"


def _dotdot_file(store: Path) -> str:
    secret = store.parent / "shadow"
    secret.write_text("root:$6$secret\n" * 7)
    edit(store, lambda m: m["index"]["files"][0].update(path="../../../../../../../../../../.." + str(secret)))
    return "index.files[0].path"


def _dotdot_index(store: Path) -> str:
    target = outside_copy(store, json.loads((store / "manifest.json").read_text())["index"]["path"])
    edit(store, lambda m: m["index"].update(path=f"index/../../outside/{target.name}"))
    return "index.path"


def _part_record(store: Path) -> str:
    edit(store, lambda m: m["parts"][1]["chunks_file"].update(path="/etc/passwd"))
    return "parts[1].chunks_file.path"


@pytest.mark.parametrize("craft", [_absolute_index, _dotdot_file, _dotdot_index, _part_record])
def test_manifest_paths_outside_the_store_are_refused(store, craft):
    """Item 4: an absolute or ``..`` path in the manifest is refused, naming the field, before it is read."""
    field = craft(store)
    refused(store, field, "outside the store")
    with pytest.raises(StoreError) as e:
        Datastore.open(store, verify=True)
    assert "bytes" not in str(e.value)  # nothing about the outside file (its size) leaks


@pytest.mark.parametrize("rel,field", [("keys/part-00000.npy", "parts[0]"), ("chunks", "parts[0]"),
                                       ("index/dense-g0001.faiss", "index.path"),
                                       ("manifest.json", "the manifest itself")])
def test_symlinks_leading_outside_are_refused(store, rel, field):
    """Item 4: a store file or folder replaced by a symlink to an identical copy outside is refused."""
    symlink_out(store, rel)
    refused(store, field, "symlink")


def test_bm25_folder_files_stay_inside(bm25_store):
    """Item 4: BM25 index folders: a listed file, or one bm25s opens by name, may not lead outside."""
    m = json.loads((bm25_store / "manifest.json").read_text())
    j, rel = next((j, f["path"]) for j, f in enumerate(m["index"]["files"]) if f["path"].endswith("vocab.index.json"))
    symlink_out(bm25_store, rel)
    refused(bm25_store, f"index.files[{j}].path", "symlink")
    # the same file dropped from index.files (so --verify never sees it): refused when the index loads
    edit(bm25_store, lambda m: m["index"]["files"].pop(j))
    ds = Datastore.open(bm25_store, verify=True)
    with pytest.raises(StoreError, match=r"index\.path .*symlink"):
        ds.search(["alpha"], k=1)
    fails(runner.invoke(app, ["search", str(bm25_store), "alpha"]), "manifest.json", rel, "symlink")


# ---- item 4: the manifest's own content ---------------------------------------------------------------
def test_new_manifests_carry_a_checksum_of_their_content(built, tmp_path):
    """Item 4: the builder stores the sha256 of the manifest's canonical JSON in it; reformatting keeps it valid."""
    for store in built.values():
        m = json.loads((store / "manifest.json").read_text())
        assert m[KEY] == canonical(m)
    copy = tmp_path / "ds"
    shutil.copytree(built["dense"], copy)
    (copy / "manifest.json").write_text(json.dumps(json.loads((copy / "manifest.json").read_text())))  # one line
    (tmp_path / "link").symlink_to(copy)  # a store reached through a symlinked folder is still inside itself
    r = runner.invoke(app, ["info", str(tmp_path / "link"), "--verify", "--json"])
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert json.loads(r.stdout)["manifest_checksum"] == json.loads((copy / "manifest.json").read_text())[KEY]


@pytest.mark.parametrize("change", [lambda m: m["encoder"].update(name="other-encoder"),
                                    lambda m: m["counts"].update(chunks=m["counts"]["chunks"] + 1),
                                    lambda m: m["tokenizer"].update(fingerprint="0" * 16)])
def test_edited_manifest_is_refused(store, change):
    """Item 4: ``--verify`` (and any open) refuses a manifest whose content no longer matches its checksum."""
    edit(store, change, reseal=False)
    with pytest.raises(StoreError, match="does not match"):
        Datastore.open(store)
    line = fails(runner.invoke(app, ["info", str(store), "--verify"]), "manifest.json", "edited")
    assert "--encoder" not in line


def test_manifest_without_checksum_opens_and_verify_says_so(store):
    """Item 4: a store written before checksums still opens; ``--verify`` says plainly its manifest has none."""
    edit(store, lambda m: m.pop(KEY, None), reseal=False)
    Datastore.open(store)
    r = runner.invoke(app, ["info", str(store), "--verify", "--json"])
    assert r.exit_code == 0, r.output
    assert "manifest.json" in r.stderr and "has no checksum" in r.stderr, r.stderr
    assert json.loads(r.stdout)["manifest_checksum"].startswith("none")
    r = runner.invoke(app, ["search", str(store), "alpha", "-k", "1"])  # without --verify: quiet
    assert r.exit_code == 0 and "checksum" not in r.stderr, r.output


# ---- item 7: an edited encoder is what the store records, not a flag --------------------------------
@pytest.mark.parametrize("reseal", [True, False])
def test_edited_encoder_names_the_manifest_not_a_flag(store, tmp_path, reseal):
    """Item 7: an unloadable encoder recorded in the manifest is reported as the manifest's, never as ``--encoder``."""
    missing = str(tmp_path / "no-such-encoder")
    edit(store, lambda m: m["encoder"].update(name=missing), reseal=reseal)
    line = fails(runner.invoke(app, ["search", str(store), "alpha"]), "manifest.json")
    assert "--encoder" not in line
    if reseal:  # a consistent manifest recording an encoder that is not there
        assert "records encoder" in line and missing in line
    else:
        assert "edited" in line


# ---- item 5: a damaged part of the right size, searched without --verify -----------------------------
def _flip(path: Path, pos: int) -> bytes:
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[pos % len(data)] ^= 0xFF
    path.write_bytes(bytes(damaged))
    return data


def _text_column_end(path: Path) -> int:
    """The last byte of the text column's pages: compressed chunk text, covered only by the page CRC."""
    import pyarrow.parquet as pq

    col = next(c for rg in [pq.ParquetFile(path).metadata.row_group(0)] for c in map(rg.column, range(rg.num_columns))
               if c.path_in_schema == "text")
    return (col.dictionary_page_offset or col.data_page_offset) + col.total_compressed_size - 1


@pytest.mark.parametrize("rel,where", [("chunks/part-00001.parquet", "middle"), ("chunks/part-00001.parquet", "text"),
                                       ("keys/part-00001.npy", "header"), ("index/dense-g0001.faiss", "header")])
def test_flipped_byte_without_verify_is_one_line(store, rel, where):
    """Item 5: one flipped byte, same size: search names the file and says to run ``ralm info DS --verify``."""
    path = store / rel
    size = path.stat().st_size
    _flip(path, {"middle": size // 2, "text": _text_column_end(path) if where == "text" else 0, "header": 9}[where])
    n = Datastore.open(store).manifest["counts"]["chunks"]
    r = runner.invoke(app, ["search", str(store), "alpha river", "-k", str(n)])  # every part is read
    fails(r, str(path), "corrupt", f"ralm info {store} --verify")


def test_no_flipped_byte_in_a_part_is_read_as_data(store):
    """Item 5: flipping any byte of a part either changes nothing that is read or is refused naming the part
    (page CRCs cover the pages, the column types the footer); never altered text, never a traceback."""
    part = store / "chunks" / "part-00001.parquet"
    ds = Datastore.open(store)
    rows = range(int(ds.offsets[1]), int(ds.offsets[2]))
    clean = [ds.chunk(r) for r in rows]
    data = part.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # schema and column types live there
    positions = [*range(4, footer, 13), *range(footer, len(data), 3)]
    caught = 0
    for pos in positions:
        _flip(part, pos)
        Datastore._part_table.cache_clear()  # read the damaged file, as a fresh process would
        try:
            assert [ds.chunk(r) for r in rows] == clean, pos
        except StoreError as e:
            assert str(part) in str(e) and "--verify" in str(e), str(e)
            caught += 1
        part.write_bytes(data)
    assert caught > len(positions) // 2


def test_parts_are_written_with_page_checksums(built):
    """Item 5: new parts carry Parquet page CRCs, so damage inside text is caught, not returned as text."""
    import pyarrow.parquet as pq

    path = built["dense"] / "chunks" / "part-00000.parquet"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    for c in range(meta.num_columns):
        with open(path, "rb") as f:
            f.seek(meta.column(c).data_page_offset)
            assert _page_header_has_crc(f.read(32)), meta.column(c).path_in_schema


def _page_header_has_crc(header: bytes) -> bool:
    """Whether a thrift-compact PageHeader sets field 4 (crc) right after fields 1-3 (type and sizes, i32)."""
    i = 0
    for _ in range(4):
        if header[i] != 0x15:  # field delta 1, compact type i32
            return False
        i += 1
        while header[i] & 0x80:  # skip the varint value
            i += 1
        i += 1
    return True


# ---- the kNN-LM store: the same rules ------------------------------------------------------------------
@pytest.fixture(scope="module")
def knn_built(tmp_path_factory, tiny_lm) -> Path:
    from ralm.datastore.index import IndexConfig
    from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

    tmp = tmp_path_factory.mktemp("knn-trust")
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=4, words=40)
    build_knn_store(KNNBuildConfig([str(corpus)], str(tmp / "knn"), model=tiny_lm, context=32, window_stride=16,
                                   index=IndexConfig("flat", metric="l2")), log=lambda m: None, progress=False)
    return tmp / "knn"


@pytest.fixture
def knn(knn_built, tmp_path) -> Path:
    shutil.copytree(knn_built, tmp_path / "knn")
    return tmp_path / "knn"


def _knn_absolute_index(store: Path) -> str:
    target = outside_copy(store, "index/knn.faiss")
    edit(store, lambda m: m["index"].update(path=str(target)))
    return "index.path"


def _knn_dotdot_file(store: Path) -> str:
    edit(store, lambda m: m["index"]["files"][2].update(path="../../../../../../etc/shadow"))
    return "index.files[2].path"


def _knn_symlinked_documents(store: Path) -> str:
    symlink_out(store, "documents.json")
    return "documents.json"


def _knn_symlinked_values(store: Path) -> str:
    symlink_out(store, "values/part-00000.npy")
    return "parts[0].part (values)"


def _knn_edited(store: Path) -> str:
    edit(store, lambda m: m.update(context=m["context"] * 2), reseal=False)
    return "does not match"


@pytest.mark.parametrize("craft", [_knn_absolute_index, _knn_dotdot_file, _knn_symlinked_documents,
                                   _knn_symlinked_values, _knn_edited])
def test_knn_store_manifest_is_not_trusted(knn, craft):
    """Item 4 for kNN-LM stores: paths stay inside, the checksum covers the manifest."""
    from ralm.datastore.knn_store import KNNStore

    needle = craft(knn)
    for verify in (False, True):
        with pytest.raises(StoreError) as e:
            KNNStore.open(knn, verify=verify)
        assert "manifest.json" in str(e.value) and needle in str(e.value), str(e.value)


def test_knn_store_damaged_values_are_one_line(knn, knn_built):
    """Item 5 for kNN-LM stores: a values part whose bytes were damaged (same size) is refused, not used."""
    from ralm.datastore.knn_store import KNNStore

    m = json.loads((knn_built / "manifest.json").read_text())
    assert m[KEY] == canonical(m)
    path = knn / "values" / "part-00000.npy"
    data = bytearray(path.read_bytes())
    data[-4:] = b"\xff\xff\xff\x7f"  # a next-token id far past the vocabulary
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="outside"):
        KNNStore.open(knn)
    header = bytearray(path.read_bytes())
    header[1] ^= 0xFF  # not a .npy any more
    path.write_bytes(bytes(header))
    with pytest.raises(StoreError, match="corrupt") as e:
        KNNStore.open(knn)
    assert str(path) in str(e.value)
    assert os.path.getsize(path) == len(data)
