"""PEFT on a plain LM ("gpt") and on a RETRO-fit model ("retro"), tiny random Llama: LoRA and adapters at
initialisation = the base logits bit for bit; only the PEFT parameters get gradients and change; weights
round trip; merged LoRA = unmerged; prompt methods add exactly N positions, stay causal and keep RETRO-fit's
chunk grid; retrieval still matters after injection; every bad input a one-line error."""

from __future__ import annotations

import pytest
import torch

from ralm.cli_config import Spec, options
from ralm.errors import RalmError
from ralm.methods.peft import WEIGHTS, PeftConfig, apply_peft, read_peft_header
from ralm.methods.peft.config import METHODS
from ralm.methods.peft.registry import peft_method_names
from ralm.methods.retro.model import RetroFit, window_chunks
from ralm.tuning.loop import STATE, Task, TrainConfig, train
from ralm.tuning.state import read_trainer_state
from test_retro import V, _scramble, random_neighbours, small_cfg, tiny_base

ARCHS = ("gpt", "retro")
L = 24  # tokens per test window: 3 chunks of 8
MARK = {"lora": "lora_", "adapter": "ralm_adapter.", "prompt": "ralm_prompt.", "ptuning": "ralm_prompt."}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost 8x (102 s vs 12.5 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def model_for(arch: str, base: str = "llama"):
    """The plain LM, or a RETRO-fit model on it with random encoder and CCA weights, as a trained one has
    (its zero-initialised outputs would otherwise hide the neighbours, and starve adapters behind them)."""
    lm = tiny_base(base)
    if arch == "gpt":
        return lm
    model = RetroFit(lm, small_cfg()).eval()
    _scramble(model, encoder=True)
    return model


def window(arch: str, offset: int = 0, length: int = L, seed: int = 0):
    ids = torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(seed))
    return ids, (random_neighbours(offset, length, small_cfg(), seed=seed + 1) if arch == "retro" else None)


def plain_logits(model, ids, nb=None, offset=0) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, RetroFit):
            return model(ids, neighbours=nb, offset=offset).logits
        return model(input_ids=ids).logits


def peft_logits(h, ids, nb=None, offset=0) -> torch.Tensor:
    with torch.no_grad():
        return h.strip(h.model(**h.inputs(ids, neighbours=nb, offset=offset)).logits)


def train_steps(h, ids, nb, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in h.model.parameters() if p.requires_grad], lr=1e-2)
    h.model.train()
    for _ in range(steps):
        loss = h.model(**h.inputs(ids, labels=ids, neighbours=nb)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    h.model.eval()


def cfg(method: str, **kw) -> PeftConfig:
    return PeftConfig(**{"method": method, "lora_rank": 4, "adapter_dim": 4, "n_virtual": 3, "ptuning_hidden": 16,
                         **kw})


def test_every_method_is_registered_and_every_field_is_a_flag():
    assert peft_method_names() == list(METHODS)
    flags = [o.decls[0].split("/")[0] for o in options(Spec(PeftConfig))]
    assert flags[:2] == ["--peft", "--lora-rank"] and "--peft-encoder" in flags and len(flags) == 14


# ---- off = baseline ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,kw", [("lora", {}), ("adapter", {}), ("adapter", {"adapter_where": "attn"}),
                                       ("adapter", {"adapter_where": "mlp"}), ("full", {})])
def test_lora_and_adapters_at_initialisation_give_the_base_logits_bit_for_bit(arch, method, kw):
    model = model_for(arch)
    ids, nb = window(arch)
    ref, ref_off = plain_logits(model, ids, nb), plain_logits(model, ids)
    h = apply_peft(model, cfg(method, **kw), arch)
    assert h.counts()["trainable"] > 0 and h.n_virtual == 0
    assert torch.equal(peft_logits(h, ids, nb), ref)
    assert torch.equal(peft_logits(h, ids), ref_off)  # retro: retrieval off is still the (PEFT) decoder


