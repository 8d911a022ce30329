"""benchmarks/diagnose.py end to end on a tiny random Llama, a tiny encoder and generated documents: every case
of the grid (a RETRO-fit, a kNN-LM store and a `ralm tune` run built by the benchmark itself, one prompt-tuning
baseline shared by the eval-lm cases), results JSON / markdown / PNG, verdicts, expectations and the article's
comparison recomputed from the stored per-unit values, a rerun that reads the cache, --max-minutes, and missing
or broken artefacts as "not run" rows."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench_module import load_benchmark
from conftest import write_corpus
from squad_data import write_squad

torch.set_num_threads(1)
M = 16  # chunk tokens of the tiny store
LM_CASES = ("retro-clean", "retro-leakage", "in-context-leakage", "in-context-clean", "knn-lm-leakage",
            "knn-lm-clean")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("diagnose.py", "diagnose_bench")


@pytest.fixture(scope="module")
def results_mod(bench):
    return load_benchmark("diagnose_results.py", "diagnose_results_under_test")


def tiny_grid(bench, root: Path, lm: str, encoder: str, **kw):
    base = dict(cache=str(root / "cache"), results=str(root / "results"), other=str(root / "other"), model=lm,
                store_docs=str(root / "store.jsonl"), held_docs=str(root / "held.jsonl"), ds=str(root / "ds"),
                build=("knn", "retro", "peft"), n_docs=3, doc_chars=400, context=33, stride=8, query_len=16,
                doc_tokens=8, k=8, knn_docs=6, n_virtual=2, baseline_lrs=(0.01, 0.1), baseline_steps=2,
                baseline_batch=2, baseline_seq_len=32, retrofit_steps=2, retrofit_batch=2, retrofit_seq_len=64,
                retro={"chunk_size": M, "neighbour_len": 2 * M, "enc_dim": 16, "enc_layers": 1, "enc_heads": 2,
                       "cca_dim": 16, "cca_heads": 2, "cca_layers": [1]},
                peft={"squad": str(root / "squad.json"), "steps": 2, "batch_size": 2, "lr": 0.05, "warmup": 1,
                      "docs": 2, "doc_tokens": 8, "max_len": 96, "max_new_tokens": 4, "max_target": 8,
                      "eval_examples": 2, "lora_rank": 2, "chunk_tokens": M, "encoder": encoder, "bf16": False},
                limit=4, n_boot=50, threads=1, bf16=False, retroprompt_run=str(root / "rp"))
    return bench.Grid(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    from ralm.datastore.build import BuildConfig, build
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("diag-bench")
    write_corpus(root / "store.jsonl", n_docs=8, words=80)
    write_corpus(root / "held.jsonl", n_docs=4, words=80, seed=7, prefix="h")
    write_squad(root / "squad.json", n_articles=10, n_paras=2)
    build(BuildConfig(inputs=[str(root / "store.jsonl")], out=str(root / "ds"), tokenizer=tiny_tokenizer,
                      chunking=ChunkingConfig(M), encoder=EncoderConfig(name=tiny_encoder, dtype="fp32")),
          progress=False)
    import test_retroprompt_train as rpt
    from ralm.tuning.retroprompt import train_retroprompt

    labelled = rpt.write_labelled(root / "labelled.jsonl")  # the RetroPrompt tests' generated texts
    train_retroprompt(rpt.config(labelled, tiny_lm, root / "rp", peft="lora"), progress=False)
    return root


@pytest.fixture(scope="module")
def result(bench, setup, tiny_lm, tiny_encoder):
    g = tiny_grid(bench, setup, tiny_lm, tiny_encoder)
    return g, bench.run_grid(g)


def test_every_case_runs_and_the_outputs_are_written(bench, result, setup):
    g, res = result
    out = Path(g.results)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["name"]: r for r in res["cases"]}
    assert list(rows) == list(bench.CASES)
    for name in (*LM_CASES, "peft-squad", "retroprompt"):
        r = rows[name]
        assert r["status"] == "measured", r["status"]
        cond = r["conditions"]
        assert set(cond) == {"real", "none", "shuffled", "random", "random-text", "fixed", "base", "prompt-tuning"}
        assert all(c["low"] <= c["estimate"] <= c["high"] for c in cond.values())
        assert r["pt_params"] == 2 * 32 and r["verdict"] in ("retrieval-dependent", "acts as a soft prompt", "no gain")
        stored = json.loads((g.measured() / f"{name}.json").read_text())
        assert stored["verdict_at_run"] == r["verdict"]  # recomputed from the units: what ralm diagnose said
        assert r["units"] == (3 if name in LM_CASES else len(stored["units"]["real"]["values"]))
    assert rows["retroprompt"]["metric"] == "acc" and rows["retroprompt"]["units"] == 8  # the run's test examples
    assert rows["retroprompt"]["artefacts"]["run"]["source"] == "given"
    assert rows["in-context-clean"]["params"] == 0 == rows["knn-lm-leakage"]["params"]
    assert rows["retro-clean"]["params"] > 0 and rows["peft-squad"]["params"] > 0
    assert rows["retro-clean"]["artefacts"]["checkpoint"]["source"].startswith("RETRO-fit here")
    assert rows["knn-lm-clean"]["artefacts"]["store"]["source"].startswith("built here: the first 6")
    assert rows["peft-squad"]["artefacts"]["run"]["source"].startswith("trained here with benchmarks/peftbench.py")
    assert rows["peft-squad"]["metric"] == "f1" and rows["peft-squad"]["change_unit"] == "f1 points"
    # the eval-lm cases train one prompt-tuning baseline (same text and settings) and share it
    assert len(list((Path(g.cache) / "baselines").glob("lm-*/choice.json"))) == 1
    assert [c["case"] for c in res["comparison"]] == ["retro-clean", "retro-leakage", "peft-squad", "retroprompt"]
    assert [e["case"] for e in res["expectations"]] == ["retro-clean", "retro-leakage", "in-context-leakage",
                                                        "knn-lm-leakage"]
    assert all(isinstance(e["held"], bool) for e in res["expectations"])
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(bench.CASES) + 1 + len(res["comparison"])  # two tables with their headers
    assert "| retroprompt | few-shot |" in md and "## Expectations" in md
    # the evaluated documents: the first n of each file, cut to doc_chars at a paragraph or word break
    leak = [json.loads(x) for x in Path(res["data"]["leakage"]).read_text().splitlines()]
    store = [json.loads(x) for x in (setup / "store.jsonl").read_text().splitlines()]
    assert [d["id"] for d in leak] == [d["id"] for d in store[:3]]
    assert all(len(d["text"]) <= 400 and s["text"].startswith(d["text"]) for d, s in zip(leak, store, strict=False))


def _doc_units(base: np.ndarray, tokens: np.ndarray, factor: float) -> dict:
    return {"values": (base * factor).tolist(), "weights": tokens.tolist()}


def test_verdicts_expectations_and_comparison_follow_the_numbers(result, results_mod):
    g, res = result
    cases = [json.loads((g.measured() / f"{n}.json").read_text()) for n in ("retro-clean", "retro-leakage")]
    base = np.array(cases[1]["units"]["base"]["values"])
    tokens = np.array(cases[1]["units"]["base"]["weights"])
    for case in cases:  # both on the same three documents (only the numbers matter here)
        case["units"] = {c: _doc_units(base, tokens, 1.0) for c in case["units"]}
    clean, leak = cases
    leak["units"]["real"] = _doc_units(base, tokens, 0.5)  # only the real store helps: retrieval-dependent
    for c in ("real", "shuffled", "random", "random-text", "fixed", "prompt-tuning"):  # everything helps alike
        clean["units"][c] = _doc_units(base, tokens, 0.8)
    out = results_mod.results(cases)
    rows = {r["name"]: r for r in out["cases"]}
    assert rows["retro-leakage"]["verdict"] == "retrieval-dependent" and rows["retro-leakage"]["real_beats_prompt_tuning"]
    assert rows["retro-clean"]["verdict"] == "acts as a soft prompt" and rows["retro-clean"]["adaptation"]
    held = {e["case"]: e["held"] for e in out["expectations"]}
    assert held == {"retro-clean": True, "retro-leakage": True, "in-context-leakage": None, "knn-lm-leakage": None}
    nats = 0.5 * base.sum() / tokens.sum()  # log(base ppl) - log(real ppl): half the NLL gone
    cmp = {c["case"]: c for c in out["comparison"]}
    assert cmp["retro-leakage"]["method_change"] == pytest.approx(nats)
    assert cmp["retro-leakage"]["pt_change"] == pytest.approx(0.0, abs=1e-12)
    assert cmp["retro-leakage"]["article_supported"] is False  # real beats prompt tuning
    assert cmp["retro-clean"]["pt_share_of_method_change"] == pytest.approx(1.0)
    assert cmp["retro-clean"]["article_supported"] is True
    assert cmp["retro-clean"]["params_ratio"] == pytest.approx(clean["params"]["real"] / clean["params"]["prompt-tuning"])
    # the other way round: both expectations fail
    leak["units"]["real"] = _doc_units(base, tokens, 1.0)
    clean["units"] = {c: _doc_units(base, tokens, 1.0) for c in clean["units"]}
    out = results_mod.results(cases)
    assert {e["case"]: e["held"] for e in out["expectations"]}["retro-clean"] is False
    assert {r["name"]: r["verdict"] for r in out["cases"]} == {"retro-clean": "no gain", "retro-leakage": "no gain"}
    assert "did not hold" in results_mod.markdown({**res, **out})
    assert all(c["article_supported"] is None for c in out["comparison"])  # no gain to explain
    assert math.isfinite(out["comparison"][0]["method_change"])


def test_rerun_reads_the_cache_and_max_minutes_stops(bench, result, setup, tiny_lm, tiny_encoder, monkeypatch):
    g, res = result
    monkeypatch.setattr(bench, "run_case", lambda *a: pytest.fail("a measured case was run again"))
    for fn in ("knn_store", "retro_checkpoint", "peft_run"):
        monkeypatch.setattr(bench, fn, lambda *a, f=fn: pytest.fail(f"{f}: an artefact looked up for a measured case"))
    again = bench.run_grid(g)
    assert again["cases"] == res["cases"] and again["comparison"] == res["comparison"]
    fresh = bench.run_grid(replace(g, results=str(setup / "results-2"), max_minutes=0))
    assert all(r["status"] == "not run: --max-minutes 0 reached" for r in fresh["cases"])


def test_missing_or_broken_artefacts_are_not_run_rows(bench, setup, tiny_lm, tiny_encoder):
    g = tiny_grid(bench, setup, tiny_lm, tiny_encoder, results=str(setup / "results-3"), cache=str(setup / "cache-3"),
                  other=str(setup / "other-3"), build=(), ds=str(setup / "no-such-ds"), retroprompt_run=None,
                  cases=("retro-clean", "knn-lm-leakage", "peft-squad", "in-context-clean", "retroprompt"))
    res = bench.run_grid(g)
    why = {r["name"]: r["status"] for r in res["cases"]}
    assert why["retro-clean"] == f"not run: no retrieval store at {setup / 'no-such-ds'}"
    assert why["in-context-clean"] == why["retro-clean"]
    assert why["knn-lm-leakage"].startswith("not run: no kNN-LM store at ") and "(--no-build)" in why["knn-lm-leakage"]
    assert why["peft-squad"].startswith("not run: no PEFT run at ") and "(--no-build)" in why["peft-squad"]
    assert why["retroprompt"].startswith("not run: no RetroPrompt run at ") and "(--no-build)" in why["retroprompt"]
    assert res["comparison"] == [] and all(e["held"] is None for e in res["expectations"])
    assert not list(Path(g.results).glob("grid-*/cases/*.json"))  # a "not run" row is not kept: a later run tries
    assert "not measured" in (Path(g.results) / "results.md").read_text()
    broken = bench.run_grid(replace(g, ds=str(setup / "ds"), retro_ckpt=str(setup), cases=("retro-clean",)))
    assert broken["cases"][0]["status"].startswith(f"not run: ralm diagnose: --checkpoint {setup}: not a RETRO-fit")


def test_the_presets_and_flags(bench):
    default = bench.grid_from(bench.parser().parse_args([]))
    assert (default.context, default.n_docs, default.stride, default.baseline_steps, default.limit) == (
        512, 16, 16, 300, 100)
    cpu = bench.grid_from(bench.parser().parse_args(["--cpu", "--max-minutes", "30"]))
    assert (cpu.context, cpu.n_docs, cpu.doc_chars, cpu.stride, cpu.knn_docs, cpu.baseline_steps) == (
        256, 6, 1200, 32, 60, 100)
    assert cpu.max_minutes == 30 and cpu.digest() != default.digest()
    assert cpu.build == ("ds", "knn", "retro", "peft", "retroprompt")
    assert replace(cpu, max_minutes=5, cases=("retro-clean",)).digest() == cpu.digest()  # cases of one grid
    picked = bench.grid_from(bench.parser().parse_args(["--cpu", "--no-build", "--cases", "retro-clean,peft-squad"]))
    assert picked.build == () and picked.cases == ("retro-clean", "peft-squad")
    with pytest.raises(SystemExit, match="--cases 'nope'"):
        bench.grid_from(bench.parser().parse_args(["--cases", "retro-clean,nope"]))
    cut = sys.modules["diagnose_artefacts"].cut  # imported by the benchmark from its own folder
    assert cut("one two three four", 9) == "one two" and cut("a\n\nbb cc dd", 9) == "a\n\nbb cc"
    assert cut("One two. Three four five", 15) == "One two." and cut("short", 9) == "short"
