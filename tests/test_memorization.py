"""Memorization score by self-influence (issue 14): LiSSA's H⁻¹v against a dense solve, self-influence against
exact leave-one-out retraining, a flipped label scoring highest, the atypical share, bad input. Generated data
(a tiny L2-regularised logistic regression, a quadratic, a mean estimate), float64."""

from __future__ import annotations

import pytest
import torch

from ralm.errors import RalmError
from ralm.methods.retroprompt.memorization import (
    TINY_LISSA,
    LogisticProblem,
    MemoConfig,
    atypical,
    check_against_loo,
    exact_inverse_hvp,
    hessian,
    leave_one_out,
    lissa_inverse_hvp,
    memo_summary,
    pearson,
    self_influence,
    spearman,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lissa_matches_the_closed_form_on_a_quadratic():
    # loss = ½ wᵀAw − bᵀw on two parameter tensors: H = A, known; the solve and LiSSA must both give (A + δI)⁻¹v
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.T / 6 + 0.3 * torch.eye(6, dtype=torch.float64)  # (6, 6) SPD
    w1 = torch.randn(2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    w2 = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)

    def loss(_batch):
        w = torch.cat([w1.reshape(-1), w2])
        return 0.5 * w @ a @ w

    v = [torch.randn(2, 2, dtype=torch.float64, generator=gen), torch.randn(2, dtype=torch.float64, generator=gen)]
    cfg = MemoConfig(damping=1e-3, scale=float(torch.linalg.eigvalsh(a).max()), depth=300)
    want = torch.linalg.solve(a + cfg.added_damping * torch.eye(6, dtype=torch.float64), torch.cat([v[0].reshape(-1), v[1]]))
    assert torch.allclose(hessian(loss, [w1, w2], None), a)
    exact = exact_inverse_hvp(loss, [w1, w2], v, None, cfg.added_damping)
    lissa = lissa_inverse_hvp(loss, [w1, w2], v, [None], cfg)
    assert [t.shape for t in lissa] == [(2, 2), (2,)]
    assert torch.allclose(torch.cat([exact[0].reshape(-1), exact[1]]), want)
    assert rel_err(torch.cat([lissa[0].reshape(-1), lissa[1]]), want) < 0.01
    # too shallow a recursion has not converged: the depth matters (this test can fail)
    short = lissa_inverse_hvp(loss, [w1, w2], v, [None], MemoConfig(damping=1e-3, scale=cfg.scale, depth=3))
    assert rel_err(torch.cat([short[0].reshape(-1), short[1]]), want) > 0.1


def test_lissa_matches_the_solve_on_logistic_regression_full_and_minibatch():
    prob = LogisticProblem.make()
    w = prob.train(torch.arange(40)).requires_grad_(True)
    v = [torch.autograd.grad(prob.losses(w, torch.tensor([3]))[0], w)[0]]
    everyone = torch.arange(40)
    exact = exact_inverse_hvp(lambda i: prob.losses(w, i).mean(), [w], v, everyone, TINY_LISSA.added_damping)[0]
    full = lissa_inverse_hvp(lambda i: prob.losses(w, i).mean(), [w], v, [everyone], TINY_LISSA)[0]
    assert rel_err(full, exact) < 0.01
    # minibatches of 10 (4 disjoint chunks): noisier, still within ~10% when averaged over repeats
    chunks = list(torch.arange(40).split(10))
    cfg = MemoConfig(damping=1e-3, scale=2.0, depth=150, repeats=4, hvp_batch=10)
    mini = lissa_inverse_hvp(lambda i: prob.losses(w, i).mean(), [w], v, chunks, cfg)[0]
    assert rel_err(mini, exact) < 0.15


def test_leave_one_out_and_self_influence_on_a_mean_in_closed_form():
    # θ = mean of the kept x, loss_i = ½(x_i − θ)²: θ_{-i} − x_i = (θ − x_i)·n/(n−1), H = 1, ∇L_i = θ − x_i
    x = torch.tensor([0.0, 1.0, 2.0, 7.0], dtype=torch.float64)
    n, theta = 4, x.mean()
    loo = leave_one_out(lambda keep: x[keep].mean(), lambda t, i: float(0.5 * (x[i] - t) ** 2), n)
    r2 = (x - theta) ** 2
    assert torch.allclose(loo, 0.5 * r2 * ((n / (n - 1)) ** 2 - 1))
    t = theta.clone().requires_grad_(True)
    inf = self_influence(lambda idx: 0.5 * (x[idx] - t) ** 2, [t], n, MemoConfig(damping=0.0), "exact")
    assert torch.allclose(inf.scores, r2 / n)
    assert inf.method == "exact" and "exact solve" in inf.approximation
    assert int(inf.scores.argmax()) == int(loo.argmax()) == 3  # the far point
    part = leave_one_out(lambda keep: x[keep].mean(), lambda t, i: float(0.5 * (x[i] - t) ** 2), n, indices=[3])
    assert torch.allclose(part, loo[3:])


def test_self_influence_tracks_exact_leave_one_out():
    check = check_against_loo()
    assert check.spearman_exact > 0.9 and check.pearson_exact > 0.9
    assert check.spearman_lissa > 0.9
    assert check.lissa_rel_error < 0.03
    assert (check.loo > 0).all()  # leaving an example out never lowers its own loss (convex problem)
    assert "LiSSA" in check.approximation and "Spearman" in check.summary()
    # the correlation is not an artefact: shuffled scores do not track leave-one-out
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert spearman(check.exact[perm], check.loo) < 0.5


def test_a_flipped_label_scores_highest():
    prob = LogisticProblem.make(noise=False, flip=[7])  # separable labels, one flipped
    w = prob.train(torch.arange(40)).requires_grad_(True)
    loo = leave_one_out(prob.train, lambda w, i: float(prob.losses(w, torch.tensor([i]))[0]), 40)
    cfg = MemoConfig(damping=1e-3, scale=2.0, depth=60, hvp_batch=10, group=40)
    for method in ("exact", "lissa"):
        inf = self_influence(lambda idx: prob.losses(w, idx), [w], 40, cfg, method)
        assert inf.scores.shape == (40,) and inf.method == method
        assert int(inf.scores.argmax()) == 7 == int(loo.argmax())
    sub = self_influence(lambda idx: prob.losses(w, idx), [w], 40, cfg, "exact", indices=[7, 0])
    assert sub.scores.shape == (2,) and sub.scores[0] > sub.scores[1]


def test_module_parameters_and_groups_give_the_same_scores():
    # the same logistic regression as an nn.Linear (two parameter tensors) scores as the flat weight vector does,
    # and LiSSA's grouping of examples (which share each step's gradient graph) does not change the scores
    prob = LogisticProblem.make(n=20, d=4, seed=3)
    w = prob.train(torch.arange(20)).requires_grad_(True)
    lin = torch.nn.Linear(4, 1, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w[:-1][None])
        lin.bias.copy_(w[-1:])

    def linear_losses(idx):
        logits = lin(prob.x[idx])[:, 0]
        return (torch.nn.functional.binary_cross_entropy_with_logits(logits, prob.y[idx], reduction="none")
                + 0.5 * prob.reg * lin.weight.pow(2).sum())

    cfg = MemoConfig(damping=1e-3, scale=2.0, depth=30, hvp_batch=5, group=20)
    flat = self_influence(lambda idx: prob.losses(w, idx), [w], 20, cfg)
    mod = self_influence(linear_losses, list(lin.parameters()), 20, cfg)
    grouped = self_influence(linear_losses, list(lin.parameters()), 20, MemoConfig(**{**vars(cfg), "group": 3}))
    assert torch.allclose(mod.scores, flat.scores) and torch.allclose(grouped.scores, mod.scores)
    exact = self_influence(linear_losses, list(lin.parameters()), 20, cfg, "exact")
    assert torch.allclose(exact.scores, self_influence(lambda idx: prob.losses(w, idx), [w], 20, cfg, "exact").scores)


def test_atypical_takes_the_least_confident_share():
    conf = torch.tensor([0.9, 0.1, 0.5, 0.05, 0.7, 0.3, 0.95, 0.6, 0.8, 0.2])
    assert atypical(conf, 0.3).tolist() == [3, 1, 9]
    assert atypical(conf, 0.01).tolist() == [3]  # at least one
    assert sorted(atypical(conf, 1.0).tolist()) == list(range(10))
    assert len(atypical(torch.rand(40), 0.1)) == 4


def test_memo_summary_splits_off_the_atypical_share():
    scores = torch.tensor([1.0, 9.0, 2.0, 7.0, 3.0])
    conf = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7])
    row = memo_summary(scores, conf, 0.4)
    assert row == {"n": 5, "mean": 4.4, "median": 3.0, "n_atypical": 2, "atypical_mean": 8.0, "atypical_median": 7.0}
    with pytest.raises(RalmError, match="5 scores|\\(5,\\) scores"):
        memo_summary(scores, conf[:4])