@pytest.mark.parametrize("base", ["gpt2", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_lora_and_adapters_fit_other_decoders_bit_for_bit(base, method):
    """GPT-2 (Conv1D projections, ``attn``) and Gemma 3 (scaled embeddings, extra norms) as well as Llama."""
    model = model_for("gpt", base)
    ids, _ = window("gpt")
    ref = plain_logits(model, ids)
    h = apply_peft(model, cfg(method), "gpt")
    assert torch.equal(peft_logits(h, ids), ref)
    assert all(MARK[method] in n for n in h.trainable_names())


# ---- training touches only the PEFT parameters ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_only_peft_parameters_receive_gradients_and_change(arch, method):
    model = model_for(arch)
    ids, nb = window(arch)
    h = apply_peft(model, cfg(method), arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = set(h.trainable_names())
    if method == "full":
        assert trained == set(before)  # the reference: every weight (retro: base LM + encoder + CCA)
    else:
        assert trained and all(MARK[method] in n for n in trained)
    model.train()
    h.model(**h.inputs(ids, labels=ids, neighbours=nb)).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trained), n
    model.zero_grad(set_to_none=True)
    train_steps(h, ids, nb)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trained), f"{n}: {'unchanged' if n in trained else 'changed'}"


@pytest.mark.parametrize("method", ["lora", "adapter", "full"])
@pytest.mark.parametrize("part", ["decoder", "retrieval_encoder", "cca"])
def test_retro_part_switches_decide_where_the_modules_go(method, part):
    model = model_for("retro")
    off = {s: s == part for s in ("decoder", "retrieval_encoder", "cca")}
    h = apply_peft(model, cfg(method, **off), "retro")
    prefix = {"decoder": "base.", "retrieval_encoder": "encoder.", "cca": "cca."}[part]
    names = h.trainable_names()
    assert names and all(n.startswith(prefix) for n in names)


def test_lora_targets_are_suffixes_inside_the_parts_switched_on():
    model = model_for("retro")
    h = apply_peft(model, cfg("lora", target_modules=["q"], decoder=False), "retro")
    mods = {n.rsplit(".lora_", 1)[0] for n in h.trainable_names()}
    assert mods == {"encoder.layers.0.self_attn.q", "encoder.layers.0.cross_attn.q", "cca.3.attn.q"}


def test_adapters_are_removable():
    model = model_for("retro")
    ids, nb = window("retro")
    ref = plain_logits(model, ids, nb)
    names = [n for n, _ in model.named_parameters()]
    h = apply_peft(model, cfg("adapter"), "retro")
    train_steps(h, ids, nb)
    assert not torch.equal(peft_logits(h, ids, nb), ref)
    h.remove()
    assert torch.equal(plain_logits(model, ids, nb), ref)
    assert [n for n, _ in model.named_parameters()] == names
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.new_parameters().values())  # RetroFit's flags as they were


# ---- weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_peft_weights_round_trip_gives_identical_logits(arch, method, tmp_path):
    ids, nb = window(arch)
    h = apply_peft(model_for(arch), cfg(method), arch)
    train_steps(h, ids, nb, steps=2)
    h.save(tmp_path / WEIGHTS)
    want = peft_logits(h, ids, nb)
    saved_cfg, saved_arch = read_peft_header(tmp_path / WEIGHTS)
    assert (saved_cfg, saved_arch) == (cfg(method), arch)
    torch.manual_seed(123)  # another initialisation of the PEFT modules: load must overwrite all of them
    fresh = apply_peft(model_for(arch), saved_cfg, saved_arch)
    if method != "full":
        assert not torch.equal(peft_logits(fresh, ids, nb), want)
    fresh.load(tmp_path / WEIGHTS)
    assert torch.equal(peft_logits(fresh, ids, nb), want)


