"""RETRO-fit's cached decode (``RetroCache``): a prompt pass and then steps of one or more tokens give the
logits of one pass over the whole window, on Llama, GPT-2 and Gemma 3 bases, with the window's grid at any
offset (virtual tokens move it back), several CCA layers and chunks completed mid-step; bad calls refused."""

from __future__ import annotations

import pytest
import torch

from ralm.errors import RalmError
from ralm.methods.retro.model import RetroCache, RetroFit, window_chunks
from test_retro import V, _scramble, random_neighbours, small_cfg, tiny_base

L = 40  # 5 chunks of 8
torch.set_num_threads(1)  # tiny models: threads cost more than they give on the shared machine


def decoding_model(arch: str) -> RetroFit:
    """A RETRO-fit with CCA after two layers, random encoder and CCA weights (neighbours change the logits)."""
    model = RetroFit(tiny_base(arch), small_cfg(cca_layers=[0, 2])).eval()
    _scramble(model, encoder=True)
    return model


def decode(model: RetroFit, ids: torch.Tensor, nb: torch.Tensor, offset: int, prompt: int,
           steps: list[int]) -> torch.Tensor:
    """Logits of ``ids`` (B, L) fed as a prompt of ``prompt`` tokens, then in steps of the sizes ``steps``
    (cycled), every pass given the neighbours of the whole chunks seen so far."""
    m, cache, out, got, t, i = model.cfg.chunk_size, RetroCache(), None, [], 0, 0
    while t < ids.shape[1]:
        n = prompt if t == 0 else steps[i % len(steps)]
        i += t > 0
        U = window_chunks(offset, t + n, m)[2]
        past = {} if out is None else {"past_key_values": out.past_key_values}
        out = model(ids[:, t:t + n], neighbours=nb[:, :U], offset=offset, retro_cache=cache, use_cache=True, **past)
        got.append(out.logits)
        t += n
    assert cache.length == ids.shape[1] and cache.encoded.shape[1] == window_chunks(offset, ids.shape[1], m)[2]
    return torch.cat(got, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("offset", [0, -3, 5])
def test_cached_decode_gives_the_window_logits(arch, offset):
    model = decoding_model(arch)
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(0))
    nb = random_neighbours(offset, L, model.cfg)
    with torch.no_grad():
        want = model(ids, neighbours=nb, offset=offset).logits
        assert not torch.allclose(want, model(ids).logits, atol=1e-3)  # retrieval matters: a wrong cache shows
        for prompt, steps in ((3, [1]), (8, [1, 3]), (13, [5, 1, 2]), (1, [8])):
            torch.testing.assert_close(decode(model, ids, nb, offset, prompt, steps), want, atol=2e-5, rtol=1e-4)


def test_cached_decode_reads_only_the_neighbours_of_finished_chunks():
    """A chunk's neighbours change nothing before its last token is in, with the cache as without."""
    model = decoding_model("llama")
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(1))
    nb = random_neighbours(0, L, model.cfg)
    other = nb.clone()
    other[:, 2] = torch.randint(0, V, other[:, 2].shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = decode(model, ids, nb, 0, 4, [1]), decode(model, ids, other, 0, 4, [1])
    m = model.cfg.chunk_size
    last = 3 * m - 1  # chunk 2's last token: the first position that reads it
    torch.testing.assert_close(a[:, :last], b[:, :last], atol=0, rtol=0)
    assert not torch.allclose(a[:, last:], b[:, last:])


def test_bad_decode_calls_are_refused():
    model = decoding_model("llama")
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(RalmError, match="decode cache needs the neighbours"):
        model(ids, retro_cache=RetroCache())
    nb = random_neighbours(0, 24, model.cfg)  # 3 chunks' neighbours for a 12-token pass (1 whole chunk)
    with pytest.raises(RalmError, match=r"expected \(2, 1, K, <=16\) for 0 \+ 12 decoded positions"):
        model(ids, neighbours=nb, retro_cache=RetroCache())
