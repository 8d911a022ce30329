"""safetensors files written atomically and with ordinary permissions (checkpoints, trainer states)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

from ralm.utils.atomic import atomic_open


def write_safetensors(dest: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` to ``dest`` with the mode any other file gets (0644 under umask 022).

    ``safetensors.torch.save_file`` writes through a temporary file of its own, created 0600 and renamed onto
    the target (so the checkpoint was the one file others could not read, and a kill left a stray
    ``.tmpXXXXXX``); serialising to bytes and writing them through ``atomic_open`` avoids both.
    """
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with atomic_open(dest, "wb") as f:
        f.write(data)
