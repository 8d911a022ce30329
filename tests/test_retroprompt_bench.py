"""benchmarks/retroprompt.py end to end on a tiny random Llama and generated labelled texts: every row at two
shots and two seeds, results JSON / markdown / PNG, the table and the comparison computed from the measured
cells, a rerun that reads the cache, --max-minutes, and one trained cell in its own process (peak RSS)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ralm.tuning.fewshot_table as ft
from bench_module import load_benchmark
from fewshot_data import TEMPLATE, VERBALIZER, write_labelled

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("retroprompt.py", "retroprompt_bench")


def tiny_grid(bench, root: Path, data: Path, lm: str, **kw):
    base = dict(cache=str(root / "cache"), results=str(root / "results"), data=(str(data), "no-such-set"),
                shots=(4, 2), seeds=(13, 21), model=lm, steps=2, lr=1e-2, batch_size=4, test_limit=8,
                max_tokens=64, k=16, demos=8, beta=1.0, bf16=False, isolate=False, threads=1, memo_depth=3,
                overrides={"template": TEMPLATE, "verbalizer": VERBALIZER, "warmup": 0, "lmbda_grid": (0.0, 0.2, 1.0)})
    return bench.Grid(**{**base, **kw})


@pytest.fixture(scope="module")
def result(bench, tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("rp-bench")
    data = write_labelled(root / "labelled.jsonl")
    return root, data, bench.run_grid(tiny_grid(bench, root, data, tiny_lm))


def test_results_structure(bench, result):
    root, data, res = result
    out = root / "results"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["data"] == [str(data)] and any(s.startswith("no-such-set: --data no-such-set") for s in res["skipped"])
    memo = res["memorization"]  # prompt FT and RetroPrompt at the largest shots, the memo seed only
    assert [(m["shots"], m["seed"], m["row"]) for m in memo] == [(4, 13, "prompt-ft"), (4, 13, "retroprompt")]
    for m in memo:
        cell = next(c for c in res["cells"] if (c["shots"], c["seed"], c["row"]) == (4, 13, m["row"]))
        assert m["n"] == len(cell["memorization"]["scores"]) == len(cell["memorization"]["knn_gold"]) > 0
        assert m["method"] == "lissa" and m["params"] > 0 and 1 <= m["n_atypical"] < m["n"]
    assert not any("memorization" in c for c in res["cells"] if (c["seed"], c["shots"]) != (13, 4))
    assert len(res["cells"]) == 2 * 2 * len(ft.ROWS) and all(c["computed"] for c in res["cells"])
    order = (*bench.HEADLINE, *bench.ABLATIONS)  # most informative first
    assert [(r["shots"], r["row"]) for r in res["table"]] == [(s, r) for s in (4, 2) for r in order]
    for r in res["table"]:
        assert r["seeds"] == [13, 21] and r["test_examples"] == 8 and 0 <= r["mean"] <= 100
        if r["row"] in ft.TRAINED:
            assert r["examples_per_second"] > 0 and 0 <= r["store_share"] < 1 and 0 < r["train_p_knn_gold"] <= 1
        else:
            assert "store_share" not in r
    cells = {(c["shots"], c["seed"], c["row"]): c for c in res["cells"]}
    assert cells[(2, 13, "knn")]["k"] == 3 and cells[(2, 13, "retroprompt")]["demos"] == 1  # 4 examples, 1 out
    assert cells[(4, 13, "prompt-ft")]["lmbda"] == 0.0 and cells[(4, 13, "prompt-ft")]["refreshes"] == 0
    assert not list((root / "cache").rglob("weights.safetensors"))  # measured runs are deleted (no --keep-runs)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 2 * (1 + len(ft.ROWS)) + 1 + 2  # header + rows, per shots; the memorization table
    assert "## Memorization" in md
    assert res["comparison"][0]["sentence"] in md and "Not run: " in md
    kept = res["kept_in_vs_left_out"][0]
    assert kept["sentence"].startswith("RetroPrompt with the example kept in vs RetroPrompt at 4 shots: ")
    assert kept["sentence"] in md


def test_table_and_comparison_are_computed_from_the_cells(result):
    _, data, res = result
    cells = {(c["shots"], c["seed"], c["row"]): c["test"] for c in res["cells"]}
    rp = next(r for r in res["table"] if (r["shots"], r["row"]) == (4, "retroprompt"))
    vals = [100 * cells[(4, s, "retroprompt")] for s in (13, 21)]
    assert rp["mean"] == pytest.approx(np.mean(vals), abs=0.01) and rp["std"] == pytest.approx(np.std(vals), abs=0.01)
    c = res["comparison"][0]  # at the grid's largest shots
    diffs = [100 * (cells[(4, s, "retroprompt")] - cells[(4, s, "prompt-ft")]) for s in (13, 21)]
    assert c["shots"] == 4 and c["difference"] == pytest.approx(np.mean(diffs), abs=0.01)
    assert c["sentence"].startswith(f"RetroPrompt vs prompt FT at 4 shots: {np.mean(diffs):+.1f} ± "
                                    f"{np.std(diffs):.1f} (seed spread ")
    assert c["beats"] == (np.mean(diffs) > 0)


def test_rerun_reads_the_cache_and_max_minutes_stops(bench, result, tiny_lm, monkeypatch):
    root, data, res = result
    monkeypatch.setattr(ft, "trained_cell", lambda cfg: pytest.fail("a cached cell was retrained"))
    monkeypatch.setattr(ft, "untrained_cells", lambda *a: pytest.fail("a cached cell was recomputed"))
    again = bench.run_grid(tiny_grid(bench, root, data, tiny_lm))
    assert again["table"] == res["table"] and not any(c["computed"] for c in again["cells"])
    more = bench.run_grid(tiny_grid(bench, root, data, tiny_lm, seeds=(13, 21, 42), max_minutes=0))
    assert len(more["cells"]) == len(res["cells"])  # the stored ones; seed 42 is not started
    assert any("not run (--max-minutes 0 reached)" in s for s in more["skipped"])


def test_a_trained_cell_in_its_own_process(bench, result, tiny_lm):
    root, data, res = result
    g = tiny_grid(bench, root, data, tiny_lm, results=str(root / "iso"), rows=("prompt-ft",), seeds=(13,),
                  shots=(4,), isolate=True)
    iso = bench.run_grid(g)
    (cell,) = iso["cells"]
    assert cell["peak_rss_mb"] > 50 and cell["computed"]
    same = next(c for c in res["cells"] if (c["shots"], c["seed"], c["row"]) == (4, 13, "prompt-ft"))
    assert cell["test"] == same["test"] and cell["test_examples"] == 8


def test_the_presets_and_flags(bench):
    paper = bench.grid_from(bench.parser().parse_args([]))
    assert (paper.peft, paper.steps, paper.lr, paper.batch_size, paper.test_limit) == ("full", 800, 1e-5, 8, None)
    assert paper.shots == (16, 4) and paper.seeds == (13, 21, 42, 87, 100) and paper.isolate
    cpu = bench.grid_from(bench.parser().parse_args(["--cpu", "--beta", "1", "--data", "bbc-news", "--seeds", "13"]))
    assert (cpu.peft, cpu.steps, cpu.test_limit, cpu.max_tokens, cpu.beta) == ("lora", 96, 200, 128, 1.0)
    assert cpu.memo_depth == 10
    assert cpu.data == ("bbc-news",) and cpu.seeds == (13,) and cpu.digest() != paper.digest()
    assert replace(cpu, seeds=(13, 21), max_minutes=5).digest() == cpu.digest()  # cells of one grid, not another
    assert paper.memo and paper.memo_seeds == (13,) and paper.memo_depth == 100
    memo = bench.grid_from(bench.parser().parse_args(["--memo-seeds", "21", "42", "--memo-depth", "7"]))
    assert memo.memo_seeds == (21, 42) and memo.memo_depth == 7 and memo.digest() == paper.digest()
    assert not bench.grid_from(bench.parser().parse_args(["--no-memo"])).memo
    # image cells: their own lr and the whole test split; at the defaults the digest of measured grids holds
    assert (cpu.image_lr, cpu.image_test_limit) == (1e-3, None) and "image_lr" in cpu.settings()
    assert replace(cpu, image_lr=1e-3).digest() == cpu.digest() != replace(cpu, image_lr=1e-2).digest()
    picked = bench.grid_from(bench.parser().parse_args(["--cpu", "--memo-data", "rotten-tomatoes", "--image-lr", "0.01"]))
    assert picked.memo_data == ("rotten-tomatoes",) and picked.image_lr == 0.01
    cell = SimpleNamespace(seed=13, data="bbc-news")
    assert bench.memo_job(cell, picked) is None and bench.memo_job(cell, cpu) is not None
    assert bench.memo_job(SimpleNamespace(seed=13, data="rotten-tomatoes"), picked) is not None
    normed = bench.grid_from(bench.parser().parse_args(["--cpu", "--demo-norm", "embedding"]))
    assert normed.demo_norm == "embedding" and normed.digest() != cpu.digest()  # its own cells
