"""benchmarks/peftbench.py end to end on a tiny random Llama, a tiny encoder and a generated SQuAD file: stores,
RETRO-fit, zero-shot and tuned rows for both archs, one tuning run in its own subprocess (peak RSS), the
results JSON / markdown / PNG, and claims computed from the numbers (not hand-written)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench_module import load_benchmark
from squad_data import write_squad

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("peftbench.py", "peft_bench")


@pytest.fixture(scope="module")
def results_mod():
    return load_benchmark("peft_results.py", "peft_results_under_test")


def tiny_grid(bench, root: Path, squad: Path, lm: str, encoder: str, rows, isolate: bool = False):
    return bench.Grid(cache=str(root / "cache"), results=str(root / "results"), squad=str(squad), rows=rows,
                      steps=2, batch_size=2, lr=0.05,
                      warmup=1, limit=3, docs=2, doc_tokens=8, max_len=96, max_new_tokens=4, max_target=8,
                      eval_examples=2, lora_rank=2, adapter_dim=4, n_virtual=3, retrofit_steps=2, retrofit_batch=2,
                      retrofit_seq_len=32, chunk_tokens=16, encoder=encoder, reuse_retro_ckpt=False, isolate=isolate,
                      bf16=False, retro={"neighbour_len": 32, "enc_dim": 16, "enc_layers": 1, "enc_heads": 2,
                                         "cca_dim": 16, "cca_heads": 2, "cca_layers": [1]},
                      speed_reps=1, speed_steps=2, skipped=["gemma3-270m rows (test)"])


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory, tiny_lm, tiny_encoder):
    root = tmp_path_factory.mktemp("peftbench")
    squad = write_squad(root / "squad.json", n_articles=10, n_paras=2)
    rows = [(tiny_lm, "squad", a, m) for a in ("gpt", "retro") for m in ("lora", "full", "ptuning", "adapter")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "SMOL", tiny_lm)  # the tiny model plays SmolLM2 (claims and speed look it up)
        res = bench.run_grid(tiny_grid(bench, root, squad, tiny_lm, tiny_encoder, rows))
    return root, squad, res


def test_results_structure(result, tiny_lm):
    root, _, res = result
    cache = root / "results"
    assert json.loads((cache / "results.json").read_text()) == json.loads(json.dumps(res))
    assert (cache / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["rows"]) == 8 and res["settings"]["steps"] == 2
    n_test = res["zero_shot"][f"{Path(tiny_lm).name} squad gpt"]["examples"]
    assert 1 <= n_test <= 3  # --limit 3 (the generated test split may hold fewer)
    for r in res["rows"]:
        assert r["trainable"] > 0 and 0 < r["percent"] <= 100 and r["tokens_per_second"] > 0
        assert r["positions_per_second"] > r["tokens_per_second"]  # the prompt is computed, not trained on
        assert r["tuned"]["examples"] == n_test and 0 <= r["tuned_score"] <= 100 and 0 <= r["zero_shot"] <= 100
    full = [r for r in res["rows"] if r["method"] == "full"]
    assert all(r["percent"] == 100 for r in full if r["arch"] == "gpt")
    lora = next(r for r in res["rows"] if (r["arch"], r["method"]) == ("gpt", "lora"))
    assert lora["trainable"] < full[0]["trainable"]
    pair = res["speed"]["pairs"]  # one alternating (lora, full) pair, each in its own process
    assert pair["pairs"] == 1 and pair["ratio_lora_over_full"] > 0 and pair["full_peak_rss_mb"] > 50
    assert res["speed"]["rows"]["ratio_lora_over_full"] > 0
    assert res["retrofit"][Path(tiny_lm).name]["source"].startswith("RETRO-fit here")
    assert res["speed"]["rows"]["ratio_lora_over_full"] == pytest.approx(
        lora["positions_per_second"] / full[0]["positions_per_second"], abs=1e-3)
    md = (cache / "results.md").read_text()
    assert md.count("\n| ") == 9  # header + 8 rows
    for text in ("RETRO beats GPT zero-shot", "GPT gains more from PEFT", "P-tuning trails", "saturate with size",
                 "Not run: gemma3-270m rows (test)"):
        assert text in md


def test_claims_are_computed_from_the_rows(bench, results_mod, result):
    _, _, res = result
    c = res["claims"]
    g0 = next(r for r in res["rows"] if r["arch"] == "gpt")["zero_shot"]
    r0 = next(r for r in res["rows"] if r["arch"] == "retro")["zero_shot"]
    assert c["retro_beats_gpt_zero_shot"]["value"] == pytest.approx(r0 - g0)
    assert c["retro_beats_gpt_zero_shot"]["supported"] == (r0 > g0)
    assert c["gains_saturate_with_size"]["figure"] == "not measured"  # no second size in the grid
    assert c["gains_saturate_with_size"]["supported"] is None
    # change the numbers: the claims follow them
    rows = json.loads(json.dumps(res["rows"]))
    for r in rows:
        r["zero_shot"] = 10.0 if r["arch"] == "gpt" else 30.0
        r["tuned_score"] = {"gpt": 50.0, "retro": 35.0}[r["arch"]] - (20.0 if r["method"] == "ptuning" else 0.0)
    rows.append({**rows[0], "model": bench.GEMMA, "arch": "gpt", "method": "lora", "zero_shot": 20.0,
                 "tuned_score": 40.0})
    c = results_mod.claims(rows, rows[0]["model"], bench.GEMMA)  # the tiny model plays the small size
    assert c["retro_beats_gpt_zero_shot"]["supported"] and c["retro_beats_gpt_zero_shot"]["value"] == 20.0
    assert c["gpt_gains_more_from_peft"]["supported"] and c["gpt_gains_more_from_peft"]["value"] == pytest.approx(35.0)
    assert "full" not in c["gpt_gains_more_from_peft"]["per_method"]  # the reference, not a PEFT method
    full_moved = [{**r, "tuned_score": 100.0 if r["arch"] == "retro" else 0.0} if r["method"] == "full" else r
                  for r in rows]  # full fine-tuning gaining far more on retro leaves the PEFT claim as it was
    again = results_mod.claims(full_moved, rows[0]["model"], bench.GEMMA)
    assert again["gpt_gains_more_from_peft"]["value"] == pytest.approx(35.0)
    assert c["ptuning_trails_adapters_and_lora"]["value"] == {"gpt": -20.0, "retro": -20.0}
    assert c["gains_saturate_with_size"]["value"] == {"gpt": {rows[0]["model"]: 40.0, bench.GEMMA: 20.0}}
    assert c["gains_saturate_with_size"]["supported"] is True
    assert "contradicts" not in results_mod.markdown({**res, "rows": rows, "claims": c})


def test_rerun_reads_the_cache_and_a_child_run_reports_rss(bench, result, tiny_lm, tiny_encoder, monkeypatch):
    root, squad, res = result
    monkeypatch.setattr(bench, "SMOL", tiny_lm)
    monkeypatch.setattr(bench, "run_tune", lambda spec: pytest.fail("a cached row was retrained"))
    again = bench.run_grid(tiny_grid(bench, root, squad, tiny_lm, tiny_encoder,
                                     [(tiny_lm, "squad", "gpt", "lora")]))
    assert again["rows"][0]["tuned"] == res["rows"][0]["tuned"]
    # a fresh clone: the measured JSON without the cache (stores, RETRO-fits): rows are read, nothing is rebuilt
    monkeypatch.setattr(bench, "store_for", lambda *a: pytest.fail("a store was built for a measured row"))
    monkeypatch.setattr(bench, "retro_checkpoint", lambda *a: pytest.fail("RETRO-fit for a measured row"))
    fresh = replace(tiny_grid(bench, root, squad, tiny_lm, tiny_encoder,
                              [(tiny_lm, "squad", a, "lora") for a in ("gpt", "retro")]), cache=str(root / "clone"))
    again = bench.run_grid(fresh)
    same = [r["tuned"] for r in res["rows"] if r["method"] == "lora"]
    assert json.dumps([r["tuned"] for r in again["rows"]]) == json.dumps(same)  # as JSON: a NaN loss equals itself
    monkeypatch.undo()
    monkeypatch.setattr(bench, "SMOL", tiny_lm)
    # one row in its own process: the peak RSS of that process
    iso = bench.run_grid(tiny_grid(bench, root, squad, tiny_lm, tiny_encoder, [(tiny_lm, "squad", "gpt", "prompt")],
                                   isolate=True))
    r = iso["rows"][0]
    assert r["peak_rss_mb"] > 50 and r["tuned"]["examples"] == res["rows"][0]["tuned"]["examples"]


def test_task_and_model_filters(bench, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(bench, "run_grid", lambda g: seen.setdefault("g", g) and {})
    assert bench.main(["--cpu", "--tasks", "squad", "--models", bench.SMOL]) == 0
    g = seen["g"]
    assert g.rows and {r[1] for r in g.rows} == {"squad"} and {r[0] for r in g.rows} == {bench.SMOL}
    assert len(g.rows) == 10 and g.steps == 200 and g.batch_size == 2
    assert any("--tasks" in s for s in g.skipped) and any("--models" in s for s in g.skipped)
    with pytest.raises(SystemExit):
        bench.main(["--cpu", "--tasks", "squad,nope"])
    assert "--tasks 'nope'" in capsys.readouterr().err
