"""``ralm retroprompt train``'s settings, its data (a few-shot draw checked against the verbalizer) and the
files of its run folder (``retroprompt.py`` trains and scores with them).

A run folder holds ``run.json`` (the config, what was measured, the chosen λ), the trained weights
(``weights.safetensors``: with ``--peft full`` every LM weight, else only the PEFT ones), ``store.safetensors``
(the knowledge store's keys as training read them at the last checkpoint: what a resumed run continues
from), ``keys.safetensors`` (the store of the trained model, read at inference), the loop's
``trainer.safetensors`` and ``train_log.jsonl``; ``memorization.json`` once ``ralm retroprompt memo`` ran.
Image runs keep only the head in ``weights.safetensors`` (the frozen features are in the feature cache).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ralm.core.registry import flag_of
from ralm.data.fewshot import SHOTS, FewShotSplit, few_shot
from ralm.data.tasks.base import LabelledData
from ralm.data.tasks.fashion_mnist import CLASSES as FASHION_CLASSES
from ralm.data.tasks.labelled import load_labelled, read_labelled
from ralm.errors import RalmError, refuse_below
from ralm.lm.presets import DEFAULT_LM
from ralm.methods.peft import PeftConfig
from ralm.methods.retroprompt.knn import KNNConfig
from ralm.methods.retroprompt.prompt import PromptConfig
from ralm.methods.retroprompt.vision import VisionConfig
from ralm.tuning.loop import LOG, STATE, TrainConfig
from ralm.utils import outdir
from ralm.utils.tensors import write_safetensors

LABEL, RUN, STORE, KEYS = "retroprompt", "run.json", "store.safetensors", "keys.safetensors"
WEIGHTS = "weights.safetensors"
FORMAT, VERSION = "ralm-retroprompt", 1
LMBDA_GRID = (0.0, 0.1, 0.2, 0.5)  # the reference's grid (0.1, 0.2, 0.5) and 0: no interpolation
# LM-BFF's MR template ("*cls**sent_0*_It_was*mask*.", great / terrible), and a topic prompt for BBC News
TEXT_SETS: dict[str, tuple[str, list[str]]] = {
    "rotten-tomatoes": ("{text} It was", ["fresh=great", "rotten=terrible"]),
    "bbc-news": ("{text} This article is about", ["business=business", "entertainment=entertainment",
                                                  "politics=politics", "sports=sports", "tech=technology"]),
}
# image sets: a trained head over frozen EfficientNet-Lite0 features (methods/retroprompt/vision.py)
IMAGE_SETS: dict[str, tuple[str, ...]] = {"fashion-mnist": FASHION_CLASSES}
MEMO = "memorization.json"  # `ralm retroprompt memo`'s scores (retroprompt_memo.py)
KIND = outdir.Kind(LABEL, "ralm retroprompt run",
                   {re.escape(n): None for n in (RUN, WEIGHTS, STORE, KEYS, STATE, LOG, MEMO)}, lambda root: False)


@dataclass(kw_only=True)
class RetroPromptConfig(TrainConfig):
    """A RetroPrompt run's settings; the loop's (steps, lr, warmup, ...) come from ``TrainConfig``."""

    # the reference's (LM-BFF's) training settings: 800 steps of 8 examples at lr 1e-5, no warm-up
    steps: int = field(default=800, metadata={"help": "optimiser steps (a resumed run continues up to this)"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (the reference, full fine-tuning: 1e-5; "
                                                      "LoRA and prompt tuning want more, ~1e-4 and ~1e-3)"})
    warmup: int = field(default=0, metadata={"help": "linear warm-up steps"})
    data: str = field(metadata={"help": f"{', '.join(TEXT_SETS)} (texts), {', '.join(IMAGE_SETS)} (images), or a "
                                        "JSONL file of {text, label} lines (then give --template and --verbalizer)"})
    out: str = field(metadata={"help": "run folder (a rerun with the same settings resumes)"})
    data_file: str | None = field(default=None, metadata={
        "help": "a named set's data file or folder (default: the one `ralm data get` fetched)"})
    template: str | None = field(default=None, metadata={
        "help": "prompt with one {text} slot, ending where the label word comes next (default: the named set's)"})
    verbalizer: list[str] | None = field(default=None, metadata={
        "help": "class=word (or class=word1|word2), repeatable, one per class (default: the named set's)"})
    prompt: PromptConfig = field(default_factory=PromptConfig)  # template / verbalizer: the two fields above
    shots: int = field(default=16, metadata={"help": f"examples per class in train and in dev; LM-BFF: {SHOTS}"})
    seed: int = field(default=42, metadata={"help": "seed of the few-shot draw and of training (LM-BFF's five: "
                                                    "13, 21, 42, 87, 100)"})
    model: str = field(default=DEFAULT_LM, metadata={"help": "the LM: preset, folder or hub id (text data)"})
    peft: PeftConfig = field(default_factory=lambda: PeftConfig(method="full"))
    knn: KNNConfig = field(default_factory=KNNConfig)  # its lmbda: the field below
    vision: VisionConfig = field(default_factory=VisionConfig)  # image data only: the head and the frozen features
    lmbda: float | None = field(default=None, metadata={
        "help": "weight of p_kNN in the interpolation at inference, in [0, 1] (default: chosen on dev from "
                "--lmbda-grid)"})
    lmbda_grid: tuple[float, ...] = field(default=LMBDA_GRID, metadata={
        "help": "the λ values tried on dev, best accuracy wins (ties: the first)"})
    refresh: str = field(default="epoch", metadata={
        "help": "re-encode the knowledge store: every epoch, every N steps (a number) or never"})
    batch_size: int = field(default=8, metadata={"help": "examples per step (and per scoring batch)"})
    test: bool = field(default=True, metadata={"help": "score the test split after training"})
    test_limit: int | None = field(default=None, metadata={"help": "score only the first N test examples "
                                                                   "(default: all)"})
    force: bool = field(default=False, metadata={"help": "discard an existing run in OUT and start over"})

    def __post_init__(self) -> None:
        super().__post_init__()
        refuse_below(self, ("shots", "batch_size"))
        if self.test_limit is not None:
            refuse_below(self, ("test_limit",))
        if self.data not in TEXT_SETS and not self.images:
            if not Path(self.data).is_file():
                raise RalmError(f"--data {self.data}: neither a named set ({', '.join([*TEXT_SETS, *IMAGE_SETS])}) "
                                "nor a file")
            if self.template is None or self.verbalizer is None:
                raise RalmError(f"--data {self.data}: a labelled JSONL file needs --template and --verbalizer")
        if self.lmbda is not None and not 0 <= self.lmbda <= 1:
            raise RalmError(f"--lmbda {self.lmbda}: must be in [0, 1]")
        self.lmbda_grid = tuple(float(x) for x in self.lmbda_grid)
        if not self.lmbda_grid or not all(0 <= x <= 1 for x in self.lmbda_grid):
            raise RalmError(f"--lmbda-grid {','.join(map(str, self.lmbda_grid))}: give values in [0, 1]")
        self.refresh_every(1)
        self._refuse_other_modality()
        self.prompt_config()

    @property
    def images(self) -> bool:
        """An image set: a ``VisionBackbone`` trains, not an LM."""
        return self.data in IMAGE_SETS

    def _refuse_other_modality(self) -> None:
        """A flag of the other kind of data set to anything but its default is refused, naming it: it would
        otherwise be silently ignored."""
        text: list[tuple[Any, Any]] = [(self.prompt, PromptConfig()), (self.peft, PeftConfig(method="full"))]
        if self.images:
            own = dict(template=self.template, verbalizer=self.verbalizer, model=self.model)
            bad = [f"--{k}" for k, v in own.items() if v != {"model": DEFAULT_LM}.get(k)]
            bad += [flag_of(f) for cfg, default in text for f in fields(cfg)
                    if f.init and getattr(cfg, f.name) != getattr(default, f.name)]
            if bad:
                raise RalmError(f"{bad[0]} is for text data, not --data {self.data} (images: a head over frozen "
                                "image features trains)")
        else:
            default = VisionConfig()
            if bad := [flag_of(f) for f in fields(self.vision) if getattr(self.vision, f.name) != getattr(default, f.name)]:
                raise RalmError(f"{bad[0]} is for image data (--data {', '.join(IMAGE_SETS)}), not {self.data}")

    def prompt_config(self) -> PromptConfig:
        """The prompt settings with the named set's template and verbalizer where none is given (validated)."""
        template, words = TEXT_SETS.get(self.data, (self.prompt.template, self.prompt.verbalizer))
        return replace(self.prompt, template=self.template if self.template is not None else template,
                       verbalizer=list(self.verbalizer) if self.verbalizer is not None else list(words))

    def refresh_every(self, steps_per_epoch: int) -> int:
        """Steps between refreshes of the knowledge store (0: never)."""
        r = self.refresh.strip().lower()
        if r == "epoch":
            return steps_per_epoch
        if r == "never":
            return 0
        if not r.isdigit() or int(r) < 1:
            raise RalmError(f"--refresh {self.refresh!r}: choose epoch, never or a number of steps >= 1")
        return int(r)

    @property
    def named(self) -> bool:
        return self.data in TEXT_SETS or self.images

    def data_path(self) -> str | None:
        path = self.data_file if self.named else self.data
        return str(Path(path).resolve()) if path is not None and Path(path).exists() else path

    def resume_key(self) -> dict[str, Any]:
        knn = {k: v for k, v in asdict(self.knn).items() if k != "lmbda"}  # λ is an inference setting
        key = {"format": VERSION, "data": self.data, "data_file": self.data_path(), "shots": self.shots,
               "knn": knn, "refresh": self.refresh, "batch_size": self.batch_size}
        if self.images:  # where the features are cached, in what batches, does not change them
            return {**key, "vision": {k: v for k, v in asdict(self.vision).items()
                                      if k not in ("feature_cache", "feature_batch", "device")}}
        prompt = asdict(self.prompt_config())
        if prompt["demo_norm"] == "raw":  # runs saved before the option had no such key, and were raw
            del prompt["demo_norm"]
        return {**key, "prompt": prompt, "model": self.model, "peft": asdict(self.peft)}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(data=self.data if self.named else self.data_path(), data_file=self.data_path()
                 if self.named else None, out=str(Path(self.out).resolve()), force=False)
        d["lmbda_grid"] = list(self.lmbda_grid)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RetroPromptConfig:
        d = dict(d)
        d.update(prompt=PromptConfig(**d["prompt"]), peft=PeftConfig(**d["peft"]), knn=KNNConfig(**d["knn"]),
                 vision=VisionConfig(**d.get("vision", {})), lmbda_grid=tuple(d["lmbda_grid"]))
        return cls(**d)


