"""``ralm retroprompt train`` / ``eval``: RetroPrompt (issue 14) on the shared training loop, over any
``Backbone``: a causal LM with a template and verbalizer (text sets, ``TextBackbone``), or for an image set
(``--data fashion-mnist``) a trained head over frozen EfficientNet-Lite0 features (``VisionBackbone``, its
``--head``/``--dim``/``--resolution``/... flags; each split's features computed once, through the feature
cache). The memorization score of a finished run is ``retroprompt_memo.py``.

Training: the few-shot train split (``retroprompt_config.draw``) is the knowledge store, keyed on the
backbone's representations (``methods/retroprompt``). A step draws ``--batch-size`` of its examples
(``loop.step_items``: a function of the step, so a killed run resumes to the same weights) and minimises the
kNN-guided loss, p_kNN and the neural demonstrations read from the store with the example's own row left out
(p_kNN: by ``--leave-self-out``; demonstrations: always). Before step s the store is re-encoded when the
schedule says so (``--refresh``: every epoch = ceil(n / batch) steps, every N steps, or never); each
refresh's seconds are summed, and the store's keys are written at every checkpoint, so a resumed run reads
the very keys the uninterrupted one had. Evaluation on dev (every ``--eval-every`` steps) encodes a store of
its own from the current weights (as the reference rebuilds it at each evaluation) and leaves training's
alone.

After training the store is encoded with the trained model (``keys.safetensors``), λ is chosen on dev by
accuracy (unless ``--lmbda``), and the test split is scored with ``(1 − λ)·p_model + λ·p_kNN``.
``evaluate_retroprompt(run, split)`` re-loads config, weights and keys and scores dev or test the same way,
so a saved run reproduces its test accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ralm.errors import RalmError
from ralm.lm import vision as lm_vision
from ralm.lm.hidden import model_fingerprints
from ralm.lm.models import load
from ralm.methods.retroprompt.backbone import (
    Backbone,
    TextBackbone,
    eval_mode,
    label_indices,
    load_trained,
    save_trained,
    trained,
)
from ralm.methods.retroprompt.knn import interpolate
from ralm.methods.retroprompt.scoring import accuracy, choose_lmbda, class_probs, training_loss
from ralm.methods.retroprompt.store import KnowledgeStore
from ralm.methods.retroprompt.vision import VisionBackbone
from ralm.tuning import loop
from ralm.tuning.retroprompt_config import (
    FORMAT,
    KEYS,
    KIND,
    LABEL,
    RUN,
    STORE,
    VERSION,
    WEIGHTS,
    Draw,
    RetroPromptConfig,
    draw,
    read_keys,
    write_keys,
)
from ralm.utils import outdir
from ralm.utils.atomic import write_json

SPLITS = ("dev", "test")


def train_retroprompt(cfg: RetroPromptConfig, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a RetroPrompt run in ``cfg.out``; return the loop's summary, the store's cost, the
    chosen λ and the dev / test scores."""
    return loop.in_run_folder(cfg.out, KIND, cfg.force, lambda: _train(cfg, progress))


def build_backbone(cfg: RetroPromptConfig, d: Draw) -> tuple[Backbone, tuple[str, ...]]:
    """The run's backbone, its trained parameters set up (seeded), and the frozen base's fingerprints. Images:
    a ``VisionBackbone`` whose frozen features of every split of ``d`` are computed (or read from the feature
    cache) here, one cache file per split; its fingerprint names the frozen network and its resolution (what
    the feature cache keys on)."""
    if cfg.images:
        bb = VisionBackbone(d.classes, cfg.vision, seed=cfg.seed)  # the head's init: its own fork of the RNG
        torch.manual_seed(cfg.seed)  # dropout
        for split, examples in (("train", d.split.train), ("dev", d.split.dev), ("test", d.test)):
            if examples:
                bb.prepare(examples, f"{cfg.data}-{split}" + (f"-{cfg.shots}shot-seed{cfg.seed}"
                                                             if split != "test" else ""))
        return bb, (f"{lm_vision.MODEL_NAME}@{cfg.vision.resolution}px",)
    lm = load(cfg.model, device="auto")
    fps = model_fingerprints(lm.model)
    torch.manual_seed(cfg.seed)  # LoRA's / the virtual tokens' initialisation
    return TextBackbone.build(lm.model, lm.tokenizer, cfg.prompt_config(), cfg.peft), fps


def _store(bb: Backbone, d: Draw, reps: torch.Tensor) -> KnowledgeStore:
    return KnowledgeStore(reps, label_indices(bb, d.split.train).tolist(), bb.n_classes, bb.classes)


def counts(bb: Backbone) -> dict[str, Any]:
    """Trained parameters, all parameters, and the trained share in percent."""
    n, total = sum(p.numel() for p in trained(bb).values()), sum(p.numel() for p in bb.module().parameters())
    return {"trainable": n, "total": total, "percent": 100.0 * n / total}


