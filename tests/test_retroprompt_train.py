"""The RetroPrompt trainer and ``ralm retroprompt`` (issue 14): β = 0 is plain CE, the store refreshes on its
schedule, training leaves the example itself out, a killed run resumes to the uninterrupted weights, a saved run
reproduces its accuracy, the CLI end to end, bad input as one-line errors. Tiny random Llama, generated texts."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ralm.methods.retroprompt.scoring as scoring
import ralm.tuning.retroprompt as rp
from badinput import fails, write_jsonl
from conftest import make_text
from ralm.errors import RalmError
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.tuning.retroprompt_config import KEYS, RUN, STORE, WEIGHTS, RetroPromptConfig, draw

VERBALIZER = ["neg=gamma", "pos=epsilon"]  # first tokens Ġg, Ġe (as tests/test_retroprompt.py)
TEMPLATE = "Review: {text} It was"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_labelled(tmp_path_factory.mktemp("rp-data") / "labelled.jsonl")


def write_labelled(path):
    """60 texts, 30 per class; a class's texts lean on its own words (something for the store to find)."""
    rng = random.Random(0)
    recs = []
    for i in range(60):
        label = ("neg", "pos")[i % 2]
        cue = ("river mountain", "music science")[i % 2]
        recs.append({"id": f"x{i}", "text": f"{cue} {make_text(rng, rng.randint(3, 12))}", "label": label})
    return write_jsonl(path, recs)


def config(data, tiny_lm, out, **kw) -> RetroPromptConfig:
    base = dict(data=str(data), out=str(out), template=TEMPLATE, verbalizer=VERBALIZER, model=tiny_lm, shots=4,
                steps=4, batch_size=4, lr=1e-2, warmup=0, eval_every=0, save_every=1, bf16=False, seed=13,
                test_limit=8, lmbda_grid=(0.0, 0.2, 1.0))
    base.update(kw)
    knn = base.pop("knn", {})
    peft = base.pop("peft", "full")
    cfg = RetroPromptConfig(**base)
    return replace(cfg, knn=replace(cfg.knn, **{"k": 3, "demos": 2, **knn}), peft=replace(cfg.peft, method=peft))


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / WEIGHTS))


def keys(run, name=STORE) -> torch.Tensor:
    return load_file(str(run / name))["reps"]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def full_run(data, tiny_lm, tmp_path_factory):
    """An uninterrupted 4-step run that refreshes its store every step."""
    out = tmp_path_factory.mktemp("rp-runs") / "full"
    summary = rp.train_retroprompt(config(data, tiny_lm, out, refresh="1"), progress=False)
    return out, summary


# ---- the loss ----

def test_beta_zero_trains_exactly_as_plain_cross_entropy(data, tiny_lm, tmp_path, monkeypatch):
    rp.train_retroprompt(config(data, tiny_lm, tmp_path / "b0", knn={"beta": 0.0}), progress=False)
    rp.train_retroprompt(config(data, tiny_lm, tmp_path / "b1", knn={"beta": 1.0}), progress=False)
    monkeypatch.setattr(scoring, "knn_guided_loss", lambda logits, y, p, beta: F.cross_entropy(logits, y))
    rp.train_retroprompt(config(data, tiny_lm, tmp_path / "ce", knn={"beta": 1.0}), progress=False)
    assert same(weights(tmp_path / "b0"), weights(tmp_path / "ce"))
    assert not same(weights(tmp_path / "b1"), weights(tmp_path / "ce"))  # β scales the loss by example


# ---- the store's refresh ----