def test_loading_weights_of_other_settings_or_files_is_refused(tmp_path):
    h = apply_peft(model_for("gpt"), cfg("lora"), "gpt")
    h.save(tmp_path / WEIGHTS)
    other = apply_peft(model_for("gpt"), cfg("lora", lora_alpha=8.0), "gpt")
    with pytest.raises(RalmError, match="other settings"):
        other.load(tmp_path / WEIGHTS)
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(RalmError, match="not a safetensors file"):
        h.load(tmp_path / "junk.safetensors")
    with pytest.raises(RalmError, match="no PEFT weights file"):
        read_peft_header(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch,method", [("gpt", "prompt"), ("retro", "lora")])
def test_the_shared_loop_trains_and_saves_only_the_peft_parameters(arch, method, tmp_path):
    ids, nb = window(arch)
    h = apply_peft(model_for(arch), cfg(method), arch)
    before = {n: p.detach().clone() for n, p in h.model.named_parameters() if not p.requires_grad}

    def loss(model, batch):
        out = model(**h.inputs(batch, labels=batch, neighbours=nb))
        return out.loss, batch.numel()

    task = Task(name="PEFT", batch=lambda step: ids, loss=loss, resume_key={"peft": method},
                save=lambda out, step: h.save(out / WEIGHTS))
    train(h.model, TrainConfig(steps=2, warmup=0, bf16=False, lr=1e-2), task, tmp_path, state=None, progress=False)
    state = read_trainer_state(tmp_path / STATE, "PEFT")
    assert {k.removeprefix("weights.") for k in state.tensors if k.startswith("weights.")} == set(h.trainable_names())
    assert all(torch.equal(p, before[n]) for n, p in h.model.named_parameters() if n in before)
    fresh = apply_peft(model_for(arch), cfg(method), arch)
    fresh.load(tmp_path / WEIGHTS)
    assert torch.equal(peft_logits(fresh, ids, nb), peft_logits(h, ids, nb))


# ---- LoRA merge --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_lora_gives_the_unmerged_logits(arch):
    model = model_for(arch)
    ids, nb = window(arch)
    names = sorted(model.state_dict())
    h = apply_peft(model, cfg("lora"), arch)
    train_steps(h, ids, nb)
    unmerged = peft_logits(h, ids, nb)
    merged_model = h.merge()
    assert merged_model is model and sorted(model.state_dict()) == names  # the plain layout again
    merged = plain_logits(model, ids, nb)
    assert not torch.equal(merged, plain_logits(model_for(arch), ids, nb))  # the update is in the weights
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RalmError, match="merged or removed"):
        h.merge()
    with pytest.raises(RalmError, match="only LoRA"):
        apply_peft(model_for(arch), cfg("adapter"), arch).merge()


