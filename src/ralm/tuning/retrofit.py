"""``ralm retrofit``: train a RETRO-fit model's new layers (retrieval encoder + CCA) on a frozen causal LM.

1. The training (and evaluation) documents are tokenised as ``eval-lm`` sees them and cut on RETRO's chunk
   grid; the neighbours of every whole chunk are retrieved once from the datastore (same-document
   excluded) and cached under ``OUT/neighbours`` (or read from ``--neighbours``).
2. Training windows of ``seq_len`` tokens start on chunk boundaries; each step draws ``batch_size`` of them
   (a fresh seeded permutation per epoch, so a resumed run draws what the original would have).
3. The shared training loop (``tuning/loop.py``) does the rest: only the new parameters require gradients
   (AdamW, warm-up then cosine, clipping, bf16 where supported); every ``eval_every`` steps the mean loss on
   the evaluation windows is logged with retrieval on and off; every ``save_every`` steps (and at the end)
   it writes the resumption state (``trainer.safetensors``, never a pickle) and then this module's
   checkpoint: new parameters (safetensors) and config.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ralm.core.start_token import start_token
from ralm.core.targets import make_targets
from ralm.data.corpus import CorpusConfig, iter_documents
from ralm.datastore.build import input_files_fingerprint
from ralm.errors import RalmError, refuse_below
from ralm.lm.hidden import model_fingerprints
from ralm.lm.models import load
from ralm.lm.presets import DEFAULT_LM, tokenizer_fingerprint
from ralm.methods.retro.checkpoint import CONFIG, LEGACY_TRAINER_STATE, VERSION, WEIGHTS, save_checkpoint
from ralm.methods.retro.model import PAD, RetroConfig, RetroFit
from ralm.methods.retro.neighbours import NeighbourCache, check_store_fits, document_neighbours, store_id, window_neighbours
from ralm.serve.client import is_url, open_store
from ralm.tuning import loop
from ralm.tuning.loop import LOG, STATE, TrainConfig
from ralm.tuning.state import TrainerState
from ralm.utils import outdir

LABEL = "RETRO-fit"


@dataclass(kw_only=True)
class RetrofitConfig(TrainConfig):
    """RETRO-fit's settings; the loop's (steps, lr, warmup, ...) come from ``TrainConfig``."""

    datastore: str = field(metadata={"help": "retrieval store with chunk-size chunks and continuations"})
    train: list[str] = field(metadata={"help": "training documents (JSONL/.txt/Parquet/folder); repeatable"})
    out: str = field(metadata={"help": "checkpoint folder (a rerun with the same settings resumes)"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "the frozen base LM: preset, model folder, GGUF "
                                                                 "file or hub id"})
    eval: list[str] | None = field(default=None, metadata={"help": "held-out documents evaluated every "
                                                                    "--eval-every steps; repeatable"})
    retro: RetroConfig = field(default_factory=RetroConfig)
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    seq_len: int = field(default=512, metadata={"help": "tokens per training window (a multiple of the chunk size)"})
    eval_windows: int = field(default=32, metadata={"help": "evaluation windows used each time"})
    neighbours: str | None = field(default=None, metadata={"help": "a precomputed neighbours cache to read "
                                                                   "(default: computed into OUT/neighbours)",
                                                           "flag": "--neighbours-cache"})
    exclude_same_doc: bool = field(default=True, metadata={"help": "drop neighbours from the training document"})
    same_doc_fraction: float = field(default=0.0, metadata={
        "help": "fraction of training documents (seeded choice) whose chunks may retrieve from their own "
                "document, i.e. find themselves: 0 is RETRO's rule; more teaches copying from near-duplicates "
                "where the store has none across documents. Evaluation documents always exclude."})
    force: bool = field(default=False, metadata={"help": "discard an existing checkpoint in OUT and start over"})

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_below(self, ("batch_size", "seq_len", "eval_windows"))
        if self.seq_len % self.retro.chunk_size:
            raise RalmError(f"--seq-len {self.seq_len}: must be a multiple of the chunk size {self.retro.chunk_size}")
        if not self.train:
            raise RalmError("--train: name at least one training file or folder")
        if not 0.0 <= self.same_doc_fraction <= 1.0:
            raise RalmError(f"--same-doc-fraction {self.same_doc_fraction}: must be in [0, 1]")

    def resume_key(self) -> dict[str, Any]:
        """RETRO-fit's settings a resumption must share (the loop adds lr, warm-up, weight decay and seed)."""
        return {"model": self.model, "format": VERSION, "retro": asdict(self.retro), "batch_size": self.batch_size,
                "seq_len": self.seq_len, "exclude_same_doc": self.exclude_same_doc,
                "same_doc_fraction": self.same_doc_fraction}


