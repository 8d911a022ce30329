"""Choice scoring with a causal LM (ralm.methods.choices) on a tiny random Llama: equal to the manual sum of
the continuation's token log-probabilities, for any batch size; bad input one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from ralm.errors import RalmError
from ralm.methods.choices import continuation_logliks

PROMPT = [2, 17, 18, 19, 20]
CHOICES = [[21], [30, 31, 32], [40, 41], [21, 22, 23, 24, 25]]


@pytest.fixture(scope="module")
def model(tiny_lm: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_lm).eval()


def _manual(model: LlamaForCausalLM, prompt: list[int], cont: list[int]) -> float:
    full = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0].float(), dim=-1)  # (L, V)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))


def test_equals_the_manual_computation_for_any_batch_size(model: LlamaForCausalLM) -> None:
    want = [_manual(model, PROMPT, c) for c in CHOICES]
    for bs in (1, 3, 8):
        got = continuation_logliks(model, PROMPT, CHOICES, batch_size=bs)
        assert got == pytest.approx(want, abs=1e-5)
    assert all(w < 0 for w in want)


def test_the_prompt_is_context_not_scored(model: LlamaForCausalLM) -> None:
    # the same continuation after another prompt scores differently; the prompt's own tokens never count
    a = continuation_logliks(model, PROMPT, [[21]])[0]
    b = continuation_logliks(model, [2, 50, 51], [[21]])[0]
    assert a != pytest.approx(b)
    first = continuation_logliks(model, PROMPT, [[21, 22]])[0]
    assert first == pytest.approx(a + continuation_logliks(model, PROMPT + [21], [[22]])[0], abs=1e-5)


def test_bad_input_is_refused(model: LlamaForCausalLM) -> None:
    with pytest.raises(RalmError, match="empty prompt"):
        continuation_logliks(model, [], CHOICES)
    with pytest.raises(RalmError, match="empty continuation"):
        continuation_logliks(model, PROMPT, [[21], []])
    with pytest.raises(RalmError, match=r"prompt \+ choice is 133 tokens, the model handles 128"):
        continuation_logliks(model, PROMPT, [[21] * 128])
    with pytest.raises(RalmError, match="batch size 0"):
        continuation_logliks(model, PROMPT, CHOICES, batch_size=0)
