"""The shared training loop (issue 12, "one trainer") on a tiny module with a LoRA-like update injected INTO
its frozen base: only requires_grad parameters train and are saved, AdamW's groups, the schedule, clipping,
periodic evaluation, and a kill-and-resume that gives bit-identical weights (mapped by name)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ralm.errors import IncompatibleError, RalmError
from ralm.methods.retro.model import RetroConfig, RetroFit
from ralm.tuning import loop
from ralm.tuning.loop import TrainConfig


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable low-rank update injected into it, as LoRA does."""

    def __init__(self, base: nn.Linear, swap: bool = False) -> None:
        super().__init__()
        self.base = base
        a, b = torch.randn(2, base.in_features) * 0.3, torch.randn(base.out_features, 2) * 0.3
        if swap:  # the same parameters registered in the other order
            self.lora_b, self.lora_a = nn.Parameter(b), nn.Parameter(a)
        else:
            self.lora_a, self.lora_b = nn.Parameter(a), nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


class Tiny(nn.Module):
    """A frozen base (linear, tanh, dropout, linear) with LoRA injected into its first layer, a 1-d scale and a
    position-bias-like matrix the model exempts from weight decay."""

    def __init__(self, swap: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(OrderedDict([("inp", nn.Linear(8, 16)), ("act", nn.Tanh()),
                                               ("drop", nn.Dropout(0.3)), ("out", nn.Linear(16, 4))]))
        for p in self.body.parameters():
            p.requires_grad_(False)  # the base is frozen by whoever builds the model
        self.body.inp = LoRALinear(self.body.inp, swap)
        scale, pos = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4, 4))
        if swap:
            self.pos, self.scale = pos, scale
        else:
            self.scale, self.pos = scale, pos

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x) * self.scale
        return h + h @ self.pos


FROZEN = {"body.inp.base.weight", "body.inp.base.bias", "body.out.weight", "body.out.bias"}
TRAINED = {"body.inp.lora_a", "body.inp.lora_b", "scale", "pos"}


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 8, "lr": 5e-2, "warmup": 2, "weight_decay": 0.1, "eval_every": 3,
                          "save_every": 2, "bf16": False, **kw})


def task(crash_at: int | None = None, key: str = "tiny", **kw) -> loop.Task:
    """Random classification batches, a function of the step alone; ``crash_at``: the training loss call that
    raises, as a kill would."""
    calls = []

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + step)
        return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)

    def loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        x, y = b
        return F.cross_entropy(model(x), y), len(y)

    return loop.Task(name="tiny", batch=batch, loss=loss, resume_key={"task": key}, **kw)


def run(model: nn.Module, c: TrainConfig, t: loop.Task, out) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = loop.resume_state(out, c, t.name, t.resume_key)
    return loop.train(model, c, t, out, state=state, progress=False)


