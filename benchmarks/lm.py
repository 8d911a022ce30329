#!/usr/bin/env python
"""Retrieval-augmented LM benchmarks on real Wikipedia text with SmolLM2-135M (issue 3).

Stores (built once, cached under benchmarks/.cache/lm/, both resumable):
- a kNN-LM store of the LM's hidden states over the first 460 wiki_en articles (>= 1M keys);
- a retrieval store (64-token chunks + continuations, MiniLM keys) of the same articles.
Held out: articles 748-767 (validation, for λ) and 768-787 (test).

Claims, each a stage whose result is cached in benchmarks/.cache/lm/stage-*.json (``--fresh`` reruns):
- leakage: evaluated articles are in the stores, same-document exclusion off; in-context RALM and kNN-LM
  each cut perplexity by >= 40% against no retrieval (proof that retrieval is wired right);
- clean: held-out articles, exclusion and 32-gram decontamination on; none, in-context, REPLUG, kNN-LM
  with λ and temperature tuned on the 20 validation articles; kNN-LM must not be worse than none;
- speed: kNN-LM tokens/s >= 0.7 x LM-only tokens/s in the same run (1M-key store); in-context tokens/s and
  the share of its time spent retrieving;
- memory: peak RSS of a kNN-LM evaluation (own subprocess) < model size + index size + 1 GB.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RALM_DATA_DIR", ROOT.parent / "shared" / "data"))
CACHE = ROOT / "benchmarks" / ".cache" / "lm"
MODEL = "smollm2-135m"
CONTEXT = 512
N_STORE, VALID, TEST = 460, (748, 768), (768, 788)


def log(msg: str) -> None:
    print(f"[lm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare() -> dict[str, Path]:
    lines = (DATA / "wiki_en.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    files = {"store": lines[:N_STORE], "valid": lines[slice(*VALID)], "test": lines[slice(*TEST)]}
    paths = {}
    for name, chosen in files.items():
        paths[name] = CACHE / f"{name}.jsonl"
        if not paths[name].exists():
            paths[name].write_text("".join(chosen), encoding="utf-8")
    # short articles keep the slow stride-16 methods affordable on 2 cores; the same ones for every method
    paths["leak"] = _pick(paths["store"], CACHE / "leak.jsonl", 2)
    paths["test_small"] = _pick(paths["test"], CACHE / "test_small.jsonl", 4)
    paths["valid_small"] = _pick(paths["valid"], CACHE / "valid_small.jsonl", 4)
    return paths


def _pick(src: Path, dst: Path, n: int, lo: int = 2500, hi: int = 5000) -> Path:
    """The first ``n`` articles of ``src`` with lo..hi characters (about 600-1200 tokens)."""
    if not dst.exists():
        chosen = [line for line in src.read_text(encoding="utf-8").splitlines(keepends=True)
                  if lo <= len(json.loads(line)["text"]) <= hi][:n]
        dst.write_text("".join(chosen), encoding="utf-8")
    return dst


def knn_store(paths: dict[str, Path]) -> dict:
    from ralm.datastore.index import IndexConfig
    from ralm.methods.knnlm_store import KNNBuildConfig, build_knn_store

    # the same arguments as the `ralm knnlm build` command that may have started it: a rerun resumes it
    knn = build_knn_store(KNNBuildConfig([str(paths["store"])], str(CACHE / "knn"), model=MODEL, context=CONTEXT,
                                         window_stride=CONTEXT, batch_size=4,
                                         index=IndexConfig(target_recall=0.9, metric="l2")))
    return {"knn_keys": knn["keys"], "knn_index": knn["index"], "knn_index_params": knn["index_params"],
            "knn_recall_at_10": knn["recall_at_10"], "knn_build_seconds": knn["seconds"]}


def retrieval_store(paths: dict[str, Path]) -> dict:
    from ralm.datastore.build import BuildConfig, build

    ds = build(BuildConfig(inputs=[str(paths["store"])], out=str(CACHE / "ds"), shard_docs=100))
    return {"ds_chunks": ds["chunks"], "ds_index": ds["index"], "ds_recall_at_10": ds["recall_at_10"]}


def evaluate(method: str, data: Path, **kw) -> dict:
    from ralm.eval.lm import LMEvalConfig
    from ralm.eval.runner import EvalLMConfig, run_eval_lm
    from ralm.methods.in_context import InContextConfig
    from ralm.methods.knnlm import KNNLMConfig

    store = {"knn-lm": CACHE / "knn", "in-context": CACHE / "ds", "replug": CACHE / "ds"}.get(method)
    cfg = EvalLMConfig(model=MODEL, data=[str(data)], method=method, datastore=str(store) if store else None,
                       lm=LMEvalConfig(context=CONTEXT),
                       options={"in_context": InContextConfig(docs=kw.pop("docs", 1)),
                                "knn": KNNLMConfig(validation=kw.pop("validation", None))}, **kw)
    t0 = time.perf_counter()
    r = run_eval_lm(cfg, loaded=_lm())
    keep = ("ppl", "bpb", "tokens", "bytes", "seconds", "tokens_per_second", "retrieval_seconds", "retrieval_share",
            "lmbda", "temperature", "lmbda_sweep_validation", "temperature_sweep_validation", "lmbda_sweep_test", "k",
            "docs")
    out = {k: r[k] for k in keep if k in r}
    log(f"{method}: ppl {r['ppl']:.3f} bpb {r['bpb']:.4f} {r['tokens_per_second']} tok/s "
        f"({time.perf_counter() - t0:.0f} s)")
    return out


_LOADED = None


def _lm():
    global _LOADED
    if _LOADED is None:
        from ralm.lm.models import load

        _LOADED = load(MODEL)
    return _LOADED


def stage(name: str, fresh: bool, fn) -> dict:
    path = CACHE / f"stage-{name}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    if fresh:
        for old in CACHE.glob("eval-*.json"):
            old.unlink()
    result = fn()
    path.write_text(json.dumps(result, indent=2))
    return result


def leakage(paths: dict[str, Path], methods: tuple[str, ...]) -> dict:
    res = {m: evaluate(m, paths["leak"], exclude_same_doc=m == "none") for m in ("none", *methods)}
    for m in methods:
        res[m]["ppl_cut_vs_none"] = round(1 - res[m]["ppl"] / res["none"]["ppl"], 4)
        res[m]["pass"] = res[m]["ppl_cut_vs_none"] >= 0.40
    res["target"] = "cut ppl by >= 40% against none"
    return res


def clean_retrieval(paths: dict[str, Path]) -> dict:
    """None vs in-context on 4 held-out articles; REPLUG (2 passages, 2 passes a block) on the first one,
    with its own none row on the same tokens: it costs twice in-context, which costs ~30x the plain LM."""
    one = _pick(paths["test"], CACHE / "test_one.jsonl", 1)
    res = {"none": memo("clean-none", lambda: evaluate("none", paths["test_small"])),
           "in-context": memo("clean-in-context", lambda: evaluate("in-context", paths["test_small"], decontaminate=32)),
           "none_first_article": memo("clean-none-one", lambda: evaluate("none", one)),
           "replug_first_article": memo("clean-replug-one", lambda: evaluate("replug", one, decontaminate=32, docs=2))}
    ic = res["in-context"]
    res["speed"] = {"in_context_tokens_per_s": ic["tokens_per_second"], "lm_only_tokens_per_s":
                    res["none"]["tokens_per_second"], "in_context_retrieval_share": ic["retrieval_share"]}
    return res


def memo(name: str, fn) -> dict:
    """One evaluation's result, cached: the slow stride-16 methods are not rerun when a later one fails."""
    path = CACHE / f"eval-{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    r = fn()
    path.write_text(json.dumps(r, indent=2))
    return r


