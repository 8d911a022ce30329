"""The LM's final hidden states (the input of its output head), captured by a hook, and a model fingerprint.

kNN-LM keys are these states at every corpus position; at evaluation the same hook reads them from the
forward pass that also gives the logits, so the query costs no extra model call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from ralm.errors import RalmError


@contextlib.contextmanager
def head_inputs(model: Any) -> Iterator[list[torch.Tensor]]:
    """Collect the input of ``model``'s output embedding (LM head) on every forward pass inside the block."""
    seen: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        yield seen
    finally:
        handle.remove()


@torch.inference_mode()
def final_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, d) final hidden states of every position from the decoder stack alone (no logits computed)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@torch.inference_mode()
def check_states_match_head(model: Any, input_ids: torch.Tensor) -> None:
    """Raise if the decoder's output is not what the LM head reads (an architecture we cannot key on)."""
    with head_inputs(model) as seen:
        model(input_ids=input_ids, logits_to_keep=input_ids.shape[1])
    states = final_states(model, input_ids)
    if not torch.allclose(seen[0].float(), states.float(), atol=1e-4, rtol=1e-3):
        raise RalmError(f"{type(model).__name__}: the decoder output differs from the LM head input; "
                        "kNN-LM keys cannot be read from this architecture")


# config entries that say where a model was loaded from, not what it computes: the same weights from another
# cache folder (another RALM_CACHE_DIR or HOME) must keep their fingerprint
_LOCATION_KEYS = ("_name_or_path", "transformers_version")


def model_fingerprint(model: Any, *, legacy: bool = False) -> str:
    """A short hash of the config and a slice of every weight: kNN-LM keys belong to exactly one model.

    ``legacy``: the hash stores written before the location keys were left out recorded (it changed with
    the folder the model was loaded from).
    """
    config = model.config.to_dict()
    if not legacy:
        config = {k: v for k, v in config.items() if k not in _LOCATION_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:256].float().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprints(model: Any) -> tuple[str, str]:
    """(current, legacy) fingerprints: a store or checkpoint that recorded either was made with these weights."""
    return model_fingerprint(model), model_fingerprint(model, legacy=True)
