"""benchmarks/serve.py on the tiny store: both server settings answer every client count without errors, the
figures are computed from the loads, and its servers are gone afterwards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from test_eval_cli import setup  # noqa: F401  (the tiny store, built once)

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "serve.py"


def test_serve_bench_on_the_tiny_store(setup, capsys, monkeypatch):  # noqa: F811
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "questions", lambda n: ["river mountain", "music", "a long question about a city"])
    started = []
    real = bench.Server.__enter__
    monkeypatch.setattr(bench.Server, "__enter__", lambda self: started.append(self) or real(self))
    base, _ = setup
    bench.main(["--store", str(base / "ds"), "--parts", "load", "--clients", "1,3", "--seconds", "0.5",
                "--max-requests", "30", "-k", "3"])
    out = json.loads(capsys.readouterr().out)
    for name in ("batched", "unbatched"):
        assert [r["clients"] for r in out["load"][name]] == [1, 3]
        assert all(r["errors"] == 0 and 0 < r["requests"] <= 30 and r["p50_ms"] <= r["p99_ms"]
                   for r in out["load"][name])
    b, u = (out["load"][n][-1]["requests_per_second"] for n in ("batched", "unbatched"))
    assert out["micro_batching"]["batched_over_unbatched"] == round(b / u, 2)
    assert len(out["batch64"]["rounds"]) == 2 and out["batch64"]["service_over_in_process"] > 0
    assert len(started) == 2 and all(s.proc.poll() is not None for s in started)  # stopped by their pids