def log(out) -> list[dict]:
    rows = [json.loads(x) for x in (out / loop.LOG).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tokens_per_second", "elapsed_s")} for r in rows]


def state_tensors(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["ralm"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_only_requires_grad_parameters_change_and_only_they_are_saved(tmp_path):
    model, saved = Tiny(), []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(loop.trainable(model)) == TRAINED and set(before) == TRAINED | FROZEN
    summary = run(model, cfg(), task(save=lambda out, step: saved.append(step)), tmp_path)
    after = dict(model.named_parameters())
    for n in FROZEN:
        assert torch.equal(after[n], before[n]), f"frozen {n} changed"
    for n in TRAINED:
        assert not torch.equal(after[n], before[n]), f"trained {n} did not move"
    head, tensors = state_tensors(tmp_path / loop.STATE)
    assert {k[8:] for k in tensors if k.startswith("weights.")} == TRAINED  # never the frozen base
    assert {k[10:].rpartition(".")[0] for k in tensors if k.startswith("optimizer.")} == TRAINED
    for n in TRAINED:
        assert torch.equal(tensors[f"weights.{n}"], after[n])
    assert saved == [2, 4, 6, 8] and head["step"] == 8  # the task's own checkpoint, after each state
    assert summary["steps"] == 8 and summary["trained_tokens"] == 48 and summary["resumed_at_step"] == 0
    assert [r["step"] for r in log(tmp_path)] == list(range(1, 9))


def test_weight_decay_only_on_matrices_the_model_does_not_exempt():
    model = Tiny()
    opt = loop.optimizer(model, loop.trainable(model), cfg(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in opt.param_groups]
    assert groups == [({"body.inp.lora_a", "body.inp.lora_b"}, 0.1), ({"scale", "pos"}, 0.0)]
    assert opt.defaults["betas"] == loop.BETAS


def test_retrofit_groups_are_the_ones_it_had_before_the_shared_loop():
    """RETRO-fit decayed its new matrices except the relative-position biases (``.rel``); it still does."""
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = RetroFit(base, RetroConfig(chunk_size=8, neighbour_len=16, enc_dim=16, enc_layers=1, enc_heads=2,
                                       cca_dim=16, cca_heads=2))
    params = loop.trainable(model)
    assert params == model.new_parameters()  # the frozen LM is nowhere in it
    opt = loop.optimizer(model, params, cfg())
    old = [n for n, p in params.items() if p.ndim >= 2 and not n.endswith(".rel")]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(params[n]) for n in old]
    assert any(n.endswith(".rel") for n in params) and model.no_weight_decay()
    model.train()
    assert model.training and not model.base.training  # the frozen LM keeps inference behaviour


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor(tmp_path):
    assert [loop.lr_lambda(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert loop.lr_lambda(4, 4, 20) == 1.0
    assert loop.lr_lambda(12, 4, 20) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert loop.lr_lambda(20, 4, 20) == pytest.approx(0.1) and loop.lr_lambda(99, 4, 20) == pytest.approx(0.1)
    assert loop.lr_lambda(20, 4, 20, floor=0.0) == pytest.approx(0.0)
    c = cfg(warmup=3, min_lr_ratio=0.2)
    run(Tiny(), c, task(), tmp_path)
    # each row logs the rate of the next step (the scheduler has stepped)
    assert [r["lr"] for r in log(tmp_path)] == pytest.approx([c.lr * loop.lr_lambda(s, 3, 8, 0.2) for s in range(1, 9)])


def test_clipping_bounds_the_gradient_norm(tmp_path, monkeypatch):
    seen, real = [], torch.optim.AdamW.step

    def step(self, *a, **kw):
        seen.append(float(torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad) for g in self.param_groups for p in g["params"]]))))
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run(Tiny(), cfg(grad_clip=1e-3), task(), tmp_path)
    logged = [r["grad_norm"] for r in log(tmp_path)]
    assert len(seen) == 8 and max(seen) <= 1e-3 * (1 + 1e-4)  # what the optimiser saw was clipped
    assert min(logged) > 1e-3  # the log keeps the norm before clipping


def test_evaluation_runs_every_eval_every_steps_and_at_the_end(tmp_path):
    calls = []

    def evaluate(model):
        calls.append((model.training, torch.is_grad_enabled()))
        return {"eval_value": len(calls)}

    summary = run(Tiny(), cfg(eval_every=3), task(evaluate=evaluate), tmp_path)
    assert calls == [(False, False)] * 3  # steps 3, 6 and the last, in eval mode without gradients
    assert {r["step"]: r["eval_value"] for r in log(tmp_path) if "eval_value" in r} == {3: 1, 6: 2, 8: 3}
    assert summary["eval_value"] == 3
    calls.clear()
    run(Tiny(), cfg(eval_every=0), task(evaluate=evaluate), tmp_path / "end-only")
    assert len(calls) == 1


@pytest.mark.parametrize("swap", [False, True])
def test_kill_and_resume_gives_the_uninterrupted_weights_bit_for_bit(tmp_path, swap):
    """Run 8 steps; run 5 and die before the 6th (the last state is step 4), rebuild everything (the resumed
    model lists its parameters in another order when ``swap``) and resume to 8: the same weights, exactly."""
    whole = Tiny()
    run(whole, cfg(), task(), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(Tiny(), cfg(), task(crash_at=6), tmp_path / "resumed")
    assert [r["step"] for r in log(tmp_path / "resumed")] == [1, 2, 3, 4, 5]  # step 5 logged, not saved
    resumed = Tiny(swap=swap)
    torch.manual_seed(123)  # whatever the new process drew before: the state's RNG takes over
    summary = run(resumed, cfg(), task(), tmp_path / "resumed")
    assert summary["resumed_at_step"] == 4 and summary["trained_tokens"] == 48
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    for n in TRAINED | FROZEN:
        assert torch.equal(a[n], b[n]), f"{n} differs after resuming"
    assert log(tmp_path / "whole") == log(tmp_path / "resumed")


def test_a_resumption_with_other_settings_is_refused(tmp_path):
    run(Tiny(), cfg(steps=4), task(), tmp_path)
    with pytest.raises(RalmError, match="already trained for 4 steps; raise --steps"):
        run(Tiny(), cfg(steps=4), task(), tmp_path)
    for c, t in [(cfg(steps=6), task(key="other")), (cfg(steps=6, lr=1e-3), task()), (cfg(steps=6, seed=1), task())]:
        with pytest.raises(RalmError, match="other settings.*--force"):
            run(Tiny(), c, t, tmp_path)
    with pytest.raises(RalmError, match="other base-model weights than 'tiny-base'"):
        run(Tiny(), cfg(steps=6), task(base_fingerprints=("abc",), base_name="tiny-base"), tmp_path)
    # steps may grow, clipping and the evaluation/saving cadence may change
    assert run(Tiny(), cfg(steps=6, grad_clip=0.5, save_every=3), task(), tmp_path)["steps"] == 6


def test_a_state_for_other_trained_parameters_is_refused(tmp_path):
    run(Tiny(), cfg(steps=2), task(), tmp_path)
    model = Tiny()
    model.extra = nn.Parameter(torch.zeros(3))
    before = model.scale.detach().clone()
    with pytest.raises(RalmError, match=r"does not fit this run's trained parameters \(missing \['extra'\]"):
        run(model, cfg(steps=4), task(), tmp_path)
    assert torch.equal(model.scale, before)  # nothing was loaded


def test_a_state_of_the_previous_format_is_refused_with_force(tmp_path):
    """RETRO-fit's format-2 state numbered optimiser tensors by position: refused in one line, not misread."""
    run(Tiny(), cfg(steps=2), task(), tmp_path)
    path = tmp_path / loop.STATE
    head, tensors = state_tensors(path)
    save_file(tensors, str(path), metadata={"ralm": json.dumps({**head, "format": "ralm-retrofit-trainer",
                                                                "version": 2})})
    with pytest.raises(IncompatibleError, match="trainer state format 2, this ralm reads 3; rerun with --force"):
        run(Tiny(), cfg(steps=4), task(), tmp_path)


def test_nothing_to_train_is_refused(tmp_path):
    model = Tiny().requires_grad_(False)
    with pytest.raises(RalmError, match="tiny: no parameter of the model requires grad"):
        run(model, cfg(), task(), tmp_path)


@pytest.mark.parametrize(("kw", "flag"), [
    ({"steps": 0}, "--steps 0"), ({"lr": 0.0}, "--lr"), ({"lr": math.nan}, "--lr"), ({"lr": math.inf}, "--lr"),
    ({"warmup": -1}, "--warmup"), ({"weight_decay": -0.1}, "--weight-decay"), ({"grad_clip": 0.0}, "--grad-clip"),
    ({"eval_every": -1}, "--eval-every"), ({"save_every": -2}, "--save-every"),
    ({"min_lr_ratio": 1.5}, "--min-lr-ratio"),
])
def test_a_bad_setting_is_one_line_naming_its_flag(kw, flag):
    with pytest.raises(RalmError) as e:
        TrainConfig(**kw)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_the_loop_options_keep_the_names_the_cli_flags_come_from():
    assert [(f.name, f.default) for f in fields(TrainConfig)] == [
        ("steps", 1000), ("lr", 2e-4), ("warmup", 50), ("weight_decay", 0.01), ("grad_clip", 1.0),
        ("eval_every", 100), ("save_every", 100), ("bf16", None), ("seed", 0), ("min_lr_ratio", 0.1)]
    assert all(f.metadata.get("help") for f in fields(TrainConfig))
