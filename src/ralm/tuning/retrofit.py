"""``ralm retrofit``: train a RETRO-fit model's new layers (retrieval encoder + CCA) on a frozen causal LM.

1. The training (and evaluation) documents are tokenised as ``eval-lm`` sees them and cut on RETRO's chunk
   grid; the neighbours of every whole chunk are retrieved once from the datastore (same-document
   excluded) and cached under ``OUT/neighbours`` (or read from ``--neighbours``).
2. Training windows of ``seq_len`` tokens start on chunk boundaries; each step draws ``batch_size`` of them
   (a fresh seeded permutation per epoch, so a resumed run draws what the original would have).
3. Only the new parameters get gradients: AdamW, linear warm-up then cosine decay to 10%, gradient
   clipping, bf16 autocast where the hardware has bf16 units. Every ``eval_every`` steps the mean loss on
   the evaluation windows is logged with retrieval on and off; every ``save_every`` steps (and at the end)
   the checkpoint is written: new parameters (safetensors), config, and the state to resume from
   (``trainer.safetensors``: weights, optimiser, scheduler and RNG of one step; never a pickle).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ralm.core.start_token import start_token
from ralm.core.targets import make_targets
from ralm.data.corpus import CorpusConfig, iter_documents
from ralm.datastore.build import input_files_fingerprint
from ralm.datastore.store import Datastore
from ralm.errors import RalmError
from ralm.lm.hidden import model_fingerprints
from ralm.lm.models import load
from ralm.lm.presets import DEFAULT_LM, tokenizer_fingerprint
from ralm.methods.retro.checkpoint import (
    CONFIG,
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    VERSION,
    WEIGHTS,
    TrainerState,
    read_trainer_state,
    save_checkpoint,
    save_trainer_state,
)
from ralm.methods.retro.model import PAD, RetroConfig, RetroFit
from ralm.methods.retro.neighbours import NeighbourCache, check_store_fits, document_neighbours, store_id, window_neighbours
from ralm.utils import outdir
from ralm.utils.atomic import atomic_open

LOG = "train_log.jsonl"
ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq"}  # what AdamW (amsgrad off) keeps per parameter


@dataclass
class RetrofitConfig:
    datastore: str
    train: list[str]
    out: str
    model: str = field(default=DEFAULT_LM, metadata={"help": "the frozen base LM"})
    eval: list[str] | None = field(default=None, metadata={"help": "held-out documents for the periodic evaluation"})
    retro: RetroConfig = field(default_factory=RetroConfig)
    steps: int = field(default=1000, metadata={"help": "optimiser steps (a resumed run continues up to this)"})
    batch_size: int = field(default=4, metadata={"help": "windows per step"})
    seq_len: int = field(default=512, metadata={"help": "tokens per training window (a multiple of the chunk size)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (RETRO-fitting: ~2e-4)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N steps (0: only at the end)"})
    eval_windows: int = field(default=32, metadata={"help": "evaluation windows used each time"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on where the device "
                                                                "has bf16 units)"})
    neighbours: str | None = field(default=None, metadata={"help": "a precomputed neighbours cache to read "
                                                                   "(default: computed into OUT/neighbours)"})
    exclude_same_doc: bool = field(default=True, metadata={"help": "drop neighbours from the training document"})
    same_doc_fraction: float = field(default=0.0, metadata={
        "help": "fraction of training documents (seeded choice) whose chunks may retrieve from their own "
                "document, i.e. find themselves: 0 is RETRO's rule; more teaches copying from near-duplicates "
                "where the store has none across documents. Evaluation documents always exclude."})
    seed: int = 0
    force: bool = field(default=False, metadata={"help": "discard an existing checkpoint in OUT and start over"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_windows"):
            if getattr(self, name) < 1:
                raise RalmError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("warmup", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise RalmError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if self.seq_len % self.retro.chunk_size:
            raise RalmError(f"--seq-len {self.seq_len}: must be a multiple of the chunk size {self.retro.chunk_size}")
        if not self.lr > 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise RalmError("--lr and --grad-clip must be > 0 and --weight-decay >= 0")
        if not self.train:
            raise RalmError("--train: name at least one training file or folder")
        if not 0.0 <= self.same_doc_fraction <= 1.0:
            raise RalmError(f"--same-doc-fraction {self.same_doc_fraction}: must be in [0, 1]")

    def resume_key(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (steps may grow)."""
        return json.loads(json.dumps({"model": self.model, "format": VERSION, "retro": asdict(self.retro),
                                      "batch_size": self.batch_size,
                                      "seq_len": self.seq_len, "lr": self.lr, "warmup": self.warmup,
                                      "weight_decay": self.weight_decay, "seed": self.seed,
                                      "exclude_same_doc": self.exclude_same_doc,
                                      "same_doc_fraction": self.same_doc_fraction}))


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


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_lambda(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---- the run -----------------------------------------------------------------------------------------
def _legacy_run(root: Path) -> bool:
    """A run folder written before folders had an owner marker: its checkpoint, trainer state or cache."""
    return any((root / n).exists() for n in (CONFIG, TRAINER_STATE, LEGACY_TRAINER_STATE, "neighbours"))


# every name a run writes: --force and the cleanup of a failed start remove these and nothing else
KIND = outdir.Kind("retrofit", "RETRO-fit run", {
    **{re.escape(n): None for n in (WEIGHTS, CONFIG, TRAINER_STATE, LEGACY_TRAINER_STATE, LOG)},
    "neighbours": {"train|eval": {r"header\.json": None, r"neighbours\.npz": None}},
}, _legacy_run)


def retrofit(cfg: RetrofitConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume training) and return a summary: losses, tokens/s, parameter share, checkpoint path."""
    # writable, locked against a second writer, and ralm's own (--force empties it): before any loading
    with outdir.open_out(cfg.out, KIND, force=cfg.force) as run:
        run.claim()
        return _train(cfg, progress)


def _train(cfg: RetrofitConfig, progress: bool) -> dict[str, Any]:
    """The run itself, in the locked ``cfg.out``."""
    out = Path(cfg.out)
    state_path = out / TRAINER_STATE
    state = _resume_state(cfg, out, state_path)  # read and checked before minutes of model and data loading
    lm = load(cfg.model)
    model_fps, tok_fp = model_fingerprints(lm.model), tokenizer_fingerprint(lm.tokenizer)
    model_fp = model_fps[0]  # what this run records; a state may hold the legacy one
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm.model.to(device)
    bf16 = bf16_supported(device) if cfg.bf16 is None else cfg.bf16
    torch.manual_seed(cfg.seed)

    ids, nbs = _data(cfg, lm, cfg.train, "train", progress)
    eval_ids, eval_nbs = _data(cfg, lm, cfg.eval, "eval", progress) if cfg.eval else ([], [])
    train_w = windows([len(x) for x in ids], cfg.seq_len)
    if not train_w:
        raise RalmError(f"--train {cfg.train}: no document has 2 tokens to train on")
    eval_w = windows([len(x) for x in eval_ids], cfg.seq_len)[: cfg.eval_windows]

    step, log_rows, tokens_before = 0, [], 0
    if state is not None:
        if state.model_fingerprint not in model_fps:
            raise RalmError(f"--out {out}: was trained on other base-model weights than {cfg.model!r} has now")
        step, tokens_before = state.step, state.trained_tokens
    model = RetroFit(lm.model, cfg.retro)
    model.to(device)
    # weight decay on the matrices only: decaying a norm, a bias, the match gate or the relative-position
    # biases would pull each toward a value that means something (uniform attention, a half-open gate)
    params = model.new_parameters()
    decayed = {n for n, p in params.items() if p.ndim >= 2 and not n.endswith(".rel")}
    decay, rest = [params[n] for n in params if n in decayed], [params[n] for n in params if n not in decayed]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup, cfg.steps))
    if state is not None:  # the weights saved with the optimiser state: all of the same step
        state.restore(model, opt, sched, ADAMW_STATE)
        _truncate_log(out / LOG, step)
        print(f"resuming {out} at step {step}", file=sys.stderr)  # only once all of it has been accepted
    counts = model.parameter_counts()
    meta = {"model": cfg.model, "model_fingerprint": model_fp, "tokenizer_fingerprint": tok_fp,
            "start_token": start_token(lm.tokenizer),  # what its layers saw plain text start with
            "datastore": str(Path(cfg.datastore).resolve()), "train": cfg.train, "parameters": counts}
    pad_id = lm.tokenizer.pad_token_id
    m = cfg.retro.chunk_size
    off_loss = _eval_loss(model, eval_w, eval_ids, eval_nbs, m, pad_id, bf16, retrieval=False) if eval_w else None

    def checkpoint() -> None:
        # the resumption state is one atomic file (weights + optimiser of one step), written first; the
        # user-facing checkpoint (new weights + config) follows
        save_trainer_state(state_path, model, opt, sched, {
            "step": step, "trained_tokens": tokens_before + tokens, "model_fingerprint": model_fp,
            "resume_key": cfg.resume_key()})
        save_checkpoint(out, model, {**meta, "step": step})

    def evaluate() -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        if eval_w:
            on = _eval_loss(model, eval_w, eval_ids, eval_nbs, m, pad_id, bf16, retrieval=True)
            row.update(eval_loss_on=round(on, 4), eval_loss_off=round(off_loss, 4),
                       eval_ppl_on=round(math.exp(on), 3), eval_ppl_off=round(math.exp(off_loss), 3))
        return row

    model.train()
    model.base.eval()  # the frozen model keeps inference behaviour (no dropout)
    tokens, t0, loss_ema = 0, time.perf_counter(), None  # tokens: this session's (tokens/s is this session's)
    if state is not None:
        state.restore_rng()  # after model building and the first evaluation, as where the run was saved
    with tqdm(total=cfg.steps, initial=step, desc="retrofit", unit="step", disable=not progress,
              file=sys.stderr) as bar:
        while step < cfg.steps:
            batch = _batch(train_w, step, cfg.batch_size, cfg.seed)
            inp, labels, nb = collate(batch, ids, nbs, m, pad_id)
            loss = batch_loss(model, inp, labels, nb, bf16)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip))
            opt.step()
            sched.step()
            step += 1
            tokens += int((labels[:, 1:] != -100).sum())
            tps = tokens / (time.perf_counter() - t0)
            value = loss.item()
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            row = {"step": step, "loss": round(value, 4), "grad_norm": round(grad_norm, 4),
                   "lr": sched.get_last_lr()[0], "trained_tokens": tokens_before + tokens,
                   "tokens_per_second": round(tps, 1),
                   "elapsed_s": round(time.perf_counter() - t0, 2)}
            if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                row.update(evaluate())
                model.train()
                model.base.eval()
                if "eval_ppl_on" in row:
                    bar.write(f"step {step}: eval ppl on {row['eval_ppl_on']} / off {row['eval_ppl_off']}")
            log_rows.append(row)
            with open(out / LOG, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.save_every and step % cfg.save_every == 0 or step == cfg.steps:
                checkpoint()
    seconds = time.perf_counter() - t0
    last_eval = next((r for r in reversed(log_rows) if "eval_loss_on" in r), {})
    # trained_tokens counts the whole run, resumed parts included; seconds and tokens/s are this session's
    return {"checkpoint": str(out), "steps": step, "trained_tokens": tokens_before + tokens,
            "resumed_at_step": state.step if state is not None else 0, "seconds": round(seconds, 1),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "bf16": bf16, "device": device.type,
            "final_loss": log_rows[-1]["loss"] if log_rows else None, **counts, **last_eval}


def _batch(ws: list[Window], step: int, size: int, seed: int) -> list[Window]:
    """The windows of a step: position step·size onwards in a per-epoch seeded permutation."""
    out = []
    for j in range(step * size, (step + 1) * size):
        epoch, pos = divmod(j, len(ws))
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(ws[int(torch.randperm(len(ws), generator=g)[pos])])
    return out


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
    ds = Datastore.open(cfg.datastore)
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


def _resume_state(cfg: RetrofitConfig, out: Path, state_path: Path) -> TrainerState | None:
    """The run to resume in ``out`` (None: start afresh), checked against ``cfg``; never unpickles anything."""
    legacy = out / LEGACY_TRAINER_STATE
    if cfg.force:  # starting over (the folder was emptied of ralm's files, trainer.pt included): nothing is read
        return None
    if legacy.exists() or legacy.is_symlink():
        raise RalmError(f"--out {out}: holds {LEGACY_TRAINER_STATE}, an older ralm's resumption state, which is a "
                        f"pickle and is never loaded (it could run code); rerun with --force to start over "
                        f"(a {WEIGHTS} + {CONFIG} of checkpoint format {VERSION} there still loads for eval-lm)")
    if not state_path.exists():
        return None
    state = read_trainer_state(state_path)
    if state.resume_key != cfg.resume_key():
        raise RalmError(f"--out {out}: holds a run with other settings; pass the same ones, or --force to "
                        "start over")
    if state.step >= cfg.steps:
        raise RalmError(f"--out {out}: already trained for {state.step} steps; raise --steps to train further")
    return state


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows of steps after the checkpoint being resumed (they will be trained again)."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row_step = json.loads(line)["step"] if line.strip() else None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RalmError(f"{path}: line {n} is not a training log row; fix or delete the file") from None
        if isinstance(row_step, int) and row_step <= step:
            keep.append(line)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in keep))


def same_doc_docs(doc_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the documents (by id)."""
    if fraction <= 0:
        return set()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(doc_ids), generator=g).tolist()
    return {doc_ids[i] for i in order[: round(fraction * len(doc_ids))]}


