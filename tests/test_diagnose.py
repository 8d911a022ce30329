"""``ralm diagnose`` (issue 15). Two synthetic tasks through the real ablation wrappers, bootstrap and verdict:
(a) the answer is only in the retrieved chunk: a model that reads it is retrieval-dependent; (b) neighbours are
noise but the trained layers still help (as a learnt prefix does): "acts as a soft prompt". The gains per
trained parameter equal hand-computed values; the query perturbation drops what it says; the CLI runs end to
end over a RETRO-fit checkpoint (baseline trained on its --train files), over in-context with --no-baseline, and
over a `ralm tune` run; bad input is one line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import test_registry as reg
import test_tune
from badinput import fails, runner
from ralm.cli import app
from ralm.core.retriever import Retriever
from ralm.errors import RalmError
from ralm.eval.context_variance import query_sensitivity
from ralm.eval.diagnose import (
    ABLATION_NAMES,
    DiagnoseConfig,
    PerturbedQueries,
    Units,
    diagnose_units,
    measure_conditions,
    perturb_query,
    run_diagnose,
    summarise,
)
from ralm.eval.verdict import DEPENDENT, NO_GAIN, SOFT_PROMPT

stores = reg.stores
tune_setup = test_tune.setup
N, K = 40, 4


class Store:
    """A query holding the word "q7" finds rows 70..73 (one without such a word: rows 990..993); row r holds the
    answer of input r // 10 (a store of 1000 rows)."""

    metric, rows = "ip", None

    def __len__(self) -> int:
        return 1000

    def search(self, queries, k, exclude_doc_ids=None):
        base = [10 * next((int(w[1:]) for w in q.split() if w[0] == "q" and w[1:].isdigit()), 99) for q in queries]
        I = np.array([[b + j for j in range(k)] for b in base], dtype=np.int64)  # noqa: E741
        return np.ones(I.shape, np.float32), I


QUERIES = [f"q{i} what is the answer" for i in range(N)]


def run_model(wrap, score):
    """The method: searches the store in two batches (as methods do), then scores each input from its rows."""
    r: Retriever = Store() if wrap is None else wrap(Store())
    rows = [row for b in (QUERIES[:15], QUERIES[15:]) for row in r.search(b, K)[1].tolist()]
    return score(rows)


