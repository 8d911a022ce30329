"""kNN-LM distribution and interpolation."""

from __future__ import annotations

import math

import pytest
import torch

from ralm.errors import RalmError
from ralm.methods.knnlm import KNNLMConfig, interpolate, knn_log_probs


def test_knn_distribution_aggregates_neighbours_by_value():
    d = torch.tensor([[0.0, 1.0, 2.0]])
    v = torch.tensor([[3, 3, 5]])
    lp = knn_log_probs(d, v, vocab_size=8)
    w = torch.softmax(-d[0], 0)
    assert torch.isclose(lp[0, 3].exp(), w[0] + w[1]) and torch.isclose(lp[0, 5].exp(), w[2])
    assert torch.isclose(lp.exp().sum(), torch.tensor(1.0))
    assert torch.isinf(lp[0, 0]) and lp[0, 0] < 0


def test_temperature_sharpens():
    d = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[0, 1]])
    hot, cold = knn_log_probs(d, v, 2, temperature=10.0), knn_log_probs(d, v, 2, temperature=0.1)
    assert cold[0, 0] > hot[0, 0]


def test_padding_neighbours_are_ignored_and_empty_rows_fall_back_to_lm():
    d = torch.tensor([[0.0, 5.0], [1.0, 1.0]])
    v = torch.tensor([[2, -1], [-1, -1]])
    valid = v >= 0
    lp = knn_log_probs(d, v, 4, valid=valid)
    assert torch.isclose(lp[0, 2], torch.tensor(0.0))  # the only valid neighbour gets all the mass
    assert torch.isinf(lp[1]).all()
    lm = torch.log_softmax(torch.randn(2, 4), -1)
    mixed = interpolate(lm, lp, 0.25)
    torch.testing.assert_close(mixed[1], lm[1] + math.log(0.75))
    assert torch.isclose(mixed.exp().sum(-1)[0], torch.tensor(1.0))


def test_lambda_zero_is_the_lm_exactly_and_one_is_knn():
    torch.manual_seed(0)
    lm = torch.log_softmax(torch.randn(5, 11), -1)
    knn = knn_log_probs(torch.rand(5, 4), torch.randint(0, 11, (5, 4)), 11)
    assert torch.equal(interpolate(lm, knn, 0.0), lm)
    assert torch.equal(interpolate(lm, knn, 1.0), knn)
    mid = interpolate(lm, knn, 0.3)
    torch.testing.assert_close(mid.exp(), 0.3 * knn.exp() + 0.7 * lm.exp())
    torch.testing.assert_close(mid.exp().sum(-1), torch.ones(5))


@pytest.mark.parametrize("kw,flag", [({"lmbda": -0.1}, "--lmbda"), ({"lmbda": 1.5}, "--lmbda"), ({"k": 0}, "--k"),
                                     ({"temperature": 0.0}, "--temperature")])
def test_bad_config(kw, flag):
    with pytest.raises(RalmError, match=flag):
        KNNLMConfig(**kw)