def _scoring_was_cut(out: Path, cfg: RetroPromptConfig) -> bool:
    """``out`` holds this run trained to ``cfg.steps`` whose scoring after training never finished (killed)."""
    meta = outdir.read_json(out / RUN)
    return (isinstance(meta, dict) and meta.get("format") == FORMAT and "lmbda" not in meta
            and meta.get("step") == cfg.steps and meta.get("resume_key") == loop.run_key(cfg, cfg.resume_key()))


def finished_result(cfg: RetroPromptConfig) -> dict[str, Any] | None:
    """What ``train_retroprompt(cfg)`` returned, read back from ``cfg.out`` if it holds this run trained to
    ``cfg.steps`` and scored; None otherwise. A caller that was killed after training (a benchmark cell
    during its memorization scoring) continues from here, where ``train`` itself refuses ("already trained")."""
    out = Path(cfg.out)
    meta = outdir.read_json(out / RUN)
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT and "lmbda" in meta and "summary" in meta
            and meta.get("step") == cfg.steps and meta.get("resume_key") == loop.run_key(cfg, cfg.resume_key())):
        return None
    return {"run": str(out), **meta["summary"], **meta["parameters"],
            **{k: meta[k] for k in ("lmbda", "dev", "test") if k in meta}}


def _train(cfg: RetroPromptConfig, progress: bool) -> dict[str, Any]:
    out = Path(cfg.out)
    if _scoring_was_cut(out, cfg):  # the loop would refuse ("already trained"): score the saved weights
        d = draw(cfg)
        bb, _ = build_backbone(cfg, d)
        load_trained(bb, out / WEIGHTS)
        meta = json.loads((out / RUN).read_text(encoding="utf-8"))
        result = _finish(cfg, bb, d, out, progress)
        write_json(out / RUN, {**meta, **result})
        return {"run": str(out), **meta.get("summary", {"steps": cfg.steps}), "resumed_at_step": cfg.steps,
                **counts(bb), **result}
    state = loop.resume_state(out, cfg, LABEL, cfg.resume_key())  # refused before the model loads
    d = draw(cfg)
    bb, fps = build_backbone(cfg, d)
    train_ex, dev_ex = d.split.train, d.split.dev
    y = label_indices(bb, train_ex)  # (n,)
    cost = {"refreshes": 0, "seconds": 0.0}  # this session's re-encodings of the training store

    def encode() -> torch.Tensor:
        t0 = time.perf_counter()
        reps = bb.represent(train_ex, cfg.batch_size)  # (n, d)
        cost["seconds"] += time.perf_counter() - t0
        return reps

    if state is None:
        store = _store(bb, d, encode())
    else:  # the keys training had at the checkpoint, not the resumed weights' (they moved since the refresh)
        store = _store(bb, d, read_keys(out / STORE, len(train_ex), state.step))
    every = cfg.refresh_every(-(-len(train_ex) // cfg.batch_size))
    order = list(range(len(train_ex)))
    gold: list[float] = []

    def batch(step: int) -> list[int]:
        if every and step > 0 and step % every == 0:
            reps = encode()
            t0 = time.perf_counter()
            store.refresh(reps)
            cost["seconds"] += time.perf_counter() - t0
            cost["refreshes"] += 1
        return loop.step_items(order, step, cfg.batch_size, cfg.seed)

    def loss(_: Any, rows: list[int]) -> tuple[torch.Tensor, int]:
        step = training_loss(bb, store, [train_ex[i] for i in rows], rows, y[rows], cfg.knn)
        gold.append(step.p_knn_gold)
        return step.loss, len(rows)

    def evaluate(_: Any) -> dict[str, Any]:
        st = _store(bb, d, bb.represent(train_ex, cfg.batch_size))  # the current weights' store, training's untouched
        p_model, p_knn = class_probs(bb, st, dev_ex, cfg.knn, cfg.batch_size)
        t = label_indices(bb, dev_ex)
        lm = 0.2 if cfg.lmbda is None else cfg.lmbda
        return {"dev_accuracy_model": accuracy(p_model, t), "dev_accuracy_knn": accuracy(p_knn, t),
                f"dev_accuracy_lmbda_{lm:g}": accuracy(interpolate(p_model, p_knn, lm), t)}

    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_json(), "model_fingerprint": fps[0],
            "classes": list(bb.classes), "train_ids": [e.id for e in train_ex], "dev_examples": len(dev_ex),
            "parameters": counts(bb), "resume_key": loop.run_key(cfg, cfg.resume_key())}

    def save(root: Path, step: int) -> None:
        write_keys(root / STORE, store.raw, step)
        save_trained(bb, root / WEIGHTS)
        write_json(root / RUN, {**meta, "step": step})

    task = loop.Task(name=LABEL, batch=batch, loss=loss, resume_key=cfg.resume_key(), evaluate=evaluate,
                     save=save, base_fingerprints=fps, base_name=fps[0] if cfg.images else cfg.model)
    summary = loop.train(bb.module(), cfg, task, out, state=state, progress=progress)
    refresh_s = cost["seconds"]
    summary.pop("tokens_per_second")  # a "token" here is an example
    summary["trained_examples"] = summary.pop("trained_tokens")
    wall = max(summary["seconds"], refresh_s, 1e-9)  # refreshes happen inside the timed loop
    summary["examples_per_second"] = round(len(gold) * cfg.batch_size / wall, 2)
    summary["store"] = {"refreshes": cost["refreshes"], "refresh_seconds": round(refresh_s, 3),
                        "share_of_training_time": round(refresh_s / wall, 4),
                        "train_p_knn_gold": round(sum(gold) / len(gold), 4) if gold else None}
    write_json(out / RUN, {**meta, "step": summary["steps"], "summary": summary})  # kept if scoring is killed
    result = _finish(cfg, bb, d, out, progress)
    write_json(out / RUN, {**meta, "step": summary["steps"], "summary": summary, **result})
    return {"run": str(out), **summary, **counts(bb), **result}


def _finish(cfg: RetroPromptConfig, bb: Backbone, d: Draw, out: Path, progress: bool) -> dict[str, Any]:
    """The trained model's store (written), λ chosen on dev, and the test score."""
    reps = bb.represent(d.split.train, cfg.batch_size)
    write_keys(out / KEYS, reps, -1)
    store = _store(bb, d, read_keys(out / KEYS, len(d.split.train)))  # exactly what `eval` will read
    dev = _score(bb, store, d.split.dev, cfg, None, progress=False)
    result: dict[str, Any] = {"lmbda": dev["lmbda"], "dev": dev}
    if cfg.test and d.test:
        result["test"] = _score(bb, store, d.test, cfg, dev["lmbda"], progress)
    return result


def _score(bb: Backbone, store: KnowledgeStore, examples: Sequence[Any], cfg: RetroPromptConfig,
           lmbda: float | None, progress: bool) -> dict[str, Any]:
    """Accuracies of p_model, p_kNN and their interpolation; ``lmbda`` None: chosen here (``cfg.lmbda`` or the
    grid's best), with each candidate's accuracy."""
    with eval_mode(bb.module()), torch.no_grad():
        p_model, p_knn = class_probs(bb, store, examples, cfg.knn, cfg.batch_size, progress=progress)
    t = label_indices(bb, examples)
    out: dict[str, Any] = {}
    if lmbda is None:
        lmbda, grid = (cfg.lmbda, None) if cfg.lmbda is not None else choose_lmbda(p_model, p_knn, t, cfg.lmbda_grid)
        if grid is not None:
            out["accuracy_by_lmbda"] = grid
    return {"accuracy": accuracy(interpolate(p_model, p_knn, lmbda), t), "lmbda": lmbda,
            "accuracy_model": accuracy(p_model, t), "accuracy_knn": accuracy(p_knn, t), "examples": len(examples),
            **out}


def read_run(run: str | Path) -> dict[str, Any]:
    path = Path(run) / RUN
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RalmError(f"--run {run}: no readable {RUN} ({e.__class__.__name__}); is it a `ralm retroprompt "
                        "train` folder?") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise RalmError(f"--run {run}: not a ralm retroprompt run (format {FORMAT} version {VERSION})")
    if "lmbda" not in meta:
        raise RalmError(f"--run {run}: training has not finished (no λ chosen yet); rerun the training to resume")
    return meta


@dataclass(frozen=True)
class LoadedRun:
    """A finished run folder brought back: its config, data, backbone with the trained weights, final store."""

    meta: dict[str, Any]
    cfg: RetroPromptConfig
    draw: Draw
    backbone: Backbone
    store: KnowledgeStore


def load_run(run: str | Path) -> LoadedRun:
    """Re-load a finished run (``read_run``): config, the same few-shot draw (refused if the data changed), the
    backbone (refused if the frozen weights changed) with its trained parameters, and the trained model's store."""
    meta = read_run(run)
    cfg = RetroPromptConfig.from_json(meta["config"])
    d = draw(cfg)
    if [e.id for e in d.split.train] != meta["train_ids"]:
        raise RalmError(f"--run {run}: the data changed since training (the few-shot draw is not the store's)")
    bb, fps = build_backbone(cfg, d)
    if meta["model_fingerprint"] not in fps:
        raise RalmError(f"--run {run}: was trained on other weights than {fps[0] if cfg.images else cfg.model!r} "
                        "has now")
    load_trained(bb, Path(run) / WEIGHTS)
    return LoadedRun(meta, cfg, d, bb, _store(bb, d, read_keys(Path(run) / KEYS, len(d.split.train))))


def evaluate_retroprompt(run: str | Path, split: str = "test", progress: bool = False) -> dict[str, Any]:
    """Score ``split`` (dev or test) with a finished run folder: its config, weights, store keys and λ;
    returns {"accuracy", "accuracy_model", "accuracy_knn", "lmbda", "examples", "split"}."""
    if split not in SPLITS:
        raise RalmError(f"--split {split!r}: choose {' or '.join(SPLITS)}")
    r = load_run(run)
    examples = r.draw.split.dev if split == "dev" else r.draw.test
    return {"split": split, **_score(r.backbone, r.store, examples, r.cfg, float(r.meta["lmbda"]), progress)}