# ---- prompt methods ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,kw", [("prompt", {}), ("ptuning", {}), ("ptuning", {"ptuning_encoder": "lstm"})])
def test_prompt_methods_grow_the_input_by_n_and_keep_causality(arch, method, kw):
    h = apply_peft(model_for(arch), cfg(method, **kw), arch)
    ids, nb = window(arch)
    mask = torch.ones_like(ids)
    kwargs = h.inputs(ids, mask, ids.clone(), neighbours=nb)
    n = h.n_virtual
    assert n == 3 and kwargs["inputs_embeds"].shape[:2] == (2, L + n)
    assert kwargs["attention_mask"].shape == (2, L + n) and bool(kwargs["attention_mask"].all())
    assert (kwargs["labels"][:, :n] == -100).all() and torch.equal(kwargs["labels"][:, n:], ids)
    with torch.no_grad():
        full = h.model(**kwargs).logits
    assert full.shape[1] == L + n
    for t in (0, 9, L - 1):
        later = ids.clone()
        later[:, t] = (later[:, t] + 1) % V
        got = peft_logits(h, later, nb)
        # to float rounding: a busy machine can split a matmul over fewer threads, which reorders its sums
        assert torch.allclose(got[:, :t], h.strip(full)[:, :t], atol=1e-5, rtol=0), \
            f"changing token {t} changed earlier logits"
        assert (got[:, t] - h.strip(full)[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
@pytest.mark.parametrize("offset", [0, 5])
def test_prompt_methods_keep_retrofit_chunk_grid(method, offset):
    """The neighbours of chunk u still reach exactly its attending chunk's real positions, N virtual tokens
    (not a multiple of the chunk size) before the window."""
    h = apply_peft(model_for("retro"), cfg(method), "retro")
    m = small_cfg().chunk_size
    ids, nb = window("retro", offset, 40)
    first, c0, U = window_chunks(offset, 40, m)
    ref = peft_logits(h, ids, nb, offset)
    assert not torch.equal(ref, peft_logits(h, ids, None, offset))  # retrieval is read through the prompt
    for j in range(U):
        other = nb.clone()
        other[:, j] = torch.randint(0, V, other[:, j].shape, generator=torch.Generator().manual_seed(9 + j))
        changed = (peft_logits(h, ids, other, offset) - ref).abs().amax(-1).amax(0) > 0  # (40,) real positions
        start = (c0 + j) * m + m - 1 - offset  # local start of chunk c0 + j's attending chunk
        assert not changed[:start].any() and not changed[start + m:].any()
        assert changed[start:min(40, start + m)].all()


def test_prompt_tuning_starts_from_the_given_vocabulary_tokens():
    model = model_for("gpt")
    h = apply_peft(model, cfg("prompt", prompt_init_ids=[5, 7]), "gpt")
    with torch.no_grad():
        got = model.ralm_prompt(1)[0]
        want = model.get_input_embeddings()(torch.tensor([5, 7, 5]))
    assert torch.equal(got, want) and h.counts()["trainable"] == 3 * want.shape[1]


# ---- retrieval after injection -----------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_retrofit_retrieval_still_matters_after_injection(method):
    model = model_for("retro")
    ids, nb = window("retro")
    h = apply_peft(model, cfg(method), "retro")
    train_steps(h, ids, nb, steps=1)
    assert not torch.equal(peft_logits(h, ids, nb), peft_logits(h, ids, None))  # RetroFit's hooks still fire
    no_nb = torch.full_like(nb, -1)
    assert torch.equal(peft_logits(h, ids, no_nb), peft_logits(h, ids, None))  # and still read only neighbours


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,flag", [
    ({"method": "bitfit"}, "--peft"), ({"lora_rank": 0}, "--lora-rank"), ({"lora_alpha": 0.0}, "--lora-alpha"),
    ({"lora_alpha": float("nan")}, "--lora-alpha"), ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"lora_dropout": -0.1}, "--lora-dropout"), ({"target_modules": [""]}, "--lora-targets"),
    ({"adapter_dim": 0}, "--adapter-dim"), ({"adapter_where": "ffn"}, "--adapter-where"),
    ({"n_virtual": 0}, "--n-virtual"), ({"prompt_init_ids": [-1]}, "--prompt-init-ids"),
    ({"ptuning_encoder": "gru"}, "--ptuning-encoder"), ({"ptuning_hidden": 0}, "--ptuning-hidden"),
])
def test_bad_config_is_a_one_line_error_naming_the_flag(kw, flag):
    with pytest.raises(RalmError) as e:
        PeftConfig(**kw)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch,peft_kw,what", [
    ("bert", {}, "--arch 'bert'"),
    ("gpt", {"retrieval_encoder": False}, "only for --arch retro"),
    ("retro", {"decoder": False, "retrieval_encoder": False, "cca": False}, "at least one part"),
    ("retro", {"method": "prompt", "decoder": False}, "decoder's input"),
    ("gpt", {"method": "lora", "target_modules": ["nothing_here"]}, "match no linear layer"),
    ("retro", {"method": "adapter", "adapter_where": "mlp", "decoder": False, "retrieval_encoder": False},
     "no such sublayer"),
    ("gpt", {"method": "prompt", "n_virtual": 2048}, "context holds 2048"),
    ("gpt", {"method": "prompt", "prompt_init_ids": [V]}, "vocabulary has"),
    ("retro", {"lora_dropout": 0.1}, "decoder always runs in eval mode"),
])
def test_bad_setup_is_a_one_line_error(arch, peft_kw, what):
    model = model_for("retro" if arch == "retro" else "gpt")
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RalmError, match=what) as e:
        apply_peft(model, cfg(**{"method": "lora", **peft_kw}), arch)
    assert "\n" not in str(e.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == names  # nothing left frozen


def test_lora_dropout_on_retro_is_for_the_parts_that_train_in_train_mode():
    h = apply_peft(model_for("retro"), cfg(**{"method": "lora", "lora_dropout": 0.1, "decoder": False}), "retro")
    h.model.train()
    drops = [m for n, m in h.model.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(m.training and m.p == 0.1 for m in drops)  # encoder / CCA LoRA: dropout applies


def test_wrong_model_for_the_arch_and_too_long_inputs_are_refused():
    with pytest.raises(RalmError, match="got a RETRO-fit model"):
        apply_peft(model_for("retro"), cfg("lora"), "gpt")
    with pytest.raises(RalmError, match="needs a RETRO-fit model"):
        apply_peft(model_for("gpt"), cfg("lora"), "retro")
    h = apply_peft(model_for("gpt"), cfg("prompt", n_virtual=2000), "gpt")
    with pytest.raises(RalmError, match="--n-virtual 2000: with 49 input tokens"):
        h.inputs(torch.zeros(1, 49, dtype=torch.long))
