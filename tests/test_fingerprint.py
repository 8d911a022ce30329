"""The model fingerprint names the weights, not the folder they were loaded from (a kNN-LM store built under one
RALM_CACHE_DIR was refused under another with byte-identical weights); stores that recorded the old,
folder-dependent hash still match."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoModelForCausalLM

from ralm.errors import IncompatibleError
from ralm.lm.hidden import model_fingerprint, model_fingerprints


def test_same_weights_in_another_folder_keep_their_fingerprint(tiny_lm, tmp_path):
    moved = shutil.copytree(tiny_lm, tmp_path / "elsewhere")
    a = AutoModelForCausalLM.from_pretrained(tiny_lm)
    b = AutoModelForCausalLM.from_pretrained(moved)
    assert model_fingerprint(a) == model_fingerprint(b)
    # the legacy hash changed with the folder: that is the bug, kept only to recognise old stores
    assert model_fingerprint(a, legacy=True) != model_fingerprint(b, legacy=True)
    assert model_fingerprints(a) == (model_fingerprint(a), model_fingerprint(a, legacy=True))


def test_other_weights_still_differ(tiny_lm):
    import torch

    a = AutoModelForCausalLM.from_pretrained(tiny_lm)
    b = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


def test_knn_store_accepts_a_legacy_fingerprint_and_refuses_other_weights(tiny_lm):
    from ralm.datastore.knn_store import KNNStore

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)

    class ManifestOnly(KNNStore):  # check_compatible reads only the manifest and the key dim
        dim = model.config.hidden_size

    store = object.__new__(ManifestOnly)
    store.root = "KDS"
    store.manifest = {"model": {"name": "m", "fingerprint": model_fingerprint(model, legacy=True)},
                      "tokenizer": {"fingerprint": "tok"}}
    store.check_compatible(model_fingerprints(model), "tok", "m", store.dim)
    store.manifest["model"]["fingerprint"] = "0" * 16
    with pytest.raises(IncompatibleError, match="rebuild the store"):
        store.check_compatible(model_fingerprints(model), "tok", "m", store.dim)
