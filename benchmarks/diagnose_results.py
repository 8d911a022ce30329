"""The diagnose benchmark's results (benchmarks/diagnose.py): every case's verdict recomputed from its stored
per-unit values (``ralm.eval.diagnose.diagnose_units``, the function ``ralm diagnose`` decides with), whether
each expectation of issue 15 held, the article's comparison (a trained retrieval pipeline vs prompt tuning:
trained parameters and loss change side by side), the markdown table and the chart. Pure functions of the
cases: change a case's numbers and its verdict, the expectations and the comparison follow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# name -> (method, setting), in the order the benchmark measures them (most informative first)
CASES = {"retro-clean": ("retro", "clean"), "retro-leakage": ("retro", "leakage"),
         "in-context-leakage": ("in-context", "leakage"), "in-context-clean": ("in-context", "clean"),
         "knn-lm-leakage": ("knn-lm", "leakage"), "knn-lm-clean": ("knn-lm", "clean"),
         "peft-squad": ("peft", "open-book"), "retroprompt": ("retroprompt", "few-shot")}
ABLATIONS = ("none", "shuffled", "random", "random-text", "fixed")
CONTENT = ("shuffled", "random", "random-text", "fixed")
SOFT, DEPENDENT = "acts as a soft prompt", "retrieval-dependent"  # ralm.eval.verdict's words
EXPECT = {"retro-clean": (SOFT, "RETRO-fit, clean: a soft prompt or an adaptation"),
          "retro-leakage": (DEPENDENT, "RETRO-fit, leakage: retrieval-dependent"),
          "in-context-leakage": (DEPENDENT, "in-context RALM, leakage: retrieval-dependent"),
          "knn-lm-leakage": (DEPENDENT, "kNN-LM, leakage: retrieval-dependent")}


def _units(case: dict[str, Any]) -> dict[str, Any]:
    from ralm.eval.diagnose import Units

    def arr(x: Any) -> np.ndarray | None:
        return None if x is None else np.asarray(x, dtype=np.float64)

    return {c: Units(arr(u["values"]), arr(u["weights"])) for c, u in case["units"].items()}


def _beats(case: dict[str, Any], units: dict[str, Any], a: str, b: str) -> bool | None:
    """Whether ``a`` beats ``b`` on the case's paired units (the verdict's test), None where one is missing."""
    from ralm.eval.bootstrap import paired_difference
    from ralm.eval.verdict import better_sign

    if a not in units or b not in units:
        return None
    d = paired_difference(units[a].values, units[b].values, units["real"].weights, case["kind"], **case["stats"])
    return d.excludes_zero() == better_sign(case["metric"])


def case_row(case: dict[str, Any]) -> dict[str, Any]:
    """One row of the table: the verdict and every condition's figure, recomputed from the case's units."""
    from ralm.eval.diagnose import diagnose_units

    row = {k: case[k] for k in ("name", "method", "setting", "status")}
    if case["status"] != "measured":
        return row
    units = _units(case)
    out = diagnose_units(case["metric"], case["kind"], units, case["params"], **case["stats"])
    key = "loss_gain" if case["kind"] == "ppl" else "gain"  # nats per token (ppl), else metric points
    cond = {c: {k: r.get(k) for k in ("estimate", "low", "high", "level")} | {"change": r.get(key)}
            for c, r in out["conditions"].items()}
    row.update(metric=case["metric"], change_unit="nats/token" if case["kind"] == "ppl" else f"{case['metric']} points",
               units=len(units["real"].values), conditions=cond, verdict=out["verdict"], checks=out["checks"],
               params=case["params"].get("real", 0), pt_params=case["params"].get("prompt-tuning"),
               real_beats_prompt_tuning=_beats(case, units, "real", "prompt-tuning"),
               real_beats_base=_beats(case, units, "real", "base"),
               adaptation=any(_beats(case, units, a, "none") for a in CONTENT if a in units),
               artefacts=case.get("artefacts", {}), baseline=case.get("baseline"),
               context_variance=case.get("context_variance"), wall_s=case.get("wall_s"))
    return row


def _fig(r: dict[str, Any]) -> str:
    c = r["conditions"]

    def ch(name: str) -> str:
        return f"{c[name]['change']:+.4g}" if name in c and c[name]["change"] is not None else "–"

    return (f"{r['verdict']}: change over the frozen base ({r['change_unit']}) real {ch('real')}, shuffled "
            f"{ch('shuffled')}, random chunks {ch('random')}, prompt tuning {ch('prompt-tuning')}")


def expectations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each expectation of the issue with ``held``: True / False from the recomputed verdict, None unmeasured."""
    by = {r["name"]: r for r in rows}
    out = []
    for name, (want, text) in EXPECT.items():
        r = by.get(name)
        if r is None or r["status"] != "measured":
            out.append({"case": name, "expectation": text, "held": None,
                        "figure": r["status"] if r else "not in this grid"})
            continue
        fig = _fig(r)
        if name == "retro-clean" and r["verdict"] == SOFT:
            fig += ("; the content ablations keep a gain (an adaptation)" if r["adaptation"] else
                    "; prompt tuning is not beaten (a soft prompt)")
        out.append({"case": name, "expectation": text, "held": r["verdict"] == want, "figure": fig})
    return out


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The article's comparison for every measured case with trained parameters and a prompt-tuning baseline:
    the method's trained parameters and change over the frozen base next to prompt tuning's."""
    out = []
    for r in rows:
        if r["status"] != "measured" or not r["params"] or "prompt-tuning" not in r["conditions"]:
            continue
        m, p = r["conditions"]["real"]["change"], r["conditions"]["prompt-tuning"]["change"]
        share = p / m if m else None
        out.append({"case": r["name"], "unit": r["change_unit"], "method_params": r["params"], "method_change": m,
                    "pt_params": r["pt_params"], "pt_change": p,
                    "method_change_per_param": m / r["params"], "pt_change_per_param": p / r["pt_params"],
                    "params_ratio": r["params"] / r["pt_params"], "pt_share_of_method_change": share,
                    "real_beats_prompt_tuning": r["real_beats_prompt_tuning"],
                    # the article: prompt tuning gets the pipeline's gain (None: the pipeline gains nothing)
                    "article_supported": not r["real_beats_prompt_tuning"] if r["real_beats_base"] else None,
                    "sentence": f"{r['name']}: the trained pipeline's {r['params']:,} parameters change the "
                                f"{r['metric']} by {m:+.4g} {r['change_unit']}, prompt tuning's {r['pt_params']:,} by "
                                f"{p:+.4g} ({r['params'] / r['pt_params']:.0f}x fewer parameters"
                                + (f", {share:.0%} of the pipeline's change" if share is not None else "") + ")"})
    return out


def results(cases: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [case_row(c) for c in cases]
    return {"cases": rows, "expectations": expectations(rows), "comparison": comparison(rows)}


# ---- rendering -----------------------------------------------------------------------------------------
def _est(r: dict[str, Any], c: str) -> str:
    x = r["conditions"].get(c)
    return "–" if x is None else f"{x['estimate']:.4g}"


def markdown(res: dict[str, Any]) -> str:
    lines = ["# Is the retriever just doing prompt tuning? (benchmarks/diagnose.py)", "",
             f"Preset {res['preset']}, grid {res['grid']}; settings: "
             + ", ".join(f"{k}={v}" for k, v in res["settings"].items()), "",
             "## Expectations", ""]
    for e in res["expectations"]:
        word = {True: "held", False: "did not hold", None: "not measured"}[e["held"]]
        lines.append(f"- **{e['expectation']}**: {word} — {e['figure']}")
    lines += ["", "## Every case (real store with its interval; each ablation; frozen base; prompt tuning)", "",
              "| method | setting | metric | units | real [CI] | " + " | ".join(ABLATIONS) + " | frozen base "
              "| prompt tuning | PT params | method params | verdict |", "|" + "---|" * (10 + len(ABLATIONS))]
    for r in res["cases"]:
        if r["status"] != "measured":
            lines.append(f"| {r['method']} | {r['setting']} | " + " | ".join([""] * (7 + len(ABLATIONS)))
                         + f" | {r['status']} |")
            continue
        real = r["conditions"]["real"]
        pt = "–" if r["pt_params"] is None else f"{r['pt_params']:,}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['metric']} | {r['units']} | {real['estimate']:.4g} "
                     f"[{real['low']:.4g}, {real['high']:.4g}] | " + " | ".join(_est(r, a) for a in ABLATIONS)
                     + f" | {_est(r, 'base')} | {_est(r, 'prompt-tuning')} | {pt} | {r['params']:,} | {r['verdict']} |")
    lines += ["", "Change = gain over the frozen base (ppl: nats per token). kNN-LM's `none`: with no neighbour p = "
              "(1 - λ) p_LM, -log(1 - λ) nats per token above the frozen base, so an ablation that keeps any "
              "neighbour beats it; the verdict's no-retrieval reference is the frozen base wherever that beats "
              "`none` (ralm.eval.verdict)."]
    lines += ["", "## The article's comparison: a trained retrieval pipeline vs prompt tuning", ""]
    if res["comparison"]:
        lines += ["| case | unit | pipeline params | pipeline change | prompt-tuning params | prompt-tuning change "
                  "| change per param (pipeline / PT) | real beats PT | supports the article |", "|" + "---|" * 9]
        for c in res["comparison"]:
            lines.append(f"| {c['case']} | {c['unit']} | {c['method_params']:,} | {c['method_change']:+.4g} | "
                         f"{c['pt_params']:,} | {c['pt_change']:+.4g} | {c['method_change_per_param']:.3g} / "
                         f"{c['pt_change_per_param']:.3g} | {c['real_beats_prompt_tuning']} | "
                         f"{ {True: 'yes', False: 'no', None: 'no gain to explain'}[c['article_supported']]} |")
        lines += [""] + [f"- {c['sentence']}" for c in res["comparison"]]
    else:
        lines.append("not measured (no case with trained parameters and a baseline)")
    lines += ["", "## Verdict checks", ""]
    for r in res["cases"]:
        if r["status"] == "measured":
            art = "; ".join(f"{k}: {v['source']}" for k, v in r["artefacts"].items())
            lines += [f"**{r['name']}** ({art}; {r['wall_s']} s)", ""] + [f"- {c}" for c in r["checks"]] + [""]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    """One panel per measured case: each condition's metric with its interval (real green, prompt tuning purple)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["cases"] if r["status"] == "measured"]
    n = max(1, len(rows))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.6 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        names = [c for c in ("base", *ABLATIONS, "real", "prompt-tuning") if c in r["conditions"]]
        cond = r["conditions"]
        est = [cond[c]["estimate"] for c in names]
        err = [[e - cond[c]["low"] for c, e in zip(names, est, strict=True)],
               [cond[c]["high"] - e for c, e in zip(names, est, strict=True)]]
        colours = ["tab:green" if c == "real" else "tab:purple" if c == "prompt-tuning" else "tab:grey"
                   if c in ("base", "none") else "tab:orange" for c in names]
        ax.bar(range(len(names)), est, yerr=err, capsize=3, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        lo, hi = min(cond[c]["low"] for c in names), max(cond[c]["high"] for c in names)
        pad = 0.1 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(r["metric"], fontsize=8)
        ax.set_title(f"{r['name']}: {r['verdict']}", fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