def test_correlation_helpers():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)  # ties


@pytest.mark.parametrize("kw, flag", [
    ({"damping": -0.1}, "--lissa-damping -0.1"), ({"damping": 1.0}, "--lissa-damping 1.0"),
    ({"scale": 0.0}, "--lissa-scale 0.0"), ({"depth": 0}, "--lissa-depth 0"), ({"repeats": 0}, "--lissa-repeats 0"),
    ({"hvp_batch": 0}, "--lissa-hvp-batch 0"), ({"group": 0}, "--lissa-group 0")])
def test_bad_config_is_one_line(kw, flag):
    with pytest.raises(RalmError, match=flag) as err:
        MemoConfig(**kw)
    assert "\n" not in str(err.value)


def test_bad_input_is_refused_in_one_line():
    prob = LogisticProblem.make(n=10, d=3)
    w = prob.train(torch.arange(10)).requires_grad_(True)
    frozen, unused = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = lambda idx: prob.losses(w, idx)  # noqa: E731
    mean = lambda idx: prob.losses(w, idx).mean()  # noqa: E731
    cfg = MemoConfig(damping=1e-3, scale=2.0, depth=20)
    cases = [
        (lambda: self_influence(losses, [w, frozen], 10, cfg), "parameter 1 .* does not require grad"),
        (lambda: self_influence(losses, [w, unused], 10, cfg), "parameter 1 .* gets no gradient"),
        (lambda: self_influence(losses, [], 10, cfg), "no parameters"),
        (lambda: self_influence(losses, [w], 10, cfg, method="newton"), "--method newton"),
        (lambda: self_influence(losses, [w], 10, cfg, indices=[10]), "indices"),
        (lambda: self_influence(lambda idx: prob.losses(w, idx).sum(), [w], 10, cfg), "gave shape \\(\\) for 1"),
        (lambda: lissa_inverse_hvp(losses, [w], [torch.ones(4)], [torch.arange(10)], cfg), "loss must be a scalar"),
        (lambda: lissa_inverse_hvp(mean, [w], [torch.zeros(2)], [torch.arange(10)], cfg), "v has shapes"),
        (lambda: lissa_inverse_hvp(mean, [w], [torch.ones(4)], [], cfg), "at least one batch"),
        # scale far below the largest eigenvalue: the recursion blows up and says which flag to raise
        (lambda: lissa_inverse_hvp(mean, [w], [torch.ones(4, dtype=torch.float64)], [torch.arange(10)],
                                   MemoConfig(damping=1e-3, scale=0.01, depth=200)), "--lissa-scale 0.01: LiSSA diverged"),
        (lambda: atypical(torch.tensor([0.5, float("nan")]), 0.5), "NaN"),
        (lambda: atypical(torch.tensor([]), 0.5), "non-empty"),
        (lambda: atypical(torch.rand(5), 0.0), "--atypical-share 0.0"),
        (lambda: exact_inverse_hvp(mean, [w], [torch.ones(4)], torch.arange(10), -1.0), "--damping -1.0"),
    ]
    for call, match in cases:
        with pytest.raises(RalmError, match=match) as err:
            call()
        assert "\n" not in str(err.value), match
    big = torch.zeros(5000, requires_grad=True)
    with pytest.raises(RalmError, match="small problems"):
        hessian(lambda _b: (big ** 2).sum(), [big], None)