def reads_the_answer(rows):
    """(a): 100 where a retrieved row holds the input's own answer, else 0."""
    return Units(np.array([100.0 * any(x >= 0 and x // 10 == i for x in row) for i, row in enumerate(rows)]))


def test_answer_only_in_the_retrieved_chunk_is_retrieval_dependent():
    units, log, perturbed = measure_conditions(lambda w: run_model(w, reads_the_answer), seed=0)
    assert units["real"].values.mean() == 100 and units["none"].values.mean() == 0
    assert units["shuffled"].values.mean() == 0  # each input got another input's rows
    assert units["random-text"].values.mean() == 100  # same rows (this toy reads row ids, not their text)
    assert units["fixed"].values.sum() == 100  # row 0 for everyone: input 0's answer only
    # a static prompt cannot know an input's answer: it always says input 0's
    units["prompt-tuning"] = Units(np.array([100.0] + [0.0] * (N - 1)))
    units["base"] = Units(np.zeros(N))
    out = diagnose_units("acc", "mean", units, {"real": 0, "prompt-tuning": 32}, n_boot=200)
    assert out["verdict"] == DEPENDENT, out["checks"]
    assert any(c.startswith("real beats shuffled") for c in out["checks"])
    assert len(log) == N and perturbed is not None and len(perturbed) == N
    lost = [f"q{i}" not in perturb_query(q, 0.2, 0).split() for i, q in enumerate(QUERIES)]  # by hand
    assert 0 < sum(lost) < N
    assert query_sensitivity(log.ids(), perturbed.ids()) == pytest.approx(np.mean(lost))


def test_noise_neighbours_with_helpful_trained_layers_act_as_a_soft_prompt():
    """(b): the trained layers take 0.3 nats per token off whenever any neighbour is there, whatever it holds;
    prompt tuning learns the same static shift. Per document: summed NLL, 50 tokens."""
    rng = np.random.default_rng(0)
    base = rng.uniform(2.0, 3.0, size=N)  # per-token NLL of each document under the frozen base

    def trained_layers(rows):
        helped = np.array([any(x >= 0 for x in row) for row in rows])
        return Units(50 * (base - 0.3 * helped), np.full(N, 50.0))

    units, _, _ = measure_conditions(lambda w: run_model(w, trained_layers), seed=0, perturb=None)
    units["base"] = Units(50 * base, np.full(N, 50.0))
    units["prompt-tuning"] = Units(50 * (base - 0.3), np.full(N, 50.0))
    out = diagnose_units("ppl", "ppl", units, {"real": 3000, "prompt-tuning": 512}, n_boot=200)
    assert out["verdict"] == SOFT_PROMPT, out["checks"]
    c = out["conditions"]
    assert c["real"]["loss_gain"] == pytest.approx(0.3) == pytest.approx(c["shuffled"]["loss_gain"])
    assert c["prompt-tuning"]["gain_per_parameter"] == pytest.approx(c["prompt-tuning"]["gain"] / 512)
    assert c["real"]["gain_per_parameter"] < c["prompt-tuning"]["gain_per_parameter"]  # the article's finding
    units["real"] = units["none"] = units["base"]  # nothing helps at all
    for a in ABLATION_NAMES:
        units[a] = units["base"]
    assert diagnose_units("ppl", "ppl", units, {}, n_boot=50)["verdict"] == NO_GAIN


def test_summary_equals_hand_computed_values():
    units = {"base": Units(np.array([1.0, 2.0, 3.0])), "real": Units(np.array([3.0, 4.0, 5.0])),
             "prompt-tuning": Units(np.array([2.0, 2.0, 2.0]))}
    rows = summarise("f1", "mean", units, {"real": 4, "prompt-tuning": 0}, n_boot=20)
    assert rows["real"]["estimate"] == 4 and rows["real"]["gain"] == 2 and rows["real"]["gain_per_parameter"] == 0.5
    assert rows["prompt-tuning"]["gain"] == 0 and rows["prompt-tuning"]["gain_per_parameter"] is None  # 0 params
    ppl = summarise("ppl", "ppl", {"base": Units(np.array([20.0]), np.array([10.0])),
                                   "real": Units(np.array([10.0]), np.array([10.0]))}, {"real": 10}, n_boot=5)
    assert ppl["real"]["estimate"] == pytest.approx(math.e)
    assert ppl["real"]["loss_gain"] == pytest.approx(1.0)  # 2 nats -> 1 nat per token
    assert ppl["real"]["gain"] == pytest.approx(math.exp(2) - math.e)  # lower ppl is better: positive


def test_perturbation_drops_a_seeded_share_of_words_or_coordinates():
    q = "one two three four five six seven eight nine ten"
    p = perturb_query(q, 0.2, seed=0)
    kept = p.split()
    assert len(kept) == 8 and all(w in q.split() for w in kept)
    assert kept == [w for w in q.split() if w in kept]  # order kept, only words removed
    assert perturb_query(q, 0.2, seed=0) == p and perturb_query("alone", 0.5, 0) == "alone"  # one word stays
    assert any(perturb_query(q, 0.2, seed=s) != p for s in (1, 2, 3))
    v = np.arange(1, 11, dtype=np.float32)
    pv = perturb_query(v, 0.2, seed=0)
    assert (pv == 0).sum() == 2 and ((pv == v) | (pv == 0)).all()

    class Echo:
        metric, rows = "ip", None

        def __len__(self):
            return 10

        def search(self, queries, k, exclude_doc_ids=None):
            self.seen = queries
            return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)

    inner = Echo()
    PerturbedQueries(inner, 0.2).search([q], 2)
    assert inner.seen == [p]
    PerturbedQueries(inner, 0.2).search(v[None], 2)
    assert isinstance(inner.seen, np.ndarray) and inner.seen.shape == (1, 10)


# ---- end to end ------------------------------------------------------------------------------------------
def lm_args(stores, tiny_lm, out, *extra):
    held = stores[0]
    return ["diagnose", "--model", tiny_lm, "--data", str(held), "--context", str(reg.CTX), "--out", str(out),
            "--n-boot", "50", "--n-virtual", "2", "--baseline-steps", "2", "--baseline-lrs", "0.01,0.1",
            "--baseline-seq-len", "32", "--json", "-q", *extra]


def test_cli_over_a_retrofit_checkpoint(stores, tiny_lm, tmp_path):
    _, ds, _, ckpt = stores
    r = runner.invoke(app, lm_args(stores, tiny_lm, tmp_path / "d", "--method", "retro", "--checkpoint", str(ckpt)))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    cond = out["conditions"]
    assert set(cond) == {"real", *ABLATION_NAMES, "base", "prompt-tuning"}
    assert out["verdict"] in (DEPENDENT, SOFT_PROMPT, NO_GAIN) and out["rule"].startswith("retrieval-dependent iff")
    assert all(cond[c]["low"] <= cond[c]["estimate"] <= cond[c]["high"] for c in cond)
    assert cond["real"]["trained_parameters"] > 0 and cond["prompt-tuning"]["trained_parameters"] == 2 * 32
    b = out["baseline"]
    assert set(b["sweep"]) == {"0.01", "0.1"} and b["lr"] in (0.01, 0.1) and b["train"]  # the checkpoint's files
    assert b["steps"] == 2
    cv = out["context_variance"]
    assert 0 <= cv["mean_jaccard"] <= 1 and 0 <= cv["query_sensitivity"] <= 1 and cv["distinct_ids"] >= 1
    assert -1 <= cv["mean_cosine_to_mean"] <= 1
    for name in ("diagnose.json", "diagnose.md", "diagnose.png"):
        assert (tmp_path / "d" / name).stat().st_size > 0
    md = (tmp_path / "d" / "diagnose.md").read_text()
    assert "Rule: retrieval-dependent iff" in md and "prompt tuning" in md
    assert (tmp_path / "d" / "diagnose.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_in_context_without_baseline_says_so(stores, tiny_lm, tmp_path):
    _, ds, _, _ = stores
    r = runner.invoke(app, lm_args(stores, tiny_lm, tmp_path / "d", "--method", "in-context", "--datastore",
                                   str(ds), "--stride", str(reg.STRIDE), "--query-len", "16", "--docs", "2",
                                   "--doc-tokens", "8", "--no-baseline"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "prompt-tuning" not in out["conditions"] and out["verdict"] != DEPENDENT
    assert any("--no-baseline" in c for c in out["checks"]) and out["conditions"]["real"]["trained_parameters"] == 0
    assert "skipped (--no-baseline)" in (tmp_path / "d" / "diagnose.md").read_text()


def test_cli_over_a_tune_run(tune_setup, tiny_lm, tmp_path):
    from ralm.eval.task import EvalTaskConfig, run_eval_task

    run = tmp_path / "run"
    code, text = test_tune.cli(test_tune.tune_args(tune_setup, tiny_lm, run, "gpt", "lora"))
    assert code == 0, text
    per: dict = {}
    res = run_eval_task(EvalTaskConfig(run=str(run), split="validation", limit=4), per_example=per)
    assert set(per) == {"em", "f1"} and len(per["f1"]) == res["examples"] >= 2
    assert np.mean(per["f1"]) == pytest.approx(res["f1"], abs=1e-3)  # the aggregate is their mean
    r = runner.invoke(app, ["diagnose", "--run", str(run), "--split", "validation", "--limit", "4", "--out",
                            str(tmp_path / "d"), "--n-boot", "50", "--n-virtual", "2", "--baseline-steps", "2",
                            "--baseline-lrs", "0.01,0.1", "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["metric"] == "f1" and out["conditions"]["real"]["units"] == res["examples"]
    assert out["conditions"]["real"]["estimate"] == pytest.approx(res["f1"], abs=1e-3)
    assert out["conditions"]["prompt-tuning"]["trained_parameters"] == 2 * 32
    assert out["subject"]["peft"] == "lora" and (tmp_path / "d" / "diagnose.png").exists()


@pytest.mark.parametrize("extra, needles", [
    (["--method", "magic"], ["--method", "magic"]),
    (["--method", "none"], ["--method none", "nothing to diagnose"]),
    (["--run", "RUN_IS_DATA"], ["--run", "not a `ralm tune` run"]),
    (["--method", "in-context", "--ablations", "none,shufled"], ["--ablations 'shufled'", "unknown ablation"]),
    (["--method", "in-context", "--ablations", "none,random"], ["the verdict needs", "shuffled"]),
    (["--method", "in-context", "--no-baseline", "--run", "x"], ["--method METHOD or --run RUN"]),
    (["--method", "in-context"], ["--train", "--no-baseline"]),
    (["--method", "in-context", "--perturb", "1.5"], ["--perturb 1.5"]),
])
def test_bad_input_is_one_line(stores, tiny_lm, tmp_path, extra, needles):
    held, ds, _, _ = stores
    extra = [str(held) if x == "RUN_IS_DATA" else x for x in extra]
    r = runner.invoke(app, ["diagnose", "--model", tiny_lm, "--data", str(held), "--datastore", str(ds),
                            "--out", str(tmp_path / "d"), "-q", *extra])
    fails(r, *needles)
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_api_without_a_tuner_needs_no_baseline(stores, tiny_lm, tmp_path):
    held, ds, _, _ = stores
    cfg = DiagnoseConfig(out=str(tmp_path / "d"), method="in-context", data=[str(held)], model=tiny_lm,
                         datastore=str(ds), train=[str(held)])
    with pytest.raises(RalmError, match="needs a tuner"):
        run_diagnose(cfg)


def test_decontamination_reaches_the_evaluation(stores, tiny_lm, tmp_path):
    held, ds, _, _ = stores
    kw = dict(out=str(tmp_path / "d"), method="in-context", data=[str(held)], model=tiny_lm, datastore=str(ds),
              baseline=False)
    assert DiagnoseConfig(**kw, decontaminate=8).eval_cfg.decontaminate == 8
    assert DiagnoseConfig(**kw).eval_cfg.decontaminate is None
    with pytest.raises(RalmError, match="--decontaminate 0"):
        DiagnoseConfig(**kw, decontaminate=0)
