"""``ralm diagnose``'s outputs: ``diagnose.json`` (everything), ``diagnose.md`` (the tables, the verdict and its
rule) and ``diagnose.png`` (every condition's metric with its confidence interval, the prompt-tuning baseline
and no retrieval as reference lines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ralm.utils.atomic import atomic_path, write_json

ORDER = ("base", "none", "real", "shuffled", "random", "random-text", "fixed", "prompt-tuning")
LABELS = {"base": "frozen base", "none": "no retrieval", "real": "real store", "prompt-tuning": "prompt tuning"}


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def conditions_in_order(result: dict[str, Any]) -> list[str]:
    cond = result["conditions"]
    return [c for c in ORDER if c in cond] + [c for c in cond if c not in ORDER]


def diagnose_markdown(result: dict[str, Any]) -> str:
    metric, cond = result["metric"], result["conditions"]
    pct = round(100 * next(iter(cond.values()))["level"])
    lines = [f"# ralm diagnose: {result['verdict']}", "",
             f"Subject: {', '.join(f'{k} {v}' for k, v in result['subject'].items() if v is not None)}", "",
             f"| condition | {metric} | {pct}% CI | gain over base | trained parameters | gain per parameter |",
             "|---|---:|---|---:|---:|---:|"]
    for c in conditions_in_order(result):
        r = cond[c]
        lines.append(f"| {LABELS.get(c, c)} | {r['estimate']:.4g} | [{r['low']:.4g}, {r['high']:.4g}] | "
                     f"{_num(r.get('gain'))} | {_num(r.get('trained_parameters'))} | "
                     f"{_num(r.get('gain_per_parameter'))} |")
    lines += ["", "## Verdict", "", f"**{result['verdict']}**", "", f"Rule: {result['rule']}", ""]
    lines += [f"- {c}" for c in result["checks"]]
    lines += ["", "## Context variance of the real run", "", "| measure | value |", "|---|---:|"]
    lines += [f"| {k} | {_num(v)} |" for k, v in result["context_variance"].items()]
    lines += ["", result.get("perturbation", "")]
    if "baseline" in result:
        b = result["baseline"]
        sweep = ", ".join(f"lr {lr}: {v:.4g}" for lr, v in b["sweep"].items())
        lines += ["", "## Prompt-tuning baseline", "",
                  f"{b['n_virtual']} virtual tokens, {b['steps']} steps, {b['trainable']:,} trained parameters; "
                  f"learning rate {b['lr']:g} chosen on validation ({b['validation']}): {sweep}"]
    else:
        lines += ["", "Prompt-tuning baseline: skipped (--no-baseline)."]
    return "\n".join(lines) + "\n"


def plot_diagnose(result: dict[str, Any], path: Path) -> None:
    """One bar per condition with its interval as error bars; prompt tuning and no retrieval as dashed lines."""
    import matplotlib  # only for the chart

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    cond = result["conditions"]
    names = conditions_in_order(result)
    est = [cond[c]["estimate"] for c in names]
    err = [[e - cond[c]["low"] for c, e in zip(names, est, strict=True)],
           [cond[c]["high"] - e for c, e in zip(names, est, strict=True)]]
    colours = ["tab:green" if c == "real" else "tab:purple" if c == "prompt-tuning" else "tab:grey"
               if c in ("base", "none") else "tab:orange" for c in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 4))
    ax.bar(range(len(names)), est, yerr=err, capsize=4, color=colours)
    for ref, style in (("prompt-tuning", "--"), ("none", ":")):
        if ref in cond:
            ax.axhline(cond[ref]["estimate"], color="black", linestyle=style, linewidth=1,
                       label=f"{LABELS[ref]} {cond[ref]['estimate']:.4g}")
    ax.set_xticks(range(len(names)), [LABELS.get(c, c) for c in names], rotation=30, ha="right")
    lo = min(cond[c]["low"] for c in names)
    hi = max(cond[c]["high"] for c in names)
    pad = 0.1 * (hi - lo or abs(hi) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)  # the differences, not the distance from 0, are what the chart shows
    ax.set_ylabel(result["metric"])
    ax.set_title(f"ralm diagnose: {result['verdict']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diagnose.json", result)
    with atomic_path(out / "diagnose.md") as tmp:
        tmp.write_text(diagnose_markdown(result), encoding="utf-8")
    plot_diagnose(result, out / "diagnose.png")
