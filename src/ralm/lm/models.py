"""Causal language models with their tokenizers: ``load(name_or_path)`` from a preset, a folder, a GGUF file or a hub id.

- Preset (``smollm2-135m``, the default, or ``gemma3-270m``): the GGUF file from the preset's package is
  dequantised to float32 once (~25-60 s) and saved, with a copy of the preset's cached tokenizer, as a
  safetensors folder ``$RALM_CACHE_DIR/models/<preset>/model``; later loads read that folder (about a second).
  The tokenizer copy is the same one ``presets.load_tokenizer(preset)`` serves to the datastore build, so a
  store built with the preset tokenizer matches the preset model.
- ``*.gguf`` file: converted once the same way into ``models/gguf-<sha256[:16]>/model``, keyed by the file's
  content (hashing costs ~0.3 s per 100 MB on each load; the converted folder takes 4 bytes a parameter).
- Folder: a regular transformers folder (``config.json``, weights, tokenizer).
- Anything else is tried as a hub id; failing that, a one-line ``RalmError`` names the input and the presets.

A tokenizer without a pad token gets ``pad = eos`` (the model's ``pad_token_id`` too): batched scoring
masks padding with the attention mask, so which id pads does not matter.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ralm.core.start_token import start_token
from ralm.errors import RalmError
from ralm.lm.presets import (
    DEFAULT_LM,
    PRESETS,
    _preset_tokenizer_dir,
    _tokenizer_from_gguf,
    cache_dir,
    convert_once,
    declare_start_token,
    preset_dir,
    preset_gguf,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedLM:
    """A causal LM in eval mode and its tokenizer (pad token always set)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    name: str  # what the user passed
    path: str  # the folder it was loaded from

    def describe(self) -> dict[str, Any]:
        """Name, folder, architecture, size, vocabulary, context length, tokenizer fingerprint and start token."""
        cfg = self.model.config.get_text_config()
        max_ctx = getattr(cfg, "max_position_embeddings", None)
        if max_ctx is None and self.tokenizer.model_max_length < 10**9:
            max_ctx = self.tokenizer.model_max_length
        return {
            "name": self.name,
            "path": self.path,
            "architecture": type(self.model).__name__,
            "n_params": self.model.num_parameters(),
            "vocab": cfg.vocab_size,
            "max_context": max_ctx,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "device": str(self.model.device),
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "start_token": start_token(self.tokenizer),
        }


def load(name_or_path: str = DEFAULT_LM, device: str = "cpu", dtype: str = "float32") -> LoadedLM:
    """Load a causal LM and its tokenizer from a preset name, a model folder, a ``.gguf`` file or a hub id.

    ``device``: ``cpu``, ``cuda``/``cuda:N`` (error if unavailable) or ``auto`` (cuda when available).
    ``dtype``: ``float32`` (default), ``bfloat16`` or ``float16``.
    """
    # torch and transformers (seconds to import) load here, not at the top: `import ralm` reaches ralm.lm
    # through datastore.store -> encoders -> lm.presets, and every CLI start imports ralm
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ralm shows its own progress; a bar per load is noise

    if dtype not in DTYPES:
        raise RalmError(f"--lm-dtype {dtype}: expected one of {', '.join(DTYPES)}")
    torch_dtype = getattr(torch, DTYPES[dtype])
    dev = _device(device)
    src = model_dir(name_or_path)
    model, tok = _load_folder(name_or_path, src, torch_dtype)
    declare_start_token(tok, name_or_path)  # a preset's plain-text start token, not its GGUF's chat BOS
    path = src if Path(src).is_dir() else _hub_snapshot(src)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tok.pad_token_id
    return LoadedLM(model=model.to(dev).eval(), tokenizer=tok, name=name_or_path, path=str(path))


def model_dir(name_or_path: str) -> str:
    """The folder (or, failing all else, the hub id) that ``name_or_path`` loads from, converting once if needed."""
    if name_or_path in PRESETS:
        return str(_preset_model_dir(name_or_path))
    p = Path(name_or_path).expanduser()
    if name_or_path.endswith(".gguf"):
        if not p.is_file():
            raise RalmError(f"model {name_or_path}: no such GGUF file")
        return str(_gguf_model_dir(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise RalmError(f"model {name_or_path}: folder has no config.json (not a transformers model folder)")
        return str(p)
    if not _HUB_ID.match(name_or_path):
        raise RalmError(f"model {name_or_path}: no such folder, and not a preset ({', '.join(PRESETS)}) or a hub id")
    return name_or_path


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RalmError(f"--device {device}: CUDA is not available on this machine (use cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise RalmError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    return device


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _load_folder(name: str, src: str, torch_dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(src).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        if local:
            raise RalmError(f"model {name}: cannot load a causal LM and tokenizer from {src} ({_one_line(e)})") from None
        raise RalmError(f"model {name}: not a preset ({', '.join(PRESETS)}), a model folder, a GGUF file, "
                        f"or a reachable hub id ({_one_line(e)})") from None
    if len(tok) > model.config.get_text_config().vocab_size:
        raise RalmError(f"model {name}: its tokenizer has {len(tok)} tokens but the model only "
                        f"{model.config.get_text_config().vocab_size} embeddings")
    return model, tok


def _hub_snapshot(hub_id: str) -> str:
    """Local snapshot folder of a hub model that was just loaded (its id if that cannot be found)."""
    try:
        from transformers.utils import cached_file

        return str(Path(cached_file(hub_id, "config.json")).parent)
    except Exception:
        return hub_id


# ---- GGUF -> safetensors folder, once ---------------------------------------------------------------
def _model_from_gguf(gguf: Path) -> Any:
    """A float32 causal LM read (dequantised) out of a GGUF file (slow: ~25 s for 135M parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    # transformers insists on `accelerate` (a dependency) being installed for gguf_file loads
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantised already; drop what would stop save_pretrained
        quantizer.remove_quantization_config(model)
    return model


def _write_gguf_folder(gguf: Path, out: Path, tokenizer_dir: Path | None = None) -> None:
    """Save the GGUF's model as safetensors into ``out``, with the tokenizer from ``tokenizer_dir`` (or the file)."""
    try:
        model = _model_from_gguf(gguf)
    except RalmError:
        raise
    except Exception as e:
        raise RalmError(f"model {gguf}: cannot convert this GGUF file ({_one_line(e)})") from None
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)
    else:
        _tokenizer_from_gguf(gguf).save_pretrained(out)


def _preset_model_dir(name: str) -> Path:
    preset = PRESETS[name]

    def write(tmp: Path) -> None:
        tok_dir = _preset_tokenizer_dir(preset)  # converted once, shared with load_tokenizer(name)
        with preset_gguf(preset) as gguf:
            _write_gguf_folder(gguf, tmp, tok_dir)

    return convert_once(preset_dir(preset, "model"), write, "config.json")


def _gguf_model_dir(gguf: Path) -> Path:
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    out = cache_dir() / "models" / f"gguf-{digest.hexdigest()[:16]}" / "model"
    return convert_once(out, lambda tmp: _write_gguf_folder(gguf, tmp), "config.json")
