"""safetensors files written atomically and with ordinary permissions (checkpoints, trainer states)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from ralm.errors import RalmError
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


def load_into(path: Path | str, params: dict[str, torch.Tensor]) -> None:
    """Copy the tensors of the safetensors file ``path`` into ``params`` by name; the file must hold exactly
    those names with the same shapes (else one line naming what does not fit)."""
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
        if names != set(params):
            missing, extra = sorted(set(params) - names), sorted(names - set(params))
            raise RalmError(f"{path}: does not fit this model (missing {missing[:3]}, unexpected {extra[:3]})")
        with torch.no_grad():
            for n, p in params.items():
                t = f.get_tensor(n)
                if t.shape != p.shape:
                    raise RalmError(f"{path}: {n} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t)