def test_the_store_refreshes_after_a_training_step_and_not_before(data, tiny_lm, tmp_path, full_run):
    one = tmp_path / "one"  # one step: the store is the pretrained model's when the step is taken
    rp.train_retroprompt(config(data, tiny_lm, one, steps=1, refresh="1"), progress=False)
    never = tmp_path / "never"
    s_never = rp.train_retroprompt(config(data, tiny_lm, never, steps=2, refresh="never"), progress=False)
    two = tmp_path / "two"
    s_two = rp.train_retroprompt(config(data, tiny_lm, two, steps=2, refresh="1"), progress=False)
    assert torch.equal(keys(one), keys(never))  # no refresh: still the keys training started from
    assert not torch.equal(keys(two), keys(one))  # refreshed before step 2: the weights moved
    # ... to exactly the representations of the model after step 1 (the one-step run's final store)
    torch.testing.assert_close(keys(two), keys(one, KEYS), rtol=0, atol=0)
    assert s_never["store"]["refreshes"] == 0 and s_two["store"]["refreshes"] == 1
    assert full_run[1]["store"]["refreshes"] == 3  # before steps 2, 3 and 4
    epoch = rp.train_retroprompt(config(data, tiny_lm, tmp_path / "epoch", steps=5), progress=False)
    assert epoch["store"]["refreshes"] == 2  # 8 examples, batch 4: an epoch is 2 steps (refresh at 2 and 4)
    assert 0 < epoch["store"]["share_of_training_time"] < 1


# ---- leave-self-out ----

@pytest.mark.parametrize("leave", [True, False])
def test_training_leaves_the_example_itself_out(data, tiny_lm, tmp_path, monkeypatch, leave):
    cfg = config(data, tiny_lm, tmp_path / "run", steps=2, knn={"leave_self_out": leave})
    train_ids = [e.id for e in draw(cfg).split.train]
    calls, searches = [], []
    real_loss, real_search = rp.training_loss, KnowledgeStore.search

    def loss(bb, store, examples, rows, targets, knn):
        calls.append(len(searches))
        assert [e.id for e in examples] == [train_ids[r] for r in rows]  # rows are the examples' own store rows
        searches.append(("rows", list(rows)))
        return real_loss(bb, store, examples, rows, targets, knn)

    def search(self, queries, k, exclude=None, label=None, flag="--k"):
        searches.append((label, None if exclude is None else list(exclude)))
        return real_search(self, queries, k, exclude, label, flag)

    monkeypatch.setattr(rp, "training_loss", loss)
    monkeypatch.setattr(KnowledgeStore, "search", search)
    rp.train_retroprompt(cfg, progress=False)
    assert len(calls) == 2
    for start in calls:
        _, rows = searches[start]
        demos, knn = searches[start + 1:start + 3], searches[start + 3]
        assert [d[0] for d in demos] == [0, 1] and all(d[1] == rows for d in demos)  # demonstrations: always out
        assert knn == (None, rows if leave else None)  # p_kNN: by the flag


def test_kept_in_the_example_is_its_own_nearest_neighbour(data, tiny_lm, tmp_path):
    """The reference keeps the example in: p_kNN(gold) is then 1 at k=1 (trivial), unlike left out."""
    kept = rp.train_retroprompt(config(data, tiny_lm, tmp_path / "kept", steps=1, knn={"leave_self_out": False,
                                                                                        "k": 1}), progress=False)
    assert kept["store"]["train_p_knn_gold"] == 1.0


# ---- resume and reproduction ----

def test_kill_and_resume_gives_the_uninterrupted_weights(data, tiny_lm, tmp_path, monkeypatch):
    # refreshed before steps 2 and 4, killed in step 3: the resumed run must read the keys of the refresh at
    # step 2 (from the store file), not those its freshly loaded model would give
    whole = rp.train_retroprompt(config(data, tiny_lm, tmp_path / "whole", steps=5, refresh="2"), progress=False)
    cfg = config(data, tiny_lm, tmp_path / "run", steps=5, refresh="2")
    real, calls = rp.training_loss, itertools.count(1)

    def crash_at_step_4(*a, **kw):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(rp, "training_loss", crash_at_step_4)
        rp.train_retroprompt(cfg, progress=False)
    summary = rp.train_retroprompt(cfg, progress=False)
    assert summary["resumed_at_step"] == 3
    assert whole["store"]["refreshes"] == 2 and summary["store"]["refreshes"] == 1  # this session's: at step 4
    assert same(weights(tmp_path / "run"), weights(tmp_path / "whole"))
    assert torch.equal(keys(tmp_path / "run"), keys(tmp_path / "whole"))
    assert summary["test"] == whole["test"] and summary["dev"] == whole["dev"]