# ---- data --------------------------------------------------------------------------------------------
@dataclass
class Window:
    doc: int  # index of the document
    begin: int  # absolute start (a multiple of the chunk size)
    end: int


def windows(lengths: list[int], seq_len: int) -> list[Window]:
    """Consecutive ``seq_len`` windows over every document (the last one shorter); at least 2 tokens each."""
    return [Window(i, b, min(b + seq_len, n)) for i, n in enumerate(lengths) for b in range(0, n, seq_len)
            if min(b + seq_len, n) - b >= 2]


def collate(ws: list[Window], ids: list[torch.Tensor], nbs: list[torch.Tensor], m: int,
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) input ids, (B, L) labels (-100 on padding) and (B, U, K, R) neighbours."""
    L = max(w.end - w.begin for w in ws)
    U = L // m
    inp = torch.full((len(ws), L), pad_id, dtype=torch.long)
    labels = torch.full((len(ws), L), -100, dtype=torch.long)
    K, R = nbs[0].shape[1:] if len(nbs[0]) else (1, 1)
    nb = torch.full((len(ws), U, K, R), PAD, dtype=torch.long)
    for b, w in enumerate(ws):
        n = w.end - w.begin
        inp[b, :n] = ids[w.doc][w.begin:w.end]
        labels[b, :n] = ids[w.doc][w.begin:w.end]
        own = window_neighbours(nbs[w.doc], w.begin, n, m) if len(nbs[w.doc]) else nb[b, :0]
        nb[b, :len(own)] = own
    return inp, labels, nb


def batch_loss(model: RetroFit, inp: torch.Tensor, labels: torch.Tensor, nb: torch.Tensor | None,
               bf16: bool) -> torch.Tensor:
    """Mean next-token cross entropy over the real (non-padding) targets of a batch."""
    device = next(model.base.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inp.to(device), neighbours=None if nb is None else nb.to(device), offset=0).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             labels[:, 1:].flatten().to(device), ignore_index=-100)


# ---- the run -----------------------------------------------------------------------------------------
def _legacy_run(root: Path) -> bool:
    """A run folder written before folders had an owner marker: its checkpoint, trainer state or cache."""
    return any((root / n).exists() for n in (CONFIG, STATE, LEGACY_TRAINER_STATE, "neighbours"))


# every name a run writes: --force and the cleanup of a failed start remove these and nothing else
KIND = outdir.Kind("retrofit", "RETRO-fit run", {
    **{re.escape(n): None for n in (WEIGHTS, CONFIG, STATE, LEGACY_TRAINER_STATE, LOG)},
    "neighbours": {"train|eval": {r"header\.json": None, r"neighbours\.npz": None}},
}, _legacy_run)


def retrofit(cfg: RetrofitConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) and return a summary: losses, tokens/s, parameter share, checkpoint path."""
    return loop.in_run_folder(cfg.out, KIND, cfg.force, lambda: _train(cfg, progress))


