"""The model and the score of a PEFT task run, shared by ``ralm tune`` (tuning) and ``ralm eval-task`` (eval),
which never import each other: both build the model here and score a split here, so a run folder's score
is the number training computed, by construction.

- ``build_base``: gpt = the causal LM; retro = ``load_retrofit`` over it (refusing a checkpoint of another
  base model) and a store that fits its chunk grid.
- ``score``: QA = greedy answers, SQuAD EM / F1; summaries = greedy (``max_new_tokens``), ROUGE-1/2/L;
  multiple choice = per-choice log-likelihood, accuracy under every normalisation (``acc`` = per-byte, the
  primary one); plus the validation-style target loss on the gold targets. ``per_example``, when given,
  receives each metric's per-example values in points (their mean is the aggregate): the units
  ``ralm.eval.bootstrap`` resamples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ralm.core.task_metrics import (
    DEFAULT_NORMALISATION,
    choice_accuracy,
    choice_scores,
    rouge,
    rouge_scores,
    squad_em,
    squad_f1,
    squad_scores,
)
from ralm.data.tasks import ChoiceExample, QAExample, SummaryExample
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.lm.hidden import model_fingerprints
from ralm.lm.models import load
from ralm.lm.presets import tokenizer_fingerprint
from ralm.methods.retro.checkpoint import load_retrofit
from ralm.methods.retro.model import RetroFit
from ralm.methods.retro.neighbours import check_store_fits
from ralm.methods.task_forward import greedy, target_nll
from ralm.methods.task_inputs import Example, TaskEncoder, TaskRetrieval, gold_target, targets
from ralm.serve.client import RemoteStore, open_store


@dataclass
class TaskSettings:
    """How examples become inputs: the same in training and in every later evaluation of the run."""

    docs: int = 5
    doc_tokens: int = 128
    max_len: int = 512
    max_target: int = 128
    max_new_tokens: int = 32
    batch_size: int = 8


class PlainHandle:
    """A model without PEFT, seen as a ``PeftHandle`` by the forward helpers (zero-shot)."""

    def __init__(self, model: Any):
        self.model, self.n_virtual = model, 0

    def inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, neighbours: torch.Tensor | None = None,
               offset: int = 0) -> dict[str, Any]:
        kw: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if isinstance(self.model, RetroFit):
            kw.update(neighbours=neighbours, offset=offset)
        return kw

    def strip(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_base(arch: str, model: str, checkpoint: str | None, datastore: str | None
               ) -> tuple[Any, Any, Datastore | RemoteStore | None, tuple[str, ...]]:
    """(model, tokenizer, store or None, the base LM's weight fingerprints) on ``device()``, in eval mode."""
    if arch == "retro" and not checkpoint:
        raise RalmError("--arch retro needs --checkpoint (a `ralm retrofit` folder)")
    if arch == "retro" and not datastore:
        raise RalmError("--arch retro needs --datastore (its chunks are the neighbours)")
    ds = open_store(datastore) if datastore else None
    lm = load(model)
    net, fps = lm.model, model_fingerprints(lm.model)
    if arch == "retro":
        net, _ = load_retrofit(checkpoint, lm.model, lm.tokenizer, model)
        check_store_fits(ds, net.cfg, tokenizer_fingerprint(lm.tokenizer), model)
    return net.to(device()).eval(), lm.tokenizer, ds, fps


def encoder_for(model: Any, tokenizer: Any, arch: str, ds: Datastore | RemoteStore | None, s: TaskSettings) -> TaskEncoder:
    r = model.cfg if isinstance(model, RetroFit) else None
    return TaskEncoder(tokenizer, arch, ds, s.doc_tokens, s.max_len, s.max_target,
                       r.chunk_size if r else None, r.neighbour_len if r else None, s.max_new_tokens)


def check_room(model: Any, n_virtual: int, s: TaskSettings) -> None:
    """``--max-len`` tokens (retro: up to a chunk more, the prompt padded to the grid) after ``n_virtual``
    virtual tokens must fit the model's context."""
    retro = isinstance(model, RetroFit)
    base = model.base if retro else model
    context = getattr(base.config.get_text_config(), "max_position_embeddings", None)
    need = n_virtual + s.max_len + (model.cfg.chunk_size - 1 if retro else 0)
    if context and need > context:
        raise RalmError(f"--max-len {s.max_len}" + (f" with --n-virtual {n_virtual}" if n_virtual else "")
                        + (" and the chunk grid" if retro else "")
                        + f" needs {need} positions; the model's context holds {context}")


def kind_of(ex: Example) -> str:
    return "qa" if isinstance(ex, QAExample) else "summary" if isinstance(ex, SummaryExample) else "choice"


@torch.no_grad()
def score(handle: Any, enc: TaskEncoder, retrieval: TaskRetrieval, examples: Sequence[Example],
          s: TaskSettings, per_example: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """The task metric and the mean gold-target loss of ``examples`` (deterministic: greedy, eval mode);
    ``per_example`` is filled with metric -> one value (points) per example (QA: em, f1; summaries: rouge1/2/L;
    multiple choice: acc, the per-byte credit)."""
    if not examples:
        raise RalmError("no examples to score")
    handle.model.eval()
    rows = retrieval.rows(examples)
    kind = kind_of(examples[0])
    out: dict[str, Any] = {"examples": len(examples), "loss": round(_loss(handle, enc, examples, rows, s), 6)}
    if kind == "choice":
        out.update(_choices(handle, enc, examples, rows, s, per_example))
        return out
    preds = []
    for i in range(0, len(examples), s.batch_size):
        prompts = [enc.encode(ex, r, None) for ex, r in zip(examples[i:i + s.batch_size], rows[i:i + s.batch_size],
                                                            strict=True)]
        new = s.max_new_tokens if kind == "qa" else s.max_target
        for ids in greedy(handle, enc, prompts, new, stop_at_newline=kind == "qa"):
            text = enc.tok.decode(ids, skip_special_tokens=True).strip()
            preds.append(text.split("\n")[0].strip() if kind == "qa" else text)
    if kind == "qa":
        m = squad_scores(preds, [ex.answers for ex in examples])
        if per_example is not None:
            per_example["em"] = [100 * squad_em(p, ex.answers) for p, ex in zip(preds, examples, strict=True)]
            per_example["f1"] = [100 * squad_f1(p, ex.answers) for p, ex in zip(preds, examples, strict=True)]
    else:
        m = rouge_scores(preds, [ex.summary for ex in examples])
        if per_example is not None:
            per = [rouge(p, ex.summary) for p, ex in zip(preds, examples, strict=True)]
            per_example.update({t: [100 * r[t] for r in per] for t in m})
    out.update({k: round(v, 4) for k, v in m.items()})
    out["predictions"] = preds[:5]
    return out


def _loss(handle: Any, enc: TaskEncoder, examples: Sequence[Example], rows: list[list[int]],
          s: TaskSettings) -> float:
    total, n = 0.0, 0
    for i in range(0, len(examples), s.batch_size):
        batch = enc.collate([enc.encode(ex, r, gold_target(ex))
                             for ex, r in zip(examples[i:i + s.batch_size], rows[i:i + s.batch_size], strict=True)])
        nll, cnt = target_nll(handle, batch)
        total, n = total + float(nll.sum()), n + int(cnt.sum())
    return total / max(n, 1)


def _choices(handle: Any, enc: TaskEncoder, examples: Sequence[Example], rows: list[list[int]],
             s: TaskSettings, per_example: dict[str, list[float]] | None = None) -> dict[str, float]:
    flat = [(i, enc.encode(ex, r, c), c) for i, (ex, r) in enumerate(zip(examples, rows, strict=True))
            for c in targets(ex)]
    ll: list[list[float]] = [[] for _ in examples]
    n_tok: list[list[int]] = [[] for _ in examples]
    n_byte: list[list[int]] = [[] for _ in examples]
    for b in range(0, len(flat), s.batch_size):
        part = flat[b:b + s.batch_size]
        nll, cnt = target_nll(handle, enc.collate([e for _, e, _ in part]))
        for (i, _, text), x, c in zip(part, nll.tolist(), cnt.tolist(), strict=True):
            ll[i].append(-x)
            n_tok[i].append(c)
            n_byte[i].append(len((" " + text.strip()).encode()))
    labels = [ex.label for ex in examples if isinstance(ex, ChoiceExample)]
    if per_example is not None:  # each example's credit under the primary normalisation (acc's)
        per_example["acc"] = [100 * choice_accuracy([ll[i]], [labels[i]], [n_tok[i]], [n_byte[i]],
                                                    DEFAULT_NORMALISATION) for i in range(len(examples))]
    return {k: round(v, 4) for k, v in choice_scores(ll, labels, n_tok, n_byte).items()}
