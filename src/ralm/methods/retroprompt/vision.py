"""RetroPrompt on images: a trained head over frozen EfficientNet-Lite0 features, as a RetroPrompt backbone.

``VisionBackbone`` satisfies the backbone protocol of the RetroPrompt trainer (``classes``, ``n_classes``,
``represent``, ``forward``, ``module``) structurally. The frozen features of an example (``ralm.lm.vision``,
(F,) = (1280,)) are computed once, through the ``.npy`` feature cache, and kept by example id; training
steps read them from memory and never run the backbone. What trains is the head::

    rep    = body(feature)                          (B, d)   the representation: store keys, queries, demos
    logits = W·rep + b  [+ g·s·cos(rep, demo_c)]     (B, C)   class_logits = log_softmax(logits)

``body`` is ``linear`` (LayerNorm, dropout, Linear(F, d)) or ``mlp`` (LayerNorm, Linear(F, h), GELU,
dropout, Linear(h, d)); the LayerNorm puts the frozen features, whose scale varies from image to image, on
one scale before the head.

Neural demonstrations. On text a class's demonstration vector enters the prompt next to that class's label
word, so the LM can compare the input with it. The head's analogue: ``demo_c`` (a similarity-weighted sum of
class c's nearest stored representations, ``demos.neural_demos``) is a retrieved prototype of class c, and
the head adds the cosine of the input's representation to each prototype, times a learned gate ``g``: a
cosine prototype classifier next to the linear one (cf. prototypical networks), of inverse temperature
``g·s``. Cosine because the store ranks neighbours by cosine, so the term reads the geometry the
demonstrations were chosen in, and, being bounded, it cannot swamp the linear term before ``g`` has learned
its size. ``s`` (``demo_scale``, fixed) makes ``g`` ~ 1 a usual cosine classifier: Adam moves a scalar by
about the learning rate per step, so an unscaled term would stay negligible. ``g`` starts at 0, so training
starts from the plain head; ``demo_vectors=None`` is the head without the term, and at ``g`` = 0 both give
the same logits bit for bit (adding 0·x is exact).

No "prompt" variant: a learned vector added to the frozen pooled feature before a linear layer is only a
bias (W(f + p) = Wf + Wp); a real visual prompt has to enter the backbone's input, which would mean running
the backbone at every step instead of reading cached features.

Images: ``LabelledExample.image`` is a (h, w) or (h, w, 3) uint8 array, or the path of an image file (PNG,
JPEG, ... decoded with Pillow); anything else, or a file that fails to decode, is a one-line ``RalmError``
naming the example. Features are kept by ``LabelledExample.id``: ids must identify the image (the data
readers' ids do: ``train-00042``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ralm.data.tasks.base import LabelledExample
from ralm.errors import RalmError, refuse_below
from ralm.lm import vision as lm_vision
from ralm.methods.retroprompt.prompt import PromptOutput

HEADS = ("linear", "mlp")
# (images (n, h, w[, 3]) uint8, cache name) -> (n, F) float32 frozen features
Extractor = Callable[[np.ndarray, str], np.ndarray]


@dataclass
class VisionConfig:
    head: str = field(default="linear", metadata={"help": "head over the frozen features: linear or mlp"})
    hidden: int = field(default=512, metadata={"help": "hidden width of the mlp head (unused by linear)"})
    dim: int = field(default=256, metadata={"help": "representation size d: the head's output, what the "
                                                    "knowledge store keys on and the demonstrations sum"})
    demo_scale: float = field(default=10.0, metadata={
        "help": "fixed inverse temperature s of the demonstration term g·s·cos(rep, demo_c) (a cosine classifier's "
                "usual 10-30): with it the learned gate g reaches a useful size at an ordinary learning rate"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the head while training, in [0, 1)"})
    resolution: int = field(default=112, metadata={"help": "image size in px fed to EfficientNet-Lite0 (224 "
                                                           "is its ImageNet size; 112 is ~3x faster on CPU)"})
    feature_cache: str = field(default="", metadata={
        "help": "folder of the frozen-feature .npy cache (default $RALM_CACHE_DIR/features)"})
    feature_batch: int = field(default=64, metadata={"help": "images per backbone forward pass"})
    device: str = field(default="cpu", metadata={"help": "torch device of the backbone (cpu, cuda)"})

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise RalmError(f"--head {self.head!r}: choose {' or '.join(HEADS)}")
        refuse_below(self, ("hidden", "dim", "feature_batch"))
        if not self.demo_scale > 0:
            raise RalmError(f"--demo-scale {self.demo_scale}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise RalmError(f"--dropout {self.dropout}: must be in [0, 1)")
        if not isinstance(self.resolution, int) or not 32 <= self.resolution <= 1024:
            raise RalmError(f"--resolution {self.resolution!r}: must be an integer from 32 to 1024 px")


class VisionHead(torch.nn.Module):
    """body: (B, F) features -> (B, d) reps; classifier: (B, d) -> (B, C); ``gate``: the demonstration term's
    weight (a scalar, 0 at init)."""

    def __init__(self, feature_dim: int, n_classes: int, config: VisionConfig):
        super().__init__()
        c = config
        if c.head == "linear":
            layers = [torch.nn.Dropout(c.dropout), torch.nn.Linear(feature_dim, c.dim)]
        else:
            layers = [torch.nn.Linear(feature_dim, c.hidden), torch.nn.GELU(), torch.nn.Dropout(c.dropout),
                      torch.nn.Linear(c.hidden, c.dim)]
        self.body = torch.nn.Sequential(torch.nn.LayerNorm(feature_dim), *layers)
        self.classifier = torch.nn.Linear(c.dim, n_classes)
        self.gate = torch.nn.Parameter(torch.zeros(()))
        self.demo_scale = c.demo_scale

    def forward(self, features: torch.Tensor, demo_vectors: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) features, optional (B, C, d) demonstrations -> ((B, C) log-probs, (B, d) reps)."""
        rep = self.body(features)  # (B, d)
        logits = self.classifier(rep)  # (B, C)
        if demo_vectors is not None:
            demo = demo_vectors.to(device=rep.device, dtype=rep.dtype)
            cos = F.cosine_similarity(rep[:, None, :], demo, dim=-1)  # (B, C)
            logits = logits + (self.gate * self.demo_scale) * cos
        return torch.log_softmax(logits.float(), dim=-1), rep