def _train(cfg: RetrofitConfig, progress: bool) -> dict[str, Any]:
    """The run itself, in the locked ``cfg.out``: data, model and task; the shared loop trains."""
    out = Path(cfg.out)
    state = _resume_state(cfg, out)  # read and checked before minutes of model and data loading
    lm = load(cfg.model)
    model_fps, tok_fp = model_fingerprints(lm.model), tokenizer_fingerprint(lm.tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.model.to(device)
    bf16 = loop.use_bf16(cfg, device)
    torch.manual_seed(cfg.seed)

    ids, nbs = _data(cfg, lm, cfg.train, "train", progress)
    eval_ids, eval_nbs = _data(cfg, lm, cfg.eval, "eval", progress) if cfg.eval else ([], [])
    train_w = windows([len(x) for x in ids], cfg.seq_len)
    if not train_w:
        raise RalmError(f"--train {cfg.train}: no document has 2 tokens to train on")
    eval_w = windows([len(x) for x in eval_ids], cfg.seq_len)[: cfg.eval_windows]

    model = RetroFit(lm.model, cfg.retro)  # freezes the base: only the new layers require gradients
    model.to(device)
    counts = model.parameter_counts()
    meta = {"model": cfg.model, "model_fingerprint": model_fps[0], "tokenizer_fingerprint": tok_fp,
            "start_token": start_token(lm.tokenizer),  # what its layers saw plain text start with
            "datastore": cfg.datastore if is_url(cfg.datastore) else str(Path(cfg.datastore).resolve()),
            "train": cfg.train, "parameters": counts}
    pad_id, m = lm.tokenizer.pad_token_id, cfg.retro.chunk_size
    off_loss = _eval_loss(model, eval_w, eval_ids, eval_nbs, m, pad_id, bf16, retrieval=False) if eval_w else 0.0

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate(loop.step_items(train_w, step, cfg.batch_size, cfg.seed), ids, nbs, m, pad_id)

    def loss(model: RetroFit, b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inp, labels, nb = b
        return batch_loss(model, inp, labels, nb, bf16), int((labels[:, 1:] != -100).sum())

    def evaluate(model: RetroFit) -> dict[str, Any]:
        on = _eval_loss(model, eval_w, eval_ids, eval_nbs, m, pad_id, bf16, retrieval=True)
        return {"eval_loss_on": round(on, 4), "eval_loss_off": round(off_loss, 4),
                "eval_ppl_on": round(math.exp(on), 3), "eval_ppl_off": round(math.exp(off_loss), 3)}

    def save(root: Path, step: int) -> None:
        save_checkpoint(root, model, {**meta, "step": step})

    task = loop.Task(name=LABEL, batch=batch, loss=loss, resume_key=cfg.resume_key(),
                     evaluate=evaluate if eval_w else None, save=save, base_fingerprints=tuple(model_fps),
                     base_name=cfg.model)
    summary = loop.train(model, cfg, task, out, state=state, progress=progress)
    return {"checkpoint": str(out), **summary, **counts}


@torch.no_grad()
def _eval_loss(model: RetroFit, ws: list[Window], ids: list[torch.Tensor], nbs: list[torch.Tensor], m: int,
               pad_id: int, bf16: bool, retrieval: bool, batch: int = 4) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(ws), batch):
        inp, labels, nb = collate(ws[i:i + batch], ids, nbs, m, pad_id)
        count = int((labels[:, 1:] != -100).sum())
        total += float(batch_loss(model, inp, labels, nb if retrieval else None, bf16)) * count
        n += count
    return total / max(n, 1)


def _data(cfg: RetrofitConfig, lm: Any, files: list[str], split: str, progress: bool
          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token ids of every document of ``files`` and the neighbours of their whole chunks (cached)."""
    ds = open_store(cfg.datastore)
    tok_fp = tokenizer_fingerprint(lm.tokenizer)
    check_store_fits(ds, cfg.retro, tok_fp, cfg.model)
    docs = list(iter_documents(files, CorpusConfig()))
    targets = []
    for d in docs:
        try:
            targets.append(make_targets(d, lm.tokenizer))
        except RalmError:  # a document with nothing to score is nothing to train on either
            continue
    r = cfg.retro
    # which documents may find themselves: a seeded choice, fixed by the cache header
    own = same_doc_docs([t.doc_id for t in targets], cfg.same_doc_fraction if split == "train" else 0.0, cfg.seed)
    expect = {"store": store_id(ds), "tokenizer": tok_fp, "chunk_size": r.chunk_size, "neighbours": r.neighbours,
              "neighbour_len": r.neighbour_len, "exclude_same_doc": cfg.exclude_same_doc,
              "same_doc_documents": len(own),
              "inputs": json.loads(json.dumps(input_files_fingerprint(files))), "documents": len(targets)}
    path = Path(cfg.neighbours) / split if cfg.neighbours else Path(cfg.out) / "neighbours" / split
    if cfg.neighbours or (path / "header.json").exists():
        cache = NeighbourCache.load(path, expect)
    else:
        per_doc = [None] * len(targets)
        for allow in (False, True):
            idx = [i for i, t in enumerate(targets) if (t.doc_id in own) == allow]
            found = document_neighbours(ds, lm.tokenizer, [targets[i] for i in idx], r,
                                        cfg.exclude_same_doc and not allow, progress=progress)
            for i, x in zip(idx, found, strict=True):
                per_doc[i] = x
        cache = NeighbourCache.from_docs(expect, per_doc, r.neighbours, r.neighbour_len)
        cache.save(path)
    return [t.ids for t in targets], [cache.doc(i) for i in range(len(targets))]


def _resume_state(cfg: RetrofitConfig, out: Path) -> TrainerState | None:
    """The run to resume in ``out`` (None: start afresh), checked against ``cfg``; never unpickles anything."""
    legacy = out / LEGACY_TRAINER_STATE
    if legacy.exists() or legacy.is_symlink():  # --force removed it (unread) before this runs
        raise RalmError(f"--out {out}: holds {LEGACY_TRAINER_STATE}, an older ralm's resumption state, which is a "
                        f"pickle and is never loaded (it could run code); rerun with --force to start over "
                        f"(a {WEIGHTS} + {CONFIG} of checkpoint format {VERSION} there still loads for eval-lm)")
    return loop.resume_state(out, cfg, LABEL, cfg.resume_key())


def same_doc_docs(doc_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the documents (by id)."""
    if fraction <= 0:
        return set()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(doc_ids), generator=g).tolist()
    return {doc_ids[i] for i in order[: round(fraction * len(doc_ids))]}