@dataclass(frozen=True)
class Draw:
    """The run's data: the few-shot train (the knowledge store's rows, in order) and dev, and the test split."""

    classes: tuple[str, ...]
    split: FewShotSplit
    test: list[Any]


def draw(cfg: RetroPromptConfig) -> Draw:
    """Read the data, check its labels against the verbalizer, draw the few-shot split and check that the
    store can serve ``--k`` and ``--demos``: one-line errors, before any model loads."""
    where = cfg.data_path() or cfg.data
    data: LabelledData = (load_labelled(cfg.data, cfg.data_file) if cfg.named
                          else read_labelled(cfg.data, salt="labelled"))
    classes = IMAGE_SETS[cfg.data] if cfg.images else tuple(cfg.prompt_config().words)
    if missing := [c for c in data.classes if c not in classes]:
        raise RalmError(f"{where}: label {missing[0]!r} is missing from --verbalizer (classes: {', '.join(classes)})")
    if extra := [c for c in classes if c not in data.classes]:
        raise RalmError(f"--verbalizer: class {extra[0]!r} has no examples in {where}")
    try:
        split = few_shot(data.splits["train"], classes, cfg.shots, cfg.seed)
    except RalmError as e:
        raise RalmError(f"--shots {cfg.shots}: {e}") from None
    n, own = len(split.train), int(cfg.knn.leave_self_out)
    if cfg.knn.k > n - own:
        raise RalmError(f"--k {cfg.knn.k}: larger than the knowledge store ({n} training examples"
                        + (", one left out as the query itself)" if own else ")"))
    if cfg.knn.demos > cfg.shots - 1:
        raise RalmError(f"--demos {cfg.knn.demos}: larger than a class of the knowledge store ({cfg.shots} "
                        "examples each, one left out as the query itself in training)")
    test = data.splits["test"][: cfg.test_limit] if cfg.test_limit else data.splits["test"]
    return Draw(classes, split, test)


def write_keys(path: Path, reps: torch.Tensor, step: int) -> None:
    write_safetensors(path, {"reps": reps}, {"format": FORMAT, "version": str(VERSION), "step": str(step)})


def read_keys(path: Path, rows: int, step: int | None = None) -> torch.Tensor:
    """(rows, d) store representations from ``path``; ``step``: the checkpoint they must belong to."""
    try:
        with safe_open(str(path), "pt") as f:
            meta, reps = f.metadata() or {}, f.get_tensor("reps")
    except (SafetensorError, OSError, KeyError) as e:
        raise RalmError(f"{path}: not a RetroPrompt store file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != FORMAT or reps.ndim != 2 or reps.shape[0] != rows:
        raise RalmError(f"{path}: not the knowledge store of this run ({rows} rows expected)")
    if step is not None and meta.get("step") != str(step):
        raise RalmError(f"{path}: holds the store of step {meta.get('step')}, the trainer state is at step {step} "
                        "(killed between the two writes); rerun with --force")
    return reps.float()