def read_image(path: str | Path, where: str = "") -> np.ndarray:
    """An image file -> (h, w) uint8 (grayscale) or (h, w, 3) uint8 (anything else, as RGB); a one-line
    ``RalmError`` naming ``where`` and the file if it is missing or does not decode."""
    at = f"{where}: " if where else ""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im if im.mode == "L" else im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise RalmError(f"{at}image file {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # Pillow's decode failures
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RalmError(f"{at}image file {path}: cannot decode ({msg})") from None


def pixels(example: LabelledExample) -> np.ndarray:
    """The example's image as (h, w) or (h, w, 3) uint8 pixels (a path is read); one-line errors otherwise."""
    img = example.image
    where = f"example {example.id!r}"
    if img is None:
        raise RalmError(f"{where}: has no image (the vision backbone reads images only)")
    if isinstance(img, (str, Path)):
        img = read_image(img, where)
    if not isinstance(img, np.ndarray):
        raise RalmError(f"{where}: image must be a numpy array or an image file path, got {type(img).__name__}")
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)) or 0 in img.shape:
        raise RalmError(f"{where}: image must be (h, w) or (h, w, 3) uint8 pixels, got shape {img.shape} "
                        f"{img.dtype}")
    return img


class VisionBackbone:
    """Frozen features (kept by example id) + a trained ``VisionHead``: the RetroPrompt backbone for images.

    ``extractor(images, name) -> (n, F)`` computes frozen features; the default loads EfficientNet-Lite0 on
    first use (``ralm.lm.vision``, ``config.resolution``) and reads/writes its ``.npy`` cache. Tests pass
    a small function, or give features directly (``add_features``), so nothing is downloaded.
    """

    def __init__(self, classes: Sequence[str], config: VisionConfig | None = None,
                 extractor: Extractor | None = None, feature_dim: int = lm_vision.FEATURE_DIM,
                 seed: int = 0):
        self.classes = tuple(classes)
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise RalmError(f"vision backbone: needs at least two distinct classes, got {self.classes!r}")
        self.config = config or VisionConfig()
        self.feature_dim = feature_dim
        self._extractor = extractor
        self._frozen: lm_vision.VisionBackbone | None = None
        self._features: dict[str, torch.Tensor] = {}  # example id -> (F,) float32
        with torch.random.fork_rng(devices=[]):  # the head's init depends on the seed only
            torch.manual_seed(seed)
            self.head = VisionHead(feature_dim, len(self.classes), self.config)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def module(self) -> torch.nn.Module:
        """The head: every trained parameter (the frozen features are not parameters)."""
        return self.head

    def label_index(self, label: str) -> int:
        try:
            return self.classes.index(str(label))
        except ValueError:
            raise RalmError(f"label {label!r} is not a class ({', '.join(self.classes)})") from None

    # ---- frozen features ----

    def _extract(self, images: np.ndarray, name: str) -> np.ndarray:
        if self._extractor is not None:
            return self._extractor(images, name)
        if self._frozen is None:
            c = self.config
            cfg = lm_vision.VisionConfig(resolution=c.resolution, batch_size=c.feature_batch, device=c.device)
            self._frozen = lm_vision.load_backbone(cfg)
        return lm_vision.cached_features(self._frozen, images, name, self.config.feature_cache or None)

    def add_features(self, ids: Sequence[str], features: np.ndarray | torch.Tensor) -> None:
        """Keep precomputed (n, F) features for the example ids ``ids`` (a benchmark's cached matrix)."""
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        if feats.ndim != 2 or feats.shape != (len(ids), self.feature_dim):
            raise RalmError(f"vision features: expected ({len(ids)}, {self.feature_dim}), got {tuple(feats.shape)}")
        if not torch.isfinite(feats).all():
            raise RalmError("vision features: not all finite")
        for i, eid in enumerate(ids):
            self._features[eid] = feats[i]

    def prepare(self, examples: Sequence[LabelledExample], name: str = "examples") -> None:
        """Compute (once) the frozen features of every example not yet seen, one extractor call per image
        shape; ``name`` names their cache file. Call it on each split before training: a later forward
        or represent on unseen examples does the same, with one small cache file per call."""
        todo: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
        queued: set[str] = set()
        for e in examples:
            if e.id not in self._features and e.id not in queued:
                img = pixels(e)
                todo.setdefault(img.shape, []).append((e.id, img))
                queued.add(e.id)
        for group in todo.values():
            ids = [eid for eid, _ in group]
            feats = self._extract(np.stack([img for _, img in group]), name)
            self.add_features(ids, feats)

    def features(self, examples: Sequence[LabelledExample]) -> torch.Tensor:
        """(B, F) frozen features, on the head's device."""
        if not examples:
            raise RalmError("vision backbone: no examples")
        self.prepare(examples)
        device = self.head.classifier.weight.device
        return torch.stack([self._features[e.id] for e in examples]).to(device)

    # ---- the backbone protocol ----

    def forward(self, examples: Sequence[LabelledExample], demo_vectors: torch.Tensor | None) -> PromptOutput:
        """PromptOutput((B, C) log p_model, (B, d) reps detached); ``demo_vectors`` (B, C, d) or None. Runs
        the head in its current mode (dropout in train mode)."""
        feats = self.features(examples)  # (B, F)
        if demo_vectors is not None and tuple(demo_vectors.shape) != (len(examples), self.n_classes,
                                                                       self.config.dim):
            raise RalmError(f"neural demonstrations: expected ({len(examples)}, {self.n_classes}, "
                            f"{self.config.dim}) vectors, got {tuple(demo_vectors.shape)}")
        logp, rep = self.head(feats, demo_vectors)
        return PromptOutput(logp, rep.detach().float())

    @torch.no_grad()
    def represent(self, examples: Sequence[LabelledExample], batch_size: int = 16) -> torch.Tensor:
        """(n, d) float32 reps without demonstrations, no grad, in eval mode (the head's mode is restored)."""
        if batch_size < 1:
            raise RalmError(f"--batch-size {batch_size}: must be >= 1")
        self.prepare(examples)
        was_training = self.head.training
        self.head.eval()
        try:
            out = [self.head.body(self.features(examples[b:b + batch_size])).float().cpu()
                   for b in range(0, len(examples), batch_size)]
        finally:
            self.head.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.config.dim)
