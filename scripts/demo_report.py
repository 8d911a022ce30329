"""The demo's report: the closing table (one row per measured number, each with its one-line meaning), written
as markdown and JSON, and a PNG chart. Every figure and every verdict comes from the ``rows`` measured in
the run; nothing here holds a result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    section: str  # "qa" or "lm"
    setting: str
    metric: str  # "F1", "recall@1", "perplexity"
    value: float
    meaning: str
    n: int | None = None  # questions (qa) or scored tokens (lm)


def change(value: float, base: float, lower_is_better: bool, unit: str = "%") -> str:
    """'helps (-12.3%)' style verdict of ``value`` against ``base``; under 1% (or 1 point) is no measurable change."""
    if unit == "%":
        delta = 100 * (value - base) / base
        text = f"{delta:+.1f}%"
    else:
        delta = value - base
        text = f"{delta:+.1f} {unit}"
    if abs(delta) < 1:  # the demo's samples are small: smaller changes are within noise
        return f"no measurable change ({text})"
    better = delta < 0 if lower_is_better else delta > 0
    return f"{'helps' if better else 'hurts'} ({text})"


def table(rows: list[Row]) -> str:
    """The closing table as markdown."""
    lines = ["| data | setting | metric | value | what it means |", "|---|---|---|---:|---|"]
    for r in rows:
        value = f"{100 * r.value:.0f}%" if r.metric.startswith("recall") else f"{r.value:.2f}"
        lines.append(f"| {_data(r)} | {r.setting} | {r.metric} | {value} | {r.meaning} |")
    return "\n".join(lines)


Panel = tuple[str, str, list[tuple[str, list[tuple[str, float]]]]]  # title, y label, [(group, [(bar, value)])]


def _data(r: Row) -> str:
    name, unit = {"qa": ("SQuAD dev", "questions"), "lm": ("BBC News", "tokens")}.get(r.section, (r.section, ""))
    return name if r.n is None else f"{name}, {r.n:,} {unit}"


def pct(value: float, base: float) -> str:
    """'-93.1%': the relative change of ``value`` against ``base``."""
    return f"{100 * (value - base) / base:+.1f}%"


def write_all(out: Path, rows: list[Row], summary: list[str], panels: list[Panel], details: dict) -> dict[str, Path]:
    """results.json, results.md and results.png in ``out``; returns their paths."""
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    data = {"rows": [asdict(r) for r in rows], "summary": summary, **details}
    _atomic_write(paths["json"], json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    md = ["# ralm demo: what retrieval does", "", table(rows), "", *[f"- {s}" for s in summary], "",
          f"![chart]({paths['png'].name})", ""]
    _atomic_write(paths["md"], "\n".join(md))
    chart(panels, paths["png"])
    return paths


COLOURS = {"closed book": "#4c72b0", "no retrieval": "#4c72b0", "open book": "#dd8452", "clean": "#dd8452",
           "leakage": "#bbbbbb"}  # grey: the evaluated text was in the store, not a result


def chart(panels: list[Panel], path: Path) -> None:
    """One panel of grouped bars per section, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    widths = [sum(len(bars) + 1 for _, bars in groups) for _, _, groups in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.4), gridspec_kw={"width_ratios": widths})
    for ax, (title, ylabel, groups) in zip(axes, panels, strict=True):
        x, ticks, seen = 0, [], set()
        for group, bars in groups:
            ticks.append((x + (len(bars) - 1) / 2, group))
            for name, value in bars:
                b = ax.bar(x, value, color=COLOURS.get(name, "#55a868"), label=None if name in seen else name)
                ax.bar_label(b, fmt="%.1f", fontsize=8)
                seen.add(name)
                x += 1
            x += 1
        ax.set_xticks([t for t, _ in ticks], [g for _, g in ticks], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def _atomic_write(path: Path, text: str) -> None:
    """Whole file or nothing: a killed run never leaves a half-written result."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
