"""``ralm scale``: the LM metric against datastore size, on nested random subsets of the store.

Every point evaluates the same held-out documents; a subset is searched in place (FAISS applies the row
subset inside the search), so nothing is re-encoded. The plain LM is one flat reference line.
Outputs: ``scale.json`` (every point), ``scale.md`` (a table) and ``scale.png`` (metric vs store tokens, log x).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

import ralm.methods  # noqa: F401  registers the built-in methods
from ralm.core.registry import check_options, get_method, method_names
from ralm.datastore import layout
from ralm.datastore.knn_store import read_knn_manifest
from ralm.datastore.store import read_manifest
from ralm.datastore.subset import nested_rows
from ralm.errors import RalmError
from ralm.eval.runner import EvalLMConfig, run_eval_lm
from ralm.lm.models import load
from ralm.utils.atomic import atomic_path, write_json

# the flag naming the store of each kind a method can be scaled on
STORE_FLAGS = {"retrieval": "datastore", "knn": "knn_store"}


@dataclass
class ScaleConfig:
    eval: EvalLMConfig  # model, data and windows; method, store, subset and method options set per point
    out: str = field(metadata={"help": "folder for scale.json, scale.md and scale.png", "short": "-o"})
    methods: tuple[str, ...] = field(default=(), metadata={"help": "comma-separated methods that read a store "
                                                                   "(`ralm methods`; default: the first registered "
                                                                   "retrieval method, in-context)"})
    datastore: str | None = field(default=None, metadata={"help": "retrieval store (methods of store kind "
                                                                  "retrieval: in-context, replug, retro)"})
    knn_store: str | None = field(default=None, metadata={"help": "kNN-LM store (methods of store kind knn)"})
    # every registered method's options (as EvalLMConfig.options); those of any scaled method may be set
    options: dict[str, Any] = field(default_factory=dict)
    fractions: tuple[float, ...] = field(default=(0.01, 0.1, 0.3, 1.0), metadata={"help": "comma-separated nested "
                                                                                          "subset sizes in (0, 1]"})
    seed: int = field(default=0, metadata={"help": "seed of the nested subsets"})
    metric: str = field(default="ppl", metadata={"help": "plotted metric: ppl or bpb"})
    points: dict[str, EvalLMConfig] = field(default_factory=dict, init=False, repr=False)  # per method, resolved

    def __post_init__(self) -> None:
        scalable = [n for n in method_names() if get_method(n).store in STORE_FLAGS]
        self.methods = tuple(self.methods) or method_names(store="retrieval")[:1]
        for m in self.methods:
            if m not in scalable:
                raise RalmError(f"--methods {m!r}: expected one of {', '.join(scalable)}")
        if not self.methods:
            raise RalmError("--methods: give at least one method")
        self.options = check_options(self.options, self.methods)  # the union: every scaled method's own
        self.points = {m: self._point(m) for m in self.methods}  # every method's settings checked before loading
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad or not self.fractions:
            raise RalmError(f"--fractions {bad or 'empty'}: every fraction must be in (0, 1]")
        if self.metric not in ("ppl", "bpb"):
            raise RalmError(f"--metric {self.metric!r}: expected ppl or bpb")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise RalmError(f"--out {out}: exists and is not a directory")

    def _point(self, name: str) -> EvalLMConfig:
        """``eval`` for method ``name`` on its store (by store kind), the whole store, with its own options alone
        (the other methods' at their defaults); resolved by the method."""
        method = get_method(name)
        flag = STORE_FLAGS[method.store]
        store = getattr(self, flag)
        own = {method.options: self.options[method.options]} if method.options else {}
        try:
            return dataclasses.replace(self.eval, method=name, datastore=store, subset=None, subset_seed=self.seed,
                                       options=own)
        except RalmError:
            if store is None:  # the flag this command takes for that kind of store
                raise RalmError(f"--{flag.replace('_', '-')} is required for {name}") from None
            raise


def store_tokens(kind: str, path: str, rows: np.ndarray | None) -> int:
    """Tokens held by the (subset of the) store: chunk tokens, or one per key for a kNN-LM store."""
    if kind == "knn":
        return _rows_in(kind, path) if rows is None else len(rows)

    manifest = read_manifest(Path(path))
    lengths = np.concatenate([pc.list_value_length(pq.read_table(layout.chunks_path(Path(path), p["part"]),
                                                                  columns=["tokens"])["tokens"]).to_numpy()
                              for p in manifest["parts"]])
    return int(lengths.sum() if rows is None else lengths[rows].sum())


def run_scale(cfg: ScaleConfig, progress: bool = True, log=None) -> dict:
    """Evaluate every (method, fraction) point plus the plain LM; write JSON, markdown and PNG."""
    log = log or (lambda m: print(m, file=sys.stderr))
    loaded = load(cfg.eval.model)
    plain = method_names(store="none")[0]  # the reference line
    base = dataclasses.replace(cfg.eval, method=plain, datastore=None, subset=None, options={})
    none = run_eval_lm(base, progress=progress, loaded=loaded)
    log(f"{plain}: ppl {none['ppl']:.3f} bpb {none['bpb']:.4f}")
    points = []
    for method in cfg.methods:
        whole = cfg.points[method]
        kind, store = get_method(method).store, whole.datastore
        n_rows = _rows_in(kind, store)
        for frac in sorted(cfg.fractions):
            rows = None if frac == 1.0 else nested_rows(n_rows, frac, cfg.seed)
            r = run_eval_lm(dataclasses.replace(whole, subset=frac), progress=progress, loaded=loaded)
            point = {"method": method, "fraction": frac, "store_tokens": store_tokens(kind, store, rows),
                     **{k: r[k] for k in ("ppl", "bpb", "tokens", "bytes", "seconds", "tokens_per_second")}}
            point.update({k: r[k] for k in get_method(method).report if k in r})
            points.append(point)
            log(f"{method} @ {frac:g} ({point['store_tokens']:,} store tokens): ppl {r['ppl']:.3f} bpb {r['bpb']:.4f}")
    result = {"model": cfg.eval.model, "data": cfg.eval.data, "metric": cfg.metric, "seed": cfg.seed,
              "none": {k: none[k] for k in ("ppl", "bpb", "tokens", "bytes")}, "points": points}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scale.json", result)
    with atomic_path(out / "scale.md") as tmp:
        tmp.write_text(scale_markdown(result), encoding="utf-8")
    plot_scale(result, out / "scale.png")
    return result


def _rows_in(kind: str, path: str) -> int:
    if kind == "knn":
        return int(read_knn_manifest(Path(path))["summary"]["keys"])

    return int(read_manifest(Path(path))["counts"]["chunks"])


def scale_markdown(result: dict[str, Any]) -> str:
    lines = ["| method | fraction | store tokens | ppl | bpb |", "|---|---:|---:|---:|---:|",
             f"| none | – | 0 | {result['none']['ppl']:.3f} | {result['none']['bpb']:.4f} |"]
    for p in result["points"]:
        lines.append(f"| {p['method']} | {p['fraction']:g} | {p['store_tokens']:,} | {p['ppl']:.3f} | {p['bpb']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_scale(result: dict[str, Any], path: Path) -> None:
    """Metric against store tokens (log x), one line per method, the plain LM as a dashed reference."""
    import matplotlib  # only for the chart

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(p["method"] for p in result["points"]):
        pts = sorted((p["store_tokens"], p[metric]) for p in result["points"] if p["method"] == method)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.axhline(result["none"][metric], color="grey", linestyle="--", label="none (no retrieval)")
    ax.set_xscale("log")
    ax.set_xlabel("datastore tokens")
    ax.set_ylabel("perplexity" if metric == "ppl" else "bits per byte")
    ax.set_title(f"{result['model']}: {metric} vs datastore size")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

