"""``ralm retroprompt memo`` (issue 14): self-influence of each training example of a trained run. On a tiny image
run (generated Fashion-MNIST layout, a stand-in network, tests/rp_vision_data.py) with one mislabelled training
image: one score per example, LiSSA close to the exact solve on the head, the mislabelled example scoring
highest and least kNN-confident; a text run (tiny random Llama, LoRA); bad flags as one-line errors."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

import ralm.tuning.retroprompt as rp
from badinput import fails, write_jsonl
from conftest import make_text
from ralm.errors import RalmError
from ralm.methods.retroprompt.memorization import MemoConfig, spearman
from ralm.tuning.retroprompt_config import MEMO, RUN, RetroPromptConfig
from ralm.tuning.retroprompt_memo import memorization_scores
from rp_vision_data import FakeNet, config, fashion

# full-batch LiSSA on the head: its largest Hessian eigenvalue is ~s² = 100 times the gate's curvature (the
# demonstration term is gate·10·cos), so the scale is 200; d·s = 1 added to H keeps 500 steps enough
HEAD_LISSA = MemoConfig(damping=0.005, scale=200.0, depth=500, hvp_batch=20, group=20)
FLIPPED = "train-00001"  # a Trouser (template of class 1) labelled T-shirt/top, and in the 2-shot draw


@pytest.fixture(autouse=True)
def fake_net(monkeypatch):
    FakeNet.install(monkeypatch)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-shot image run (20 training examples) fitted to its data, one of which is mislabelled."""
    mp = pytest.MonkeyPatch()
    FakeNet.install(mp)
    tmp = tmp_path_factory.mktemp("memo")
    folder = fashion(tmp / "fm", per_class=4, swap=[(0, 1)])  # train-00000 drops out of the draw, 00001 stays
    out = tmp / "run"
    s = rp.train_retroprompt(config(folder, out, steps=60, lr=3e-2, vision={"dim": 8, "dropout": 0.0}),
                             progress=False)
    mp.undo()
    assert s["test"]["accuracy_model"] >= 0.8  # the clean examples are fitted
    return out


def test_one_score_per_training_example_is_written_to_the_run(run):
    m = memorization_scores(run, "lissa", "all", lissa=MemoConfig(damping=0.01, scale=1e3, depth=30, hvp_batch=20,
                                                                  group=20))
    ids = json.loads((run / RUN).read_text())["train_ids"]
    assert list(m["scores"]) == ids and list(m["knn_gold"]) == ids and FLIPPED in ids
    assert all(torch.isfinite(torch.tensor(list(m["scores"].values()))))
    assert m["params"]["which"] == "all" and "body.2.weight" in m["params"]["names"]  # the whole head
    assert m["params"]["count"] == sum(p.numel() for p in rp.load_run(run).backbone.module().parameters())
    assert m["approximation"].startswith("LiSSA (damping 0.01 x scale 1000 = 10 added to H, depth 30")
    s = m["summary"]
    assert s["n"] == 20 and s["n_atypical"] == 2 and len(m["atypical_ids"]) == 2  # 10 % of 20
    assert m["seconds"]["influence"] > 0 and "kNN weight" in m["loss"]
    assert json.loads((run / MEMO).read_text()) == json.loads(json.dumps(m))
    half = memorization_scores(run, "exact", "head", share=0.5, lissa=HEAD_LISSA)
    assert half["summary"]["n_atypical"] == 10 and half["params"]["count"] == 8 * 10 + 10 + 1


def test_lissa_is_close_to_the_exact_solve_on_the_head(run):
    exact = memorization_scores(run, "exact", "head", lissa=HEAD_LISSA)
    lissa = memorization_scores(run, "lissa", "head", lissa=HEAD_LISSA)
    a, b = (torch.tensor(list(m["scores"].values())) for m in (lissa, exact))
    assert float((a - b).norm() / b.norm()) < 0.05 and spearman(a, b) > 0.99
    assert exact["approximation"] == "exact solve of the full Hessian + 1·I"
    assert set(exact["params"]["names"]) == {"classifier.weight", "classifier.bias", "gate"}
    shallow = memorization_scores(run, "lissa", "head", lissa=replace(HEAD_LISSA, depth=20))
    c = torch.tensor(list(shallow["scores"].values()))
    assert float((c - b).norm() / b.norm()) > 0.2  # not converged: the depth matters (the check can fail)


