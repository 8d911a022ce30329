"""The PEFT benchmark's results (benchmarks/peftbench.py): its rows turned into the paper's four claims, the
LoRA-vs-full speed figures, the markdown table and the chart. Pure functions of the measured rows, so the
numbers quoted in the README are computed, never hand-written; the model names are arguments (the tests give
a tiny model the role of SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METHODS = ("lora", "adapter", "prompt", "ptuning", "full")
# the "GPT gains more from PEFT" mean: full fine-tuning is the reference, not PEFT
PEFT_METHODS = tuple(m for m in METHODS if m != "full")
ARCHS = ("gpt", "retro")
SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
METRIC = {"squad": "f1", "aclsum": "rougeL", "truthfulqa-mc": "acc"}  # the headline metric of each task

def find(rows: list[dict], model: str, task: str, arch: str, method: str) -> dict | None:
    return next((r for r in rows if (r["model"], r["task"], r["arch"], r["method"]) == (model, task, arch, method)),
                None)


def gain(r: dict | None) -> float | None:
    if r is None or r["zero_shot"] is None or r["tuned_score"] is None:
        return None
    return round(r["tuned_score"] - r["zero_shot"], 4)


def speed(rows: list[dict], pair: dict | None = None, model: str = SMOL) -> dict[str, Any]:
    """gpt LoRA vs full fine-tuning on SQuAD (same batches): from the two grid rows (one run each) and, where
    measured, from the alternating pairs (``speed_pair``, the figure to quote). Input positions per train
    second (prompt with its passages + target, what the model computes), and the target tokens the loss
    averages over; peak RSS of each run's process."""
    out: dict[str, Any] = {}
    lora, full = find(rows, model, "squad", "gpt", "lora"), find(rows, model, "squad", "gpt", "full")
    if lora is not None and full is not None:
        def pps(r: dict) -> float | None:
            return r.get("positions_per_second")

        out["rows"] = {"lora_positions_per_second": pps(lora), "full_positions_per_second": pps(full),
                       "lora_target_tokens_per_second": lora["tokens_per_second"],
                       "full_target_tokens_per_second": full["tokens_per_second"],
                       "ratio_lora_over_full": round(pps(lora) / pps(full), 3) if pps(lora) and pps(full) else None,
                       "lora_peak_rss_mb": lora["peak_rss_mb"], "full_peak_rss_mb": full["peak_rss_mb"]}
    if pair is not None:
        by = {m: [r for r in pair["runs"] if r["method"] == m] for m in ("lora", "full")}
        out["pairs"] = {"ratio_lora_over_full": pair["ratio_lora_over_full_median"],
                        "ratio_range": [pair["ratio_min"], pair["ratio_max"]], "pairs": len(by["lora"]),
                        "steps": pair["steps"],
                        **{f"{m}_positions_per_second": [r["positions_per_second"] for r in v] for m, v in by.items()},
                        **{f"{m}_peak_rss_mb": max(r["peak_rss_mb"] for r in v) for m, v in by.items()}}
    return out or {"status": "not measured"}


def claims(rows: list[dict], small: str = SMOL, big: str = GEMMA) -> dict[str, dict[str, Any]]:
    """The paper's four claims, each with the figure measured here (``None``/"not measured" where a row is
    missing). ``supported`` is True/False from the numbers, None when not measured."""
    out: dict[str, dict[str, Any]] = {}
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != small, m))
    model = models[0] if models else small
    g0 = next((r for r in rows if (r["model"], r["task"], r["arch"]) == (model, "squad", "gpt")), None)
    r0 = next((r for r in rows if (r["model"], r["task"], r["arch"]) == (model, "squad", "retro")), None)
    if g0 and r0:
        d = round(r0["zero_shot"] - g0["zero_shot"], 4)
        out["retro_beats_gpt_zero_shot"] = {"figure": f"{model} SQuAD zero-shot F1: retro {r0['zero_shot']} vs gpt "
                                            f"{g0['zero_shot']} (retro - gpt = {d:+g})", "value": d,
                                            "supported": d > 0}
    else:
        out["retro_beats_gpt_zero_shot"] = _missing()
    pairs = [(gain(find(rows, model, "squad", "gpt", m)), gain(find(rows, model, "squad", "retro", m)), m)
             for m in PEFT_METHODS]
    pairs = [(a, b, m) for a, b, m in pairs if a is not None and b is not None]
    if pairs:
        ga, gb = sum(a for a, _, _ in pairs) / len(pairs), sum(b for _, b, _ in pairs) / len(pairs)
        out["gpt_gains_more_from_peft"] = {
            "figure": f"{model} SQuAD mean F1 gain over {', '.join(m for *_, m in pairs)}: gpt {ga:+.2f} vs retro "
                      f"{gb:+.2f}", "value": round(ga - gb, 4), "supported": ga > gb,
            "per_method": {m: {"gpt": a, "retro": b} for a, b, m in pairs}}
    else:
        out["gpt_gains_more_from_peft"] = _missing()
    per_arch = {}
    for arch in ARCHS:
        p = find(rows, model, "squad", arch, "ptuning")
        others = [find(rows, model, "squad", arch, m) for m in ("lora", "adapter")]
        others = [o["tuned_score"] for o in others if o is not None]
        if p is not None and others:
            per_arch[arch] = round(p["tuned_score"] - sum(others) / len(others), 4)
    if per_arch:
        out["ptuning_trails_adapters_and_lora"] = {
            "figure": f"{model} SQuAD tuned F1, P-tuning - mean(LoRA, adapter): "
                      + ", ".join(f"{a} {v:+g}" for a, v in per_arch.items())
                      + "; 'most at small sizes': not measured (P-tuning runs on one size only)",
            "value": per_arch, "supported": all(v < 0 for v in per_arch.values())}
    else:
        out["ptuning_trails_adapters_and_lora"] = _missing()
    sizes = {}
    for arch in ARCHS:
        s, b = gain(find(rows, small, "squad", arch, "lora")), gain(find(rows, big, "squad", arch, "lora"))
        if s is not None and b is not None:
            sizes[arch] = {small: s, big: b}
    if sizes:
        out["gains_saturate_with_size"] = {
            "figure": "SQuAD LoRA F1 gain by size: " + "; ".join(f"{a} {v[small]:+g} ({small}) vs {v[big]:+g} ({big})"
                                                                for a, v in sizes.items()),
            "value": sizes, "supported": all(v[big] <= v[small] for v in sizes.values())}
    else:
        out["gains_saturate_with_size"] = _missing()
    return out