def test_a_run_killed_while_scoring_scores_on_rerun(data, tiny_lm, tmp_path, monkeypatch, full_run):
    cfg = config(data, tiny_lm, tmp_path / "run", refresh="1")  # full_run's settings
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(rp, "_score", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
        rp.train_retroprompt(cfg, progress=False)
    with pytest.raises(RalmError, match="training has not finished"):
        rp.evaluate_retroprompt(tmp_path / "run")
    again = rp.train_retroprompt(cfg, progress=False)
    assert again["resumed_at_step"] == 4 and again["test"] == full_run[1]["test"]
    assert again["lmbda"] == full_run[1]["lmbda"] and rp.evaluate_retroprompt(tmp_path / "run") == {
        "split": "test", **full_run[1]["test"]}
    with pytest.raises(RalmError, match="already trained for 4 steps"):
        rp.train_retroprompt(cfg, progress=False)
    back = rp.finished_result(cfg)  # what a benchmark cell killed after training reads instead
    assert back["test"] == again["test"] and back["lmbda"] == again["lmbda"]
    assert back["steps"] == 4 and back["store"]["refreshes"] >= 1 and back["trainable"] == again["trainable"]
    assert rp.finished_result(replace(cfg, steps=5)) is None
    assert rp.finished_result(replace(cfg, out=str(tmp_path / "elsewhere"))) is None


@pytest.mark.parametrize("peft", ["full", "lora", "prompt"])
def test_a_saved_run_reproduces_its_accuracy_and_saves_only_what_trained(data, tiny_lm, tmp_path, peft, full_run):
    if peft == "full":
        run, summary = full_run
    else:
        run = tmp_path / peft
        demos = 0 if peft == "lora" else 2  # LoRA without demonstrations; virtual tokens with them
        summary = rp.train_retroprompt(config(data, tiny_lm, run, peft=peft, knn={"demos": demos}), progress=False)
    meta = json.loads((run / RUN).read_text())
    for split in ("dev", "test"):
        again = rp.evaluate_retroprompt(run, split)
        assert again["accuracy"] == meta[split]["accuracy"] == summary[split]["accuracy"]
        assert again["lmbda"] == meta["lmbda"] and again["examples"] == meta[split]["examples"]
    assert meta["test"]["examples"] == 8
    names = set(weights(run))
    if peft == "lora":
        assert names and all("lora_" in n for n in names)
    elif peft == "prompt":
        assert names and all(n.startswith("ralm_prompt.") for n in names)
    else:
        from transformers import LlamaForCausalLM

        assert names == {n for n, _ in LlamaForCausalLM.from_pretrained(tiny_lm).named_parameters()}
    assert keys(run, KEYS).shape[0] == 8  # the store: 4 shots x 2 classes


def test_lmbda_is_chosen_on_dev_unless_given(data, tiny_lm, tmp_path, full_run):
    meta = json.loads((full_run[0] / RUN).read_text())
    grid = meta["dev"]["accuracy_by_lmbda"]
    assert set(grid) == {"0", "0.2", "1"} and grid[f"{meta['lmbda']:g}"] == max(grid.values())
    assert meta["dev"]["accuracy_model"] == grid["0"] and meta["dev"]["accuracy_knn"] == grid["1"]
    given = rp.train_retroprompt(config(data, tiny_lm, tmp_path / "given", steps=1, lmbda=1.0), progress=False)
    assert given["lmbda"] == 1.0 and given["test"]["accuracy"] == given["test"]["accuracy_knn"]


def test_a_named_set_brings_its_template_and_verbalizer(tmp_path):
    rng = random.Random(1)
    recs = [{"text": make_text(rng, 8), "label": ("fresh", "rotten")[i % 2]} for i in range(40)]
    path = write_jsonl(tmp_path / "rt.jsonl", recs)
    cfg = RetroPromptConfig(data="rotten-tomatoes", data_file=str(path), out=str(tmp_path / "run"), shots=4)
    cfg = replace(cfg, knn=replace(cfg.knn, k=4, demos=3))
    assert cfg.prompt_config().template == "{text} It was"
    assert cfg.prompt_config().words == {"fresh": ("great",), "rotten": ("terrible",)}
    d = draw(cfg)
    assert [e.label for e in d.split.train].count("fresh") == 4 and len(d.split.dev) == 8
    assert d.classes == ("fresh", "rotten") and d.test and not {e.id for e in d.test} & {e.id for e in d.split.train}
    assert replace(cfg, template="Snippet: {text} Verdict:").prompt_config().template == "Snippet: {text} Verdict:"


# ---- the command line ----

def cli(args: list[str]):
    from typer.testing import CliRunner

    from ralm.cli import app

    return CliRunner().invoke(app, args)


def train_args(data, tiny_lm, out, *extra: str) -> list[str]:
    return ["retroprompt", "train", "--data", str(data), "--template", TEMPLATE, "--verbalizer", VERBALIZER[0],
            "--verbalizer", VERBALIZER[1], "--model", tiny_lm, "--out", str(out), "--shots", "4", "--k", "3",
            "--demos", "2", "--steps", "2", "--batch-size", "4", "--warmup", "0", "--test-limit", "6", "--quiet",
            *extra]


def test_the_cli_trains_and_evaluates_end_to_end(data, tiny_lm, tmp_path):
    r = cli(train_args(data, tiny_lm, tmp_path / "run", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["trained_examples"] == 8 and summary["test"]["examples"] == 6
    r = cli(["retroprompt", "eval", "--run", str(tmp_path / "run"), "--split", "test", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == summary["test"]["accuracy"]
    r = cli(["retroprompt", "eval", "--run", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0 and r.stdout.startswith("test: accuracy "), r.output
    assert cli(["retroprompt", "train", "--help"]).exit_code == 0
    fails(cli(train_args(data, tiny_lm, tmp_path / "run")), "already trained for 2 steps")
    r = cli(train_args(data, tiny_lm, tmp_path / "text", "--no-test"))
    assert r.exit_code == 0 and "test not scored; run in" in r.stdout, r.output


def test_eval_refuses_a_run_whose_data_changed(data, tiny_lm, tmp_path, full_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run[0], run)
    meta = json.loads((run / RUN).read_text())
    meta["train_ids"] = meta["train_ids"][::-1]
    (run / RUN).write_text(json.dumps(meta))
    with pytest.raises(RalmError, match="the data changed since training"):
        rp.evaluate_retroprompt(run, "test")


def test_bad_input_is_a_one_line_error(data, tiny_lm, tmp_path):
    def bad(needle: str, *change: str, at: str | None = None, d=data) -> None:
        args = train_args(d, tiny_lm, tmp_path / "run")
        if at is not None:  # replace the value of a flag
            i = args.index(at)
            args[i + 1] = change[0]
        else:
            args += list(change)
        fails(cli(args), needle)
        assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())

    three = write_jsonl(tmp_path / "three.jsonl", [json.loads(line) for line in data.read_text().splitlines()]
                        + [{"text": "river delta", "label": "meh"}] * 3)
    bad("label 'meh' is missing from --verbalizer", d=three)
    bad("class 'mid' has no examples", "--verbalizer", "mid=zeta")
    bad("needs exactly one {text} slot", "Review: It was", at="--template")
    bad("needs exactly one {text} slot", "Review: {text} It was {label}", at="--template")
    bad("--shots 20: k=20 per class needs 40 examples of class", "20", at="--shots")
    bad("--k 8: larger than the knowledge store (8 training examples", "8", at="--k")
    bad("--demos 4: larger than a class", "4", at="--demos")
    bad("--refresh 'sometimes'", "--refresh", "sometimes")
    bad("--lmbda 1.5: must be in [0, 1]", "--lmbda", "1.5")
    bad("--verbalizer 'neg': expected class=word", "neg", at="--verbalizer")
    bad("neither a named set", str(tmp_path / "nothing.jsonl"), at="--data")
    no_template = ["retroprompt", "train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", tiny_lm]
    fails(cli(no_template), "needs --template and --verbalizer")
    fails(cli(["retroprompt", "eval", "--run", str(tmp_path / "none")]), "no readable run.json")
    fails(cli(["retroprompt", "eval", "--run", str(tmp_path / "none"), "--split", "train"]), "--split 'train'")
