"""``ralm retroprompt memo``: the memorization score of every few-shot training example of a finished
RetroPrompt run (issue 14), by self-influence over the run's trained parameters
(``methods/retroprompt/memorization.py``: LiSSA or an exact solve, Zheng & Jiang 2022).

What is differentiated. The per-example loss is the cross-entropy of p_model on the example's gold class, as
the run's training forward computes it: in eval mode (no dropout, so the loss and its Hessian are one
function of the parameters), with the neural demonstrations the run's final store gives it (its own row left
out, as in training; held fixed, they carry no gradient in training either). The kNN weight
1 + β·(−log p_kNN(y)) of the training loss is left out: it is a function of the store, i.e. of the very
kNN confidence the atypical split is made by, and at the reference's β = 1e-4 it changes the loss by ~1e-4;
scoring plain CE keeps RetroPrompt's and prompt fine-tuning's scores on the same loss. The trained parameters
are scored (``--params all``), or for an image run the head's last layer alone (``--params head``: the
classifier and the demonstration gate, in which the loss is convex, so the exact solve is small and
LiSSA can be checked against it). A parameter the loss does not reach (the gate of a run without
demonstrations) is left out.

Atypical examples: the lowest ``--share`` by p_kNN(gold) under the run's final store, each example's own
row left out (whatever the run's ``--leave-self-out``: kept in, it is its own nearest neighbour).

Writes ``RUN/memorization.json``: the score of each example by id, p_kNN(gold) by id, ``memo_summary`` of
all and of the atypical share, the approximation used, the parameters scored and the seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ralm.errors import RalmError
from ralm.methods.retroprompt.backbone import label_indices, trained
from ralm.methods.retroprompt.demos import neural_demos
from ralm.methods.retroprompt.knn import store_knn_probs
from ralm.methods.retroprompt.memorization import MemoConfig, atypical, memo_summary, self_influence
from ralm.tuning.retroprompt import LoadedRun, load_run, read_run
from ralm.tuning.retroprompt_config import IMAGE_SETS, MEMO
from ralm.utils.atomic import write_json

FORMAT = "ralm-retroprompt-memo"
METHODS = ("lissa", "exact")
PARAMS = ("all", "head")
HEAD = ("classifier.weight", "classifier.bias", "gate")  # an image run's last layer (VisionHead)
LOSS = ("cross-entropy of p_model (eval mode, with the run's neural demonstrations from its final store, self "
        "left out); the kNN weight 1 + beta*(-log p_kNN) is not included")


@dataclass(kw_only=True)
class MemoRunConfig:
    run: str = field(metadata={"help": "a finished `ralm retroprompt train` folder"})
    method: str = field(default="lissa", metadata={
        "help": "lissa (H^-1 v by the LiSSA recursion, the reference's; any size) or exact (a dense solve of the "
                "full Hessian: at most 4096 parameters, e.g. --params head)"})
    params: str = field(default="all", metadata={
        "help": "what is scored: all = every parameter the run trained (images: the whole head; text: the PEFT "
                "parameters, or with --peft full every LM weight, which only LiSSA can do and which holds 3 "
                "copies of the weights per --lissa-group example); head = an image run's last layer (classifier "
                "and demonstration gate: convex, small enough for --method exact)"})
    share: float = field(default=0.1, metadata={
        "help": "the atypical share: the training examples of lowest p_kNN(gold) under the run's final store "
                "(self left out), summarised apart"})
    lissa: MemoConfig = field(default_factory=MemoConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RalmError(f"--method {self.method!r}: choose {' or '.join(METHODS)}")
        if self.params not in PARAMS:
            raise RalmError(f"--params {self.params!r}: choose {' or '.join(PARAMS)}")
        if not 0 < self.share <= 1:
            raise RalmError(f"--share {self.share}: must be in (0, 1]")


def scored_parameters(r: LoadedRun, which: str, probe: torch.Tensor) -> dict[str, torch.nn.Parameter]:
    """The trained parameters scored under ``--params which`` that the loss ``probe`` depends on; the others
    stop requiring grad (so no graph is built for them)."""
    params = trained(r.backbone)
    if which == "head":
        params = {n: p for n, p in params.items() if n in HEAD}
    grads = torch.autograd.grad(probe, list(params.values()), allow_unused=True)
    keep = {n: p for (n, p), g in zip(params.items(), grads, strict=True) if g is not None}
    for n, p in trained(r.backbone).items():
        p.requires_grad_(n in keep)
    if not keep:
        raise RalmError(f"--params {which}: the loss depends on none of these parameters")
    return keep


def memorization_scores(run: str | Path, method: str = "lissa", params: str = "all", share: float = 0.1,
                        lissa: MemoConfig | None = None) -> dict[str, Any]:
    """Self-influence of each few-shot training example of the finished run ``run`` (as the module says),
    written to ``RUN/memorization.json`` and returned: {"scores": {id: M}, "knn_gold": {id: p}, "summary":
    memo_summary, "atypical_ids", "method", "approximation", "params", "loss", "seconds", ...}."""
    cfg = MemoRunConfig(run=str(run), method=method, params=params, share=share, lissa=lissa or MemoConfig())
    t0 = time.perf_counter()
    if cfg.params == "head" and read_run(run)["config"]["data"] not in IMAGE_SETS:  # before any model loads
        raise RalmError(f"--params head: is for image runs (a head over frozen features), --run {run} is a text "
                        "run: score --params all (its trained LM or PEFT parameters)")
    r = load_run(run)
    bb, store, train = r.backbone, r.store, r.draw.split.train
    n = len(train)
    y = label_indices(bb, train)  # (n,)
    rows = list(range(n))
    with torch.no_grad():  # the training forward's demonstrations, from the final store (self left out)
        demos = neural_demos(store, store.raw, r.cfg.knn.demos, rows=rows) if r.cfg.knn.demos else None  # (n, C, d)
        knn = replace(r.cfg.knn, leave_self_out=True, k=min(r.cfg.knn.k, n - 1))
        gold = store_knn_probs(store, store.raw, knn, rows=rows).gather(1, y[:, None])[:, 0]  # (n,)
    bb.module().eval()  # no dropout: one deterministic loss, whose Hessian is the one inverted

    def per_example_loss(idx: torch.Tensor) -> torch.Tensor:
        out = bb.forward([train[int(i)] for i in idx], None if demos is None else demos[idx])
        return F.cross_entropy(out.class_logits.float(), y[idx].to(out.class_logits.device), reduction="none")  # (B,)

    # Hessian-vector products differentiate twice: the fused attention kernels (flash, memory-efficient) have no
    # double backward, the math one does (and gives the same attention)
    with sdpa_kernel(SDPBackend.MATH):
        scored = scored_parameters(r, cfg.params, per_example_loss(torch.arange(min(n, 8))).mean())
        inf = self_influence(per_example_loss, list(scored.values()), n, cfg.lissa, cfg.method)
    ids = [e.id for e in train]
    low = atypical(gold, cfg.share)
    result = {"format": FORMAT, "run": str(Path(run).resolve()), "method": cfg.method,
              "approximation": inf.approximation, "params": {"which": cfg.params, "names": list(scored),
                                                           "count": sum(p.numel() for p in scored.values())},
              "loss": LOSS, "share": cfg.share, "lissa": asdict(cfg.lissa) if cfg.method == "lissa" else None,
              "summary": memo_summary(inf.scores, gold, cfg.share), "atypical_ids": [ids[i] for i in low.tolist()],
              "seconds": {"influence": round(inf.seconds, 3), "total": round(time.perf_counter() - t0, 3)},
              "scores": dict(zip(ids, inf.scores.tolist(), strict=True)),
              "knn_gold": dict(zip(ids, gold.tolist(), strict=True))}
    write_json(Path(run) / MEMO, result)
    return result