def test_a_mislabelled_example_is_the_most_memorized_and_the_least_knn_confident(run):
    m = memorization_scores(run, "exact", "head", lissa=HEAD_LISSA)
    ranked = sorted(m["scores"], key=m["scores"].get, reverse=True)
    assert ranked[0] == FLIPPED and m["scores"][FLIPPED] > 1.5 * m["scores"][ranked[1]]
    assert m["atypical_ids"][0] == FLIPPED and m["knn_gold"][FLIPPED] == min(m["knn_gold"].values())
    assert m["summary"]["atypical_mean"] > m["summary"]["mean"]


def test_a_text_run_scores_its_lora_parameters(tiny_lm, tmp_path):
    rng = random.Random(0)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": make_text(rng, 6), "label": "ab"[i % 2]} for i in range(24)])
    cfg = RetroPromptConfig(data=str(data), out=str(tmp_path / "run"), template="{text} It was",
                            verbalizer=["a=gamma", "b=epsilon"], model=tiny_lm, shots=4, steps=2, batch_size=4,
                            lr=1e-3, warmup=0, eval_every=0, bf16=False, test_limit=4)
    cfg = replace(cfg, knn=replace(cfg.knn, k=3, demos=2), peft=replace(cfg.peft, method="lora"))
    rp.train_retroprompt(cfg, progress=False)
    m = memorization_scores(tmp_path / "run", "lissa", lissa=MemoConfig(damping=0.01, scale=1e3, depth=3))
    assert len(m["scores"]) == 8 and all(torch.isfinite(torch.tensor(list(m["scores"].values()))))
    assert m["params"]["names"] and all("lora_" in n for n in m["params"]["names"])
    with pytest.raises(RalmError, match="--params head: is for image runs"):
        memorization_scores(tmp_path / "run", "exact", "head")


def cli(args: list[str]):
    from typer.testing import CliRunner

    from ralm.cli import app

    return CliRunner().invoke(app, args)


def test_the_cli_and_bad_flags(run, tmp_path):
    r = cli(["retroprompt", "memo", "--run", str(run), "--method", "exact", "--params", "head", "--lissa-damping",
             "0.005", "--lissa-scale", "200", "--share", "0.2"])
    assert r.exit_code == 0 and r.stdout.startswith("memorization of 20 training examples (91 parameters"), r.output
    assert "atypical 4 (lowest p_kNN)" in r.stdout
    r = cli(["retroprompt", "memo", "--run", str(run), "--method", "exact", "--params", "head", "--json"])
    assert r.exit_code == 0 and "scores" not in json.loads(r.stdout), r.output
    memo = ["retroprompt", "memo", "--run", str(run)]
    fails(cli([*memo, "--method", "newton"]), "--method 'newton': choose lissa or exact")
    fails(cli([*memo, "--params", "peft"]), "--params 'peft': choose all or head")
    fails(cli([*memo, "--share", "0"]), "--share 0.0: must be in (0, 1]")
    fails(cli([*memo, "--share", "1.5"]), "--share 1.5: must be in (0, 1]")
    fails(cli([*memo, "--lissa-scale", "0"]), "--lissa-scale 0.0: must be > 0")
    fails(cli([*memo, "--lissa-depth", "0"]), "--lissa-depth 0: must be >= 1")
    fails(cli([*memo, "--params", "head", "--lissa-scale", "0.01", "--lissa-depth", "200"]),
          "--lissa-scale 0.01: LiSSA diverged")
    fails(cli([*memo, "--method", "exact"]), "the exact Hessian is for small problems (<= 4096 parameters), "
                                             "these have 12899: use method 'lissa'")
    fails(cli(["retroprompt", "memo", "--run", str(tmp_path / "none")]), "no readable run.json")
