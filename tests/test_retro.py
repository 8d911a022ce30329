"""RETRO-fit model on tiny random LMs: exact no-op when untrained, chunked causality, layer rule, shapes."""

from __future__ import annotations

import pytest
import torch

from ralm.errors import RalmError
from ralm.methods.retro.model import PAD, RetroConfig, RetroFit, default_cca_layers, trigram_match, window_chunks

V = 97


def tiny_base(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, bos_token_id=0,
                                          eos_token_id=0)).eval()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              sliding_window=16)).eval()


def small_cfg(**kw) -> RetroConfig:
    return RetroConfig(**{"chunk_size": 8, "neighbour_len": 16, "enc_dim": 16, "enc_layers": 1, "enc_heads": 2,
                          "cca_dim": 16, "cca_heads": 2, **kw})


def random_neighbours(offset: int, length: int, cfg: RetroConfig, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    _, _, U = window_chunks(offset, length, cfg.chunk_size)
    nb = torch.randint(0, V, (2, U, cfg.neighbours, cfg.neighbour_len), generator=g)
    nb[:, :, -1, -3:] = PAD  # a short neighbour
    return nb


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("offset", [0, 5, 8])
def test_untrained_retrofit_gives_the_base_logits_bit_for_bit(arch, offset):
    base = tiny_base(arch)
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        model = RetroFit(base, small_cfg()).eval()
        on = model(ids, neighbours=random_neighbours(offset, 40, model.cfg), offset=offset).logits
        off = model(ids).logits
    assert torch.equal(on, ref) and torch.equal(off, ref)
    assert model.parameter_counts()["new"] > 0


def _scramble(model: RetroFit, encoder: bool = False) -> None:
    """Give the zero-initialised CCA outputs weights, so neighbours change the logits; ``encoder``: move the
    retrieval encoder off its identity start too, as a trained one is."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.cca.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if encoder:
            g = torch.Generator().manual_seed(4)
            for p in model.encoder.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("offset", [0, 3, 8, 13])
def test_neighbours_of_chunk_u_change_nothing_before_its_attending_chunk(offset):
    model = RetroFit(tiny_base("llama"), small_cfg()).eval()
    _scramble(model)
    m, L = model.cfg.chunk_size, 48
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))
    nb = random_neighbours(offset, L, model.cfg)
    first, c0, U = window_chunks(offset, L, m)
    with torch.no_grad():
        base = model(ids, neighbours=nb, offset=offset).logits
        for j in range(U):
            other = nb.clone()
            other[:, j] = torch.randint(0, V, other[:, j].shape, generator=torch.Generator().manual_seed(9 + j))
            got = model(ids, neighbours=other, offset=offset).logits
            changed = (got - base).abs().amax(-1).amax(0) > 0  # (L,)
            u = c0 + j  # absolute chunk index
            start = u * m + m - 1 - offset  # local start of its attending chunk
            assert not changed[:start].any(), f"chunk {u} leaked into positions before {start}"
            assert changed[start:min(L, start + m)].all()
            assert not changed[start + m:].any()  # only its attending chunk reads it


def test_positions_before_the_first_attending_chunk_read_nothing():
    model = RetroFit(tiny_base("llama"), small_cfg()).eval()
    _scramble(model)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = model(ids, neighbours=random_neighbours(0, 32, model.cfg), offset=0).logits
    m = model.cfg.chunk_size
    assert torch.equal(got[:, : m - 1], ref[:, : m - 1])
    assert not torch.equal(got[:, m - 1:], ref[:, m - 1:])


def test_chunks_without_neighbours_read_nothing():
    model = RetroFit(tiny_base("llama"), small_cfg()).eval()
    _scramble(model)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    nb = torch.full((2, 4, 2, 16), PAD)
    with torch.no_grad():
        assert torch.equal(model(ids, neighbours=nb).logits, model(ids).logits)


def test_trigram_match_is_the_share_of_chunk_trigrams_in_the_best_neighbour():
    chunk = torch.arange(10, 18)[None, None]  # (1, 1, 8): 6 trigrams
    shifted = torch.cat([torch.tensor([5]), torch.arange(10, 25)])  # the chunk one token later, + continuation
    half = torch.cat([torch.arange(10, 15), torch.full((11,), 50)])  # the first 3 of its trigrams
    pads = torch.full((16,), PAD)
    pads[:2] = torch.tensor([10, 11])  # a PAD never completes a trigram
    nb = torch.stack([half, pads])[None, None]  # (1, 1, K=2, 16)
    assert trigram_match(chunk, nb).item() == pytest.approx(0.5)
    assert trigram_match(chunk, torch.stack([pads, shifted])[None, None]).item() == 1.0  # the best of K
    assert trigram_match(chunk, torch.randint(60, 90, (1, 1, 2, 16))).item() == 0.0


@pytest.mark.parametrize(("gate", "unrelated", "copies"), [((0.0, 0.1), (0.85, 1.1), (0.85, 1.1)),  # as initialised
                                                          ((0.4, -0.2), (0.0, 0.01), (0.9, 1.1))])  # learnt
def test_match_gate_scales_the_cca_output_by_how_well_the_neighbours_match(gate, unrelated, copies):
    m, L = 8, 32
    ids = torch.randint(0, 50, (2, L), generator=torch.Generator().manual_seed(0))
    U = L // m
    copy = torch.stack([ids[:, u * m:(u + 2) * m] for u in range(U - 1)], 1)  # chunk + continuation
    copy = torch.cat([copy, torch.full((2, 1, 16), PAD)], 1)[:, :, None].expand(2, U, 2, 16)
    other = torch.randint(50, V, (2, U, 2, 16), generator=torch.Generator().manual_seed(1))
    effect = {}
    for on in (True, False):
        model = RetroFit(tiny_base("llama"), small_cfg(match_gate=on, cca_layers=[3])).eval()
        _scramble(model)
        if on:
            model.cca["3"].gate.data = torch.tensor(gate)
        with torch.no_grad():
            ref = model(ids).logits
            effect[on] = {name: (model(ids, neighbours=nb).logits - ref).abs().mean().item()
                          for name, nb in (("copies", copy), ("unrelated", other))}
    ratio = {name: effect[True][name] / effect[False][name] for name in ("copies", "unrelated")}
    assert unrelated[0] <= ratio["unrelated"] <= unrelated[1]
    assert copies[0] <= ratio["copies"] <= copies[1]


def test_match_gate_starts_open_whatever_the_match():
    model = RetroFit(tiny_base("llama"), small_cfg())
    for cca in model.cca.values():
        w, c = cca.gate.tolist()
        assert (w, c) == (0.0, pytest.approx(0.1))


def test_window_chunks():
    assert window_chunks(0, 64, 16) == (0, 0, 4)
    assert window_chunks(5, 64, 16) == (11, 1, 3)  # first whole chunk starts at absolute 16
    assert window_chunks(16, 10, 16) == (0, 1, 0)


@pytest.mark.parametrize(("layers", "expect"), [(12, [5, 8, 11]), (30, list(range(5, 30, 3))), (2, [1]), (6, [5])])
def test_default_cca_layers_follow_retro(layers, expect):
    assert default_cca_layers(layers) == expect


def test_only_new_parameters_require_grad_and_checkpoint_holds_only_them():
    model = RetroFit(tiny_base("llama"), small_cfg(cca_layers=[1, 3]))
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.new_parameters().values())
    state = model.new_state_dict()
    assert state and not any(k.startswith("base.") for k in state)
    assert {k.split(".")[1] for k in state if k.startswith("cca.")} == {"1", "3"}


@pytest.mark.parametrize("kw", [{"chunk_size": 1}, {"neighbours": 0}, {"enc_dim": 15}, {"dropout": 1.0},
                                {"cca_layers": []}, {"cca_layers": [-1]}])
def test_bad_config(kw):
    with pytest.raises(RalmError):
        small_cfg(**kw)


def test_bad_layers_and_neighbour_shape():
    with pytest.raises(RalmError, match="has 4 layers"):
        RetroFit(tiny_base("llama"), small_cfg(cca_layers=[4]))
    model = RetroFit(tiny_base("llama"), small_cfg())
    with pytest.raises(RalmError, match="neighbours of shape"):
        model(torch.zeros(2, 32, dtype=torch.long), neighbours=torch.zeros(2, 3, 2, 16, dtype=torch.long))


def test_a_bf16_base_model_works_with_float32_new_layers():
    base = tiny_base("llama").to(torch.bfloat16)
    model = RetroFit(base, small_cfg()).eval()
    _scramble(model)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, neighbours=random_neighbours(0, 32, model.cfg)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_relative_position_bias_lines_up_attending_tokens_with_neighbour_offsets():
    model = RetroFit(tiny_base("llama"), small_cfg(rel_init=2.0)).eval()
    cca = next(iter(model.cca.values()))
    m = model.cfg.chunk_size
    start = cca._bias(1, 16)[0]  # (m, R): attention starts on the continuation aligned with each token
    for i in range(m):
        assert [j for j in range(16) if start[i, j] == 2.0] == [j for j in (m + i - 1, m + i, m + i + 1) if j < 16]
    with torch.no_grad():
        cca.rel.copy_(torch.arange(cca.rel.shape[1], dtype=torch.float).expand_as(cca.rel))
    b = cca._bias(2, 16)  # (h, m, K·R)
    assert b.shape == (2, m, 32)
    assert b[0, 3, 5] == 5 - 3 + m - 1 and torch.equal(b[:, :, :16], b[:, :, 16:])
    old = RetroFit(tiny_base("llama"), small_cfg(relative_positions=False))
    assert all(c.rel is None for c in old.cca.values())
    assert old.parameter_counts()["new"] < model.parameter_counts()["new"]


def test_training_learns_to_copy_the_continuation_from_a_neighbour():
    """Random tokens are unpredictable, except that each chunk's neighbour holds the chunk and its
    continuation: a correctly wired RETRO-fit (chunk alignment, gradients through encoder and CCA) learns to
    copy it, and shuffled neighbours are worth nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    v, m, L = 64, 8, 64
    # a larger init than the default lets the tiny LM's tied head express confident predictions at all
    base = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                        tie_word_embeddings=True)).eval()
    model = RetroFit(base, RetroConfig(chunk_size=m, neighbour_len=2 * m, neighbours=1, enc_dim=64, enc_layers=1,
                                       cca_dim=64, cca_layers=[1, 3]))
    opt = torch.optim.AdamW(list(model.new_parameters().values()), lr=3e-3)

    def loss(ids, nb):  # over the attending chunks, the only positions neighbours may help
        logits = model(ids[:, :L], neighbours=nb, offset=0).logits
        return torch.nn.functional.cross_entropy(logits[:, m - 1:-1].flatten(0, 1), ids[:, m:L].flatten())

    def batch(b=16):
        ids = torch.randint(0, v, (b, L + m))
        return ids, torch.stack([ids[:, u * m:(u + 2) * m] for u in range(L // m)], 1)[:, :, None]  # (b, U, 1, 2m)

    for _ in range(350):
        ids, nb = batch()
        opt.zero_grad()
        loss(ids, nb).backward()
        opt.step()
    ids, nb = batch(32)
    with torch.no_grad():
        copied, shuffled = loss(ids, nb).item(), loss(ids, nb[torch.randperm(32)]).item()
    assert copied < 0.5 < 3.5 < shuffled  # uniform guessing: ln 64 = 4.16
