"""Greedy generation for the task runs: the KV-cached loop (gpt) gives the tokens of the loop that recomputes
the window, for every PEFT method (virtual tokens included); stopping at the first newline keeps the answer
scoring reads (its first line); on RETRO-fit the cached loop (``RetroCache``) gives the window's tokens too."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralm.data.squad import QAExample
from ralm.methods.peft import PeftConfig, apply_peft
from ralm.methods.retro.model import RetroConfig, RetroFit
from ralm.methods.task_forward import greedy
from ralm.methods.task_inputs import TaskEncoder
from ralm.methods.task_model import PlainHandle

torch.set_num_threads(1)  # tiny models: threads cost more than they give on the shared machine


def questions(n: int) -> list[QAExample]:
    words = ["river", "castle", "green", "seven", "north", "music", "paper", "stone"]
    return [QAExample(id=str(i), question=" ".join(words[(i + j) % 8] for j in range(2 + i % 4)),
                      answers=("x",), context="", title="t", paragraph_id="p") for i in range(n)]


def handle_for(tiny_lm: str, method: str):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    with torch.no_grad():  # large weights: continuations that depend on the prompt
        for p in lm.parameters():
            p.mul_(4.0)
    return with_peft(lm, method, "gpt")


def with_peft(model, method: str, arch: str):
    """``model`` with ``method`` (``none``: as it is), PEFT weights off their (identity) initialisation."""
    if method == "none":
        return PlainHandle(model)
    h = apply_peft(model, PeftConfig(method=method, lora_rank=4, adapter_dim=4, n_virtual=3), arch)
    with torch.no_grad():  # so they take part
        for p in h.model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    h.model.eval()
    return h


@pytest.mark.parametrize("method", ["none", "lora", "adapter", "prompt", "ptuning"])
def test_cached_greedy_equals_recomputed_window(tiny_lm, method):
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    enc = TaskEncoder(tok, "gpt", None, max_len=64, max_new=8)
    h = handle_for(tiny_lm, method)
    prompts = [enc.encode(ex, [], None) for ex in questions(5)]  # prompts of different lengths: left padding
    cached = greedy(h, enc, prompts, 8, cache=True)
    window = greedy(h, enc, prompts, 8, cache=False)
    assert cached == window
    assert len({tuple(r) for r in cached}) > 1  # the prompts matter: the test could tell a wrong cache


class NewlineAt:
    """A tokenizer whose decode shows ``stop`` as a newline (the tiny vocabulary has none)."""

    def __init__(self, tok, stop: int):
        self._tok, self.stop = tok, stop

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *a, **kw):
        return self._tok(*a, **kw)

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == self.stop else f" w{i}" for i in ids)


def test_stop_at_newline_keeps_the_first_line(tiny_lm):
    h = handle_for(tiny_lm, "none")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    plain = TaskEncoder(tok, "gpt", None, max_len=64, max_new=8)
    prompts = [plain.encode(ex, [], None) for ex in questions(5)]
    full = greedy(h, plain, prompts, 8)
    stop = full[0][2]  # a token row 0 generates third: from there on, row 0 is done
    enc = TaskEncoder(NewlineAt(tok, stop), "gpt", None, max_len=64, max_new=8)
    short = greedy(h, enc, prompts, 8, stop_at_newline=True)
    for f, s in zip(full, short, strict=True):
        first = f.index(stop) + 1 if stop in f else len(f)
        assert s == f[:first]  # cut just after the newline: the first line is whole, nothing after it
    assert short[0] == full[0][:3]


class Chunks:
    """The one datastore call ``TaskEncoder.neighbours`` makes: a chunk's tokens and continuation."""

    def chunk(self, r: int) -> dict:
        g = torch.Generator().manual_seed(r)
        return {"tokens": torch.randint(3, 60, (4,), generator=g).tolist(),
                "continuation": torch.randint(3, 60, (4 if r % 2 else 2,), generator=g).tolist()}


def retro_handle_for(tiny_lm: str, method: str):
    """A RETRO-fit on the tiny LM (chunks of 4, CCA after two layers) with random encoder and CCA weights."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    n = lm.config.num_hidden_layers
    model = RetroFit(lm, RetroConfig(chunk_size=4, neighbour_len=8, enc_dim=16, enc_layers=1, enc_heads=2,
                                     cca_dim=16, cca_heads=2, cca_layers=[0, n - 1])).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in [*model.cca.parameters(), *model.encoder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return with_peft(model, method, "retro")


@pytest.mark.parametrize("method", ["none", "lora", "adapter", "prompt", "ptuning"])
def test_retro_cached_greedy_equals_recomputed_window(tiny_lm, method):
    """RETRO-fit's decode cache: the tokens of the window recomputed every step, across chunk boundaries
    (12 new tokens: three chunks of 4 completed while generating), each row with its own neighbours."""
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    enc = TaskEncoder(tok, "retro", Chunks(), max_len=64, chunk_size=4, neighbour_len=8, max_new=12)
    h = retro_handle_for(tiny_lm, method)
    prompts = [enc.encode(ex, [i, i + 7][: 1 + i % 2], None) for i, ex in enumerate(questions(5))]
    cached = greedy(h, enc, prompts, 12, cache=True)
    window = greedy(h, enc, prompts, 12, cache=False)
    assert cached == window
    assert len({tuple(r) for r in cached}) > 1
    no_nb = [enc.encode(ex, [], None) for ex in questions(5)]  # other neighbours, other tokens: they are read
    assert greedy(h, enc, no_nb, 12) != cached
