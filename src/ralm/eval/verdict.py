"""``ralm diagnose``'s verdict: does the method use what it retrieves, or does it act as a soft prompt?

"A beats B" means the paired-bootstrap interval of metric(A) - metric(B) on the same units lies entirely on the
better side of 0 (below for ppl / bpb / loss, above for EM, F1, ROUGE, accuracy). The rule (``RULE``):

- **retrieval-dependent**: the real store beats the shuffled, random-chunk and fixed-chunk ablations, and beats
  the prompt-tuning baseline;
- **acts as a soft prompt**: otherwise, if a content ablation (shuffled, random chunks, random text, fixed
  chunk) still beats no retrieval (the gain survives without the right content), or the real store beats no
  retrieval but not the prompt-tuning baseline (a learnt static prefix gets the gain);
- **no gain**: otherwise.

"No retrieval" is the method's own ``none`` ablation, unless the frozen base (``base``, where measured) beats
it: then the base is the reference. kNN-LM with no neighbour scores (1 − λ)·p_LM, −log(1 − λ) nats per token
worse than its frozen LM, so any ablation that keeps a neighbour would "beat no retrieval" by that penalty
alone; a trained method's ``none`` (its trained layers, no retrieved content) is not beaten by its zero-shot
base and stays the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ralm.errors import RalmError
from ralm.eval.bootstrap import Interval, paired_difference

LOWER_IS_BETTER = ("ppl", "bpb", "loss", "nll")
HIGHER_IS_BETTER = ("em", "f1", "rouge1", "rouge2", "rougeL", "acc", "accuracy")
REQUIRED = ("shuffled", "random", "fixed")  # the real store must beat each of these
CONTENT = ("shuffled", "random", "random-text", "fixed")  # ablations that keep the context but not its content
DEPENDENT, SOFT_PROMPT, NO_GAIN = "retrieval-dependent", "acts as a soft prompt", "no gain"
RULE = ("retrieval-dependent iff real beats shuffled, random and fixed and beats prompt tuning; else acts as a "
        "soft prompt iff an ablation still beats no retrieval, or real beats no retrieval but not prompt tuning; "
        "else no gain (A beats B: the paired bootstrap interval of A - B is on the better side of 0; no retrieval: "
        "the none ablation, or the frozen base where it beats none)")


def better_sign(metric: str) -> int:
    """+1 where a larger value of ``metric`` is better, -1 where a smaller one is."""
    if metric in LOWER_IS_BETTER:
        return -1
    if metric in HIGHER_IS_BETTER:
        return 1
    raise RalmError(f"metric {metric!r}: unknown direction (lower is better: {', '.join(LOWER_IS_BETTER)}; "
                    f"higher: {', '.join(HIGHER_IS_BETTER)})")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    rule: str
    lines: tuple[str, ...]  # each check with the numbers that decided it

    def text(self) -> str:
        return "\n".join((f"verdict: {self.verdict}", f"rule: {self.rule}", *self.lines))


def _beats(diff: Interval, sign: int) -> bool:
    return diff.excludes_zero() == sign


def _line(a: str, b: str, diff: Interval, sign: int) -> str:
    pct = round(100 * diff.level)
    word = "beats" if _beats(diff, sign) else "does not beat"
    return f"{a} {word} {b}: {a} - {b} = {diff.estimate:.4g} [{diff.low:.4g}, {diff.high:.4g}] ({pct}% CI)"


def decide(metric: str, vs: Mapping[str, Interval], none_vs: Mapping[str, Interval],
           reference: str = "none") -> Verdict:
    """The verdict from paired-difference intervals: ``vs[name]`` = real - name for every ablation in
    ``REQUIRED``, and ``"prompt-tuning"`` (the baseline; absent: it cannot be beaten, so never
    retrieval-dependent); ``none_vs[name]`` = name - the no-retrieval ``reference`` (``none``, or ``base``: the
    module docstring) for ``"real"`` and any content ablations."""
    sign = better_sign(metric)
    if missing := [a for a in REQUIRED if a not in vs]:
        raise RalmError(f"verdict: no paired interval of real against {', '.join(missing)}")
    if "real" not in none_vs:
        raise RalmError("verdict: no paired interval of real against no retrieval")
    direction = "lower" if sign < 0 else "higher"
    lines = [f"{metric}: {direction} is better"]
    lines += [_line("real", a, vs[a], sign) for a in (*REQUIRED, "prompt-tuning") if a in vs]
    if "prompt-tuning" not in vs:
        lines.append("real vs prompt-tuning: no baseline run, so real cannot be shown to beat it")
    if reference != "none":
        lines.append(f"no retrieval = {reference}: it beats the method's own none ablation")
    lines += [_line(a, reference, none_vs[a], sign) for a in ("real", *CONTENT) if a in none_vs]
    beats_pt = "prompt-tuning" in vs and _beats(vs["prompt-tuning"], sign)
    gain = _beats(none_vs["real"], sign)
    if all(_beats(vs[a], sign) for a in REQUIRED) and beats_pt:
        verdict = DEPENDENT
    elif any(_beats(none_vs[a], sign) for a in CONTENT if a in none_vs) or (gain and not beats_pt):
        verdict = SOFT_PROMPT
    else:
        verdict = NO_GAIN
    return Verdict(verdict, RULE, tuple(lines))


def verdict_from_units(metric: str, units: Mapping[str, Sequence[float] | np.ndarray],
                       weights: Sequence[float] | np.ndarray | None = None, kind: str = "mean",
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> Verdict:
    """The verdict from per-unit values of every condition (``"real"``, ``"none"``, the ablations, optionally
    ``"prompt-tuning"``, ``"base"``: the frozen base, the reference where it beats ``none``) on the same units:
    the paired intervals by ``paired_difference`` (``kind`` and ``weights`` as there: ``"ppl"`` with
    per-document NLL sums and tokens, ``"mean"`` with per-example scores)."""
    for need in ("real", "none"):
        if need not in units:
            raise RalmError(f"verdict: no per-unit values for {need!r}")

    def diff(a: str, b: str) -> Interval:
        return paired_difference(units[a], units[b], weights, kind, n_boot, seed, level)

    vs = {a: diff("real", a) for a in (*REQUIRED, "prompt-tuning") if a in units}
    sign = better_sign(metric)
    reference = "base" if "base" in units and _beats(diff("base", "none"), sign) else "none"
    none_vs = {a: diff(a, reference) for a in ("real", *CONTENT) if a in units}
    return decide(metric, vs, none_vs, reference)