def _missing() -> dict[str, Any]:
    return {"figure": "not measured", "value": None, "supported": None}


CLAIM_TEXT = {"retro_beats_gpt_zero_shot": "RETRO beats GPT zero-shot",
              "gpt_gains_more_from_peft": "GPT gains more from PEFT",
              "ptuning_trails_adapters_and_lora": "P-tuning trails adapters and LoRA, most at small sizes",
              "gains_saturate_with_size": "Gains saturate with size"}


def markdown(res: dict[str, Any]) -> str:
    lines = ["# PEFT on GPT vs RETRO-fit (benchmarks/peftbench.py)", "",
             "Settings (every row): " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()), "",
             "| model | task | arch | method | metric | zero-shot | tuned | gain | trained params | % of model "
             "| train positions/s | train wall s | peak RSS MB |", "|" + "---|" * 13]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['task']} | {r['arch']} | {r['method']} | {r['metric']} | {r['zero_shot']} "
                     f"| {r['tuned_score']} | {gain(r)} | {r['trainable']:,} | {r['percent']:.3f} | "
                     f"{r.get('positions_per_second')} | {r['train_wall_s']} | {r['peak_rss_mb']} |")
    sp = res["speed"]
    lines += ["", "## LoRA vs full fine-tuning (gpt, SQuAD, same batches; input positions per train second)", ""]
    if "pairs" in sp:
        p = sp["pairs"]
        lines.append(f"{p['pairs']} alternating pairs of {p['steps']} steps: LoRA / full = {p['ratio_lora_over_full']} "
                     f"(median; range {p['ratio_range'][0]}-{p['ratio_range'][1]}); LoRA {p['lora_positions_per_second']}"
                     f" vs full {p['full_positions_per_second']} positions/s; peak RSS LoRA {p['lora_peak_rss_mb']} MB, "
                     f"full {p['full_peak_rss_mb']} MB.")
    if "rows" in sp:
        r = sp["rows"]
        lines.append(f"The two grid rows (one run each): LoRA {r['lora_positions_per_second']} vs full "
                     f"{r['full_positions_per_second']} positions/s (ratio {r['ratio_lora_over_full']}); peak RSS LoRA "
                     f"{r['lora_peak_rss_mb']} MB, full {r['full_peak_rss_mb']} MB.")
    if "status" in sp:
        lines.append("not measured")
    lines += ["", "## The paper's claims, measured here", ""]
    for k, c in res["claims"].items():
        verdict = {True: "supports", False: "contradicts", None: "not measured"}[c["supported"]]
        lines.append(f"- **{CLAIM_TEXT[k]}**: {verdict} — {c['figure']}")
    if res["retrofit"]:
        lines += ["", "RETRO-fit: " + "; ".join(f"{m}: {v['source']} ({v['checkpoint']})"
                                                for m, v in res["retrofit"].items())]
    if res["skipped"]:
        lines += ["", "Not run: " + "; ".join(res["skipped"])]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [f"{Path(r['model']).name}\n{r['task']}\n{r['arch']} {r['method']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["zero_shot"] or 0 for r in rows], 0.4, label="zero-shot")
    ax.bar([i + 0.2 for i in x], [r["tuned_score"] or 0 for r in rows], 0.4, label="tuned")
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set_ylabel("task metric (F1 / ROUGE-L / acc)")
    ax.set_title("Tuned vs zero-shot per arch x method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(res: dict[str, Any], folder: Path, md=None, png=None) -> None:
    """``folder``/results.{json,md,png}; ``md`` / ``png``: another benchmark's renderers (default: this one's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(res, indent=2))
    (folder / "results.md").write_text((md or markdown)(res))
    (png or chart)(res, folder / "results.png")


