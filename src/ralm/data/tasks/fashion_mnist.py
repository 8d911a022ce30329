"""Fashion-MNIST (``ralm data get fashion-mnist``): a folder with the original four idx ``.gz`` files; its own
split, 60,000 train / 10,000 test 28x28 grayscale images, labels 0-9 naming ``CLASSES``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ralm.data.idx import read_idx
from ralm.data.tasks.base import LabelledData, LabelledExample
from ralm.errors import RalmError

# label index -> name, as the data set's README gives them
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_arrays(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28) uint8, labels (n,) int64)`` of split ``train`` or ``test``; one-line errors for
    a bad file, a count mismatch or a label outside 0-9."""
    if split not in FILES:
        raise RalmError(f"fashion-mnist has no split {split!r}; known: {', '.join(FILES)}")
    img_path, lab_path = (Path(folder) / f for f in FILES[split])
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise RalmError(f"{img_path}: expected (n, h, w) uint8 images, got {images.shape} {images.dtype}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise RalmError(f"{lab_path}: {labels.shape} labels for {len(images)} images in {img_path.name}")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise RalmError(f"{lab_path}: label {int(labels.max())} outside 0-{len(CLASSES) - 1}")
    return images, labels.astype(np.int64)


def read_fashion_mnist(folder: str | Path) -> LabelledData:
    """Both splits as ``LabelledExample``s (id ``<split>-<index>``, the image a view of the split's array);
    ``validation`` is empty (the few-shot dev split comes from train)."""
    splits: dict[str, list[LabelledExample]] = {"train": [], "validation": [], "test": []}
    for split in FILES:
        images, labels = fashion_mnist_arrays(folder, split)
        splits[split] = [LabelledExample(f"{split}-{i:05d}", "", CLASSES[y], images[i]) for i, y in enumerate(labels)]
    return LabelledData(CLASSES, splits)
