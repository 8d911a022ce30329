"""The idx format of (Fashion-)MNIST, read with numpy: ``read_idx(path) -> np.ndarray``, plain or ``.gz``.

Layout (big-endian): two zero bytes, a type code, the number of dimensions ``d``; then ``d`` uint32 sizes;
then the values in C order. No kept library reads it without pulling in a framework's data stack
(torchvision, tensorflow-datasets), and the format is twelve lines.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ralm.errors import RalmError

# type code -> big-endian numpy dtype
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an idx file (gzip-compressed or not, told by its first bytes), in native byte
    order; a one-line ``RalmError`` naming the file for a missing, unreadable, truncated or malformed one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise RalmError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a cut-off gzip stream
        raise RalmError(f"{path}: unreadable idx file ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _DTYPES or raw[3] == 0:
        raise RalmError(f"{path}: not an idx file (bad magic {raw[:4].hex() or 'empty'})")
    ndim, dtype = raw[3], np.dtype(_DTYPES[raw[2]])
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise RalmError(f"{path}: truncated idx file (header cut off)")
    shape = tuple(int(x) for x in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    want = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != want:
        what = "truncated" if len(raw) - head < want else "malformed"
        raise RalmError(f"{path}: {what} idx file: shape {shape} needs {want:,} data bytes, found {len(raw) - head:,}")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))
