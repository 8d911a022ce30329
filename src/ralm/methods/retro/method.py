"""RETRO-fit as a registered method: ``eval-lm`` (retrieval on or off), ``scale`` and ``generate``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ralm.core.registry import Method, MethodContext, Session, register_method
from ralm.core.retriever import StoreRetriever, payload_store
from ralm.core.targets import Targets, default_stride, model_context
from ralm.errors import RalmError
from ralm.lm.presets import tokenizer_fingerprint
from ralm.methods.retro.checkpoint import load_retrofit, read_checkpoint_config
from ralm.methods.retro.model import PAD, pad_neighbours
from ralm.methods.retro.neighbours import check_store_fits, document_neighbours, window_neighbours
from ralm.methods.retro.scoring import retro_nll
from ralm.methods.stores import method_retriever, open_retrieval_store, restrict, store_hits, without_tokens

NAME = "retro"


@dataclass
class RetroRunConfig:
    """What ``retro`` reads when it evaluates: the trained checkpoint, and whether it retrieves."""

    checkpoint: str | None = field(default=None, metadata={"help": "the RETRO-fit checkpoint folder (from `ralm "
                                                                   "retrofit`; its store is the default --datastore)"})
    retrieval: str = field(default="on", metadata={"help": "on (neighbours from the store) or off (the frozen "
                                                           "model)"})

    def __post_init__(self) -> None:
        if self.retrieval not in ("on", "off"):
            raise RalmError(f"--retrieval {self.retrieval!r}: expected on or off")


def _resolve(run: Any, options: Any) -> None:
    """Needs ``--checkpoint``; the store is the one the checkpoint was trained with unless another is named
    (none needed with ``--retrieval off``). ``options``: a RetroRunConfig, or generate's flat config."""
    if not getattr(options, "checkpoint", None):
        raise RalmError(f"--method {NAME} needs --checkpoint")
    run.datastore = run.datastore or read_checkpoint_config(options.checkpoint).get("datastore")
    if not run.datastore and getattr(options, "retrieval", "on") == "on":
        raise RalmError(f"--method {NAME} needs --datastore")


def _open(ctx: MethodContext) -> Session:
    """A RETRO-fit checkpoint on the plain LM's windows; with retrieval on, each document's chunk neighbours
    are retrieved in one batch (same-document exclusion and decontamination as for the other methods)."""
    run: RetroRunConfig = ctx.options
    retro, _ = load_retrofit(run.checkpoint, ctx.model, ctx.tokenizer, ctx.model_name)
    try:
        stride = default_stride(model_context(ctx.model, ctx.lm.context), ctx.lm.window_stride)
        ds = retriever = None
        if run.retrieval == "on":
            ds = open_retrieval_store(ctx, check=False)
            check_store_fits(ds, retro.cfg, tokenizer_fingerprint(ctx.tokenizer), ctx.model_name)
            ds = restrict(ds, ds.manifest["counts"]["chunks"], ctx)
            retriever = method_retriever(ds, ctx)
            ds = payload_store(retriever, ds)  # where the rows' tokens are read (an ablation's view)
    except BaseException:
        retro.remove_hooks()  # leave a reused model as it came
        raise
    session = Session(info=dict(checkpoint=run.checkpoint, retrieval=run.retrieval, chunk_size=retro.cfg.chunk_size,
                                neighbours=retro.cfg.neighbours), on_close=retro.remove_hooks)

    def scorer(t: Targets, context: int) -> tuple[torch.Tensor, float]:
        neighbours, seconds = None, 0.0
        if ds is not None:
            t0 = time.perf_counter()
            neighbours = document_neighbours(ds, ctx.tokenizer, [t], retro.cfg, ctx.exclude_same_doc,
                                             ctx.decontaminate, retriever=retriever)[0]
            seconds = time.perf_counter() - t0
        return retro_nll(retro, t, context, stride, neighbours, session.log_for(t.doc_id, ctx.leakage)), seconds

    session.scorer = scorer
    return session


def load_generation(lm: Any, model_name: str, run: Any, ds: Any) -> Any:
    """The RETRO-fit model ``ralm generate`` steps with (``run.checkpoint``), checked against the store."""
    retro, _ = load_retrofit(run.checkpoint, lm.model, lm.tokenizer, model_name)
    check_store_fits(ds, retro.cfg, tokenizer_fingerprint(lm.tokenizer), model_name)
    return retro


def _generate(model: Any, tokenizer: Any, cfg: Any, ds: Any, retro: Any) -> Any:
    """``ralm generate`` step: whenever the text completes a chunk of m tokens (on RETRO's grid, the start token
    included), that chunk's text retrieves its neighbours; the tokens after it read them through CCA."""
    if retro is None:
        raise RalmError(f"--method {NAME} needs --checkpoint")
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    m = retro.cfg.chunk_size
    retriever = StoreRetriever(ds)
    chunk_nb: list[torch.Tensor] = []  # (K, R) neighbours of each whole chunk so far

    def step(ids: list[int], n_prompt: int, retrievals: list[dict[str, Any]]) -> torch.Tensor:
        n = len(ids)
        while len(chunk_nb) < n // m:  # a chunk was completed: retrieve its neighbours
            u = len(chunk_nb)
            text = tokenizer.decode([i for i in ids[u * m:(u + 1) * m] if i not in special])
            hits = store_hits(ds, text, retro.cfg.neighbours, retriever)
            chunk_nb.append(pad_neighbours([[h["tokens"] for h in hits]], retro.cfg.neighbours,
                                           retro.cfg.neighbour_len)[0])
            retrievals.append({"position": (u + 1) * m, "query": text, "neighbours": without_tokens(hits)})
        begin = max(0, n - cfg.context)
        inp = torch.tensor(ids[begin:], dtype=torch.long).unsqueeze(0).to(device)
        nbs = torch.stack(chunk_nb) if chunk_nb else torch.full((0, retro.cfg.neighbours, 1), PAD)
        win = window_neighbours(nbs, begin, n - begin, m).unsqueeze(0)
        return retro(inp, neighbours=win, offset=begin, logits_to_keep=1).logits[0, -1]

    return step


register_method(Method(name=NAME, help="a RETRO-fit checkpoint (--checkpoint): CCA reads each chunk's neighbours",
                       store="retrieval", open=_open, config=RetroRunConfig, options=NAME, owns=("checkpoint",),
                       resolve=_resolve,
                       generate=_generate, load_generation=load_generation))