def clean_knn(paths: dict[str, Path]) -> dict:
    """LM-only and kNN-LM on the same documents in the same run: the speed ratio is measured here too."""
    res = {"none": evaluate("none", paths["test_small"]),
           "knn-lm": evaluate("knn-lm", paths["test_small"], decontaminate=32, validation=[str(paths["valid"])])}
    res["target"] = "knn-lm (λ and T tuned on the 20 validation articles) not worse than none"
    res["pass"] = res["knn-lm"]["ppl"] <= res["none"]["ppl"] * (1 + 1e-6)
    lm_only, knn = res["none"]["tokens_per_second"], res["knn-lm"]["tokens_per_second"]
    res["speed"] = {"lm_only_tokens_per_s": lm_only, "knn_lm_tokens_per_s": knn, "ratio": round(knn / lm_only, 3),
                    "knn_retrieval_share": res["knn-lm"]["retrieval_share"],
                    "target": "kNN-LM tokens/s >= 0.7 x LM-only", "pass": knn >= 0.7 * lm_only}
    return res


def memory(paths: dict[str, Path]) -> dict:
    """Peak RSS of a kNN-LM evaluation in its own process, against model + index + 1 GB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child would report its parent's
    # peak (this process's, after building a 1M-key index) instead of its own
    code = ("import json, sys; from benchmarks.lm import evaluate; from pathlib import Path; "
            "r = evaluate('knn-lm', Path(sys.argv[1])); "
            "hwm = next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')); "
            "print(json.dumps({'peak_rss_bytes': hwm * 1024, **r}))")
    proc = subprocess.run([sys.executable, "-c", code, str(paths["test_small"])], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if proc.returncode != 0:
        sys.exit(f"memory worker failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((CACHE / "knn" / "manifest.json").read_text())
    index_bytes = (CACHE / "knn" / manifest["index"]["path"]).stat().st_size
    model_bytes = sum(p.numel() * p.element_size() for p in _lm().model.parameters())
    limit = model_bytes + index_bytes + 2**30
    return {"peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1), "model_mb": round(model_bytes / 2**20, 1),
            "index_mb": round(index_bytes / 2**20, 1), "limit_mb": round(limit / 2**20, 1),
            "store_keys": manifest["summary"]["keys"], "ratio_to_limit": round(r["peak_rss_bytes"] / limit, 3),
            "target": "peak RSS < model + index + 1 GB", "pass": r["peak_rss_bytes"] < limit}


STAGES = ("leak-in-context", "clean-retrieval", "leak-knn", "clean-knn", "memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="rerun every stage (stores are reused)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    paths = prepare()
    result: dict = {"model": MODEL, "context": CONTEXT}
    stages = args.stages.split(",")
    if {"leak-in-context", "clean-retrieval"} & set(stages):
        result["retrieval_store"] = retrieval_store(paths)
    if {"leak-knn", "clean-knn", "memory"} & set(stages):
        result["knn_store"] = knn_store(paths)
    runs = {"leak-in-context": lambda: leakage(paths, ("in-context",)), "clean-retrieval": lambda: clean_retrieval(paths),
            "leak-knn": lambda: leakage(paths, ("knn-lm",)), "clean-knn": lambda: clean_knn(paths),
            "memory": lambda: memory(paths)}
    for name in stages:
        result[name] = stage(name, args.fresh, runs[name])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
