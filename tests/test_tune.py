"""PEFT tuning on document QA for both archs (tiny random Llama, a tiny store of generated SQuAD paragraphs):
the same retrieved chunks, ``ralm tune`` trains only PEFT weights, its run folder reproduces its score through
``ralm eval-task --run``, exact resume, zero-shot, and bad input as one-line errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ralm.data.tasks import load_task
from ralm.datastore.build import BuildConfig, build
from ralm.datastore.chunking import ChunkingConfig
from ralm.datastore.encoders import EncoderConfig
from ralm.datastore.store import Datastore
from ralm.lm.hidden import model_fingerprint
from ralm.lm.presets import tokenizer_fingerprint
from ralm.methods.retro.checkpoint import save_checkpoint
from ralm.methods.retro.model import PAD, RetroConfig, RetroFit
from ralm.methods.task_inputs import IGNORE, TaskEncoder, TaskRetrieval
from squad_data import write_squad

M = 16  # the store's chunk size = the RETRO-fit chunk size
torch.set_num_threads(1)  # tiny models: threads cost more than they give on the shared machine


def small_retro() -> RetroConfig:
    return RetroConfig(chunk_size=M, neighbour_len=2 * M, enc_dim=16, enc_layers=1, enc_heads=2, cca_dim=16,
                       cca_heads=2, cca_layers=[1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    root = tmp_path_factory.mktemp("tune")
    squad = write_squad(root / "squad.json", n_articles=10, n_paras=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(root / "cache"))
        build(BuildConfig(inputs=[str(squad)], out=str(root / "ds"), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(M), encoder=EncoderConfig(name=tiny_encoder, dtype="fp32")),
              progress=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    retro = RetroFit(base, small_retro())
    with torch.no_grad():  # a RETRO-fit that reads its neighbours: CCA outputs off zero
        for n, p in retro.new_parameters().items():
            if n.endswith("out.weight"):
                p.normal_(0, 0.05)
    save_checkpoint(root / "retro", retro, {
        "model": tiny_lm, "model_fingerprint": model_fingerprint(base), "step": 0,
        "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_lm))})
    return root, squad, root / "ds", root / "retro"


def test_gpt_and_retro_see_the_same_chunk_ids(setup, tiny_lm):
    root, squad, ds_path, _ = setup
    ds = Datastore.open(ds_path)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    examples = list(load_task("squad", "train", squad))[:4]
    rows = TaskRetrieval(ds, docs=3).rows(examples)
    assert all(len(r) == 3 for r in rows) and len({tuple(r) for r in rows}) > 1
    gpt = TaskEncoder(tok, "gpt", ds, doc_tokens=8, max_len=120)
    retro = TaskEncoder(tok, "retro", ds, max_len=120, chunk_size=M, neighbour_len=2 * M)
    for ex, r in zip(examples, rows, strict=True):
        g, t = gpt.encode(ex, r, ex.answers[0]), retro.encode(ex, r, ex.answers[0])
        assert g.target == t.target and g.neighbours is None
        for j, row in enumerate(r):  # gpt's prompt holds each chunk's first tokens; retro's neighbours the chunk
            rec = ds.chunk(row)
            head = tok(rec["text"], add_special_tokens=False)["input_ids"][:8]
            assert any(g.prompt[i:i + 8] == head for i in range(len(g.prompt)))
            nb = t.neighbours[j]
            assert nb[nb != PAD].tolist() == (list(rec["tokens"]) + list(rec["continuation"]))[:2 * M]
        assert len(t.prompt) < len(g.prompt)  # retro's prompt carries no passages
    batch = retro.collate([retro.encode(ex, r, ex.answers[0]) for ex, r in zip(examples, rows, strict=True)])
    P = batch["prompt_end"]
    assert P % M == 0 and P >= M
    lab = batch["labels"]
    assert (lab[:, :P] == IGNORE).all() and (lab[:, P] != IGNORE).all()
    B, U, K, R = batch["neighbours"].shape
    assert (B, U, K, R) == (4, batch["input_ids"].shape[1] // M, 3, 2 * M)


# ---- ralm tune / ralm eval-task ------------------------------------------------------------------
def tune_args(setup, tiny_lm, out, arch="gpt", peft="lora", *extra) -> list[str]:
    root, squad, ds, ckpt = setup
    args = ["tune", "--task", "squad", "--task-file", str(squad), "--datastore", str(ds), "--model", tiny_lm,
            "--arch", arch, "--peft", peft, "--out", str(out), "--steps", "4", "--batch-size", "2", "--warmup", "1",
            "--lr", "0.05", "--eval-every", "0", "--save-every", "2", "--docs", "2", "--doc-tokens", "8",
            "--max-len", "96", "--max-new-tokens", "4", "--max-target", "8", "--eval-examples", "3", "--no-bf16",
            "--lora-rank", "2", "--adapter-dim", "4", "--n-virtual", "3", "--json", "--quiet"]
    if arch == "retro":
        args += ["--checkpoint", str(ckpt)]
    return args + list(extra)


def cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from ralm.cli import app

    r = CliRunner().invoke(app, args)
    return r.exit_code, r.output


def base_state(arch, tiny_lm, ckpt) -> dict[str, torch.Tensor]:
    from ralm.methods.retro.checkpoint import load_retrofit

    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model = load_retrofit(ckpt, base, AutoTokenizer.from_pretrained(tiny_lm))[0] if arch == "retro" else base
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(setup, tiny_lm, tmp_path_factory):
    import json

    out = {}
    for arch, peft in (("gpt", "lora"), ("gpt", "prompt"), ("retro", "adapter"), ("retro", "ptuning")):
        path = tmp_path_factory.mktemp("runs") / f"{arch}-{peft}"
        code, text = cli(tune_args(setup, tiny_lm, path, arch, peft))
        assert code == 0, text
        out[arch, peft] = path, json.loads(text.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("key", [("gpt", "lora"), ("gpt", "prompt"), ("retro", "adapter"), ("retro", "ptuning")])
def test_tune_trains_only_peft_weights_and_the_run_reproduces_its_score(setup, tiny_lm, runs, key):
    import json

    from safetensors import safe_open

    path, summary = runs[key]
    arch, peft = key
    meta = json.loads((path / "run.json").read_text())
    assert meta["arch"] == arch and meta["peft"]["method"] == peft and meta["step"] == 4
    assert summary["trainable"] < summary["total"] / 4
    with safe_open(str(path / "peft.safetensors"), "pt") as f:
        names = list(f.keys())
        assert names and all(torch.isfinite(f.get_tensor(n)).all() for n in names)
        if peft in ("lora", "adapter"):  # the zero-initialised half has moved: trained
            assert any(f.get_tensor(n).abs().sum() > 0 for n in names if "lora_B" in n or ".up." in n or "up" in n)
    code, text = cli(["eval-task", "--run", str(path), "--split", "validation", "--limit", "3", "--json"])
    assert code == 0, text
    result = json.loads(text.strip().splitlines()[-1])
    val = meta["validation"]
    for k in ("loss", "em", "f1"):
        assert result[k] == val[k], k
    assert result["predictions"] == val["predictions"]
    assert meta["validation"]["loss"] != pytest.approx(meta_zero_shot_loss(setup, tiny_lm, arch), abs=1e-6)


def meta_zero_shot_loss(setup, tiny_lm, arch) -> float:
    import json

    root, squad, ds, ckpt = setup
    args = ["eval-task", "--zero-shot", "--arch", arch, "--task", "squad", "--task-file", str(squad),
            "--datastore", str(ds), "--model", tiny_lm, "--split", "validation", "--limit", "3", "--docs", "2",
            "--doc-tokens", "8", "--max-len", "96", "--max-new-tokens", "4", "--max-target", "8", "--json"]
    if arch == "retro":
        args += ["--checkpoint", str(ckpt)]
    code, text = cli(args)
    assert code == 0, text
    return json.loads(text.strip().splitlines()[-1])["loss"]


def config_from(args: list[str]):
    """The TuneConfig the CLI would build from ``args`` (through the same generated flags)."""
    from typer.testing import CliRunner

    import ralm.cli_task as ct
    from ralm.cli import app

    seen = {}

    def fake(cfg, progress=True):
        seen["cfg"] = cfg
        return {}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("ralm.tuning.tune.tune", fake)
        CliRunner().invoke(app, [a for a in args if a != "--json"])
    del ct
    return seen["cfg"]


@pytest.mark.parametrize("arch,peft", [("gpt", "adapter"), ("retro", "lora")])
def test_only_peft_parameters_change(setup, tiny_lm, tmp_path, monkeypatch, arch, peft):
    import ralm.tuning.tune as tune_mod

    handles = []
    real = tune_mod.apply_peft

    def spy(model, cfg, a):
        handles.append(real(model, cfg, a))
        return handles[-1]

    monkeypatch.setattr(tune_mod, "apply_peft", spy)
    cfg = config_from(tune_args(setup, tiny_lm, tmp_path / "run", arch, peft))
    before = base_state(arch, tiny_lm, setup[3])
    tune_mod.tune(cfg, progress=False)
    h = handles[0]
    trained = set(h.trainable_names())
    after = h.model.state_dict()
    for name, t in before.items():  # every base (and RetroFit) weight, under its name with PEFT in place
        cand = [n for n in after if n == name or n.replace("base_layer.", "") == name]
        assert cand and all(n not in trained for n in cand), name
        assert torch.equal(after[cand[0]], t), name
    assert any(not torch.equal(p, 0 * p) for n, p in h.state_dict().items() if "lora_B" in n or "up" in n)


def test_kill_and_resume_gives_the_uninterrupted_weights(setup, tiny_lm, runs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import ralm.tuning.tune as tune_mod

    cfg = config_from(tune_args(setup, tiny_lm, tmp_path / "run", "gpt", "lora"))
    real, calls = tune_mod.target_loss, {"n": 0}

    def crash_at_step_3(handle, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(handle, batch)

    monkeypatch.setattr(tune_mod, "target_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tune_mod.tune(cfg, progress=False)
    monkeypatch.setattr(tune_mod, "target_loss", real)
    summary = tune_mod.tune(cfg, progress=False)
    assert summary["resumed_at_step"] == 2
    want = load_file(str(runs["gpt", "lora"][0] / "peft.safetensors"))
    got = load_file(str(tmp_path / "run" / "peft.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_training_retrieves_only_the_examples_its_steps_draw(setup, tiny_lm, tmp_path, monkeypatch):
    import ralm.tuning.tune as tune_mod
    from ralm.methods.task_inputs import TaskRetrieval

    asked, real = [], TaskRetrieval.rows

    def spy(self, examples):
        asked.extend(e.id for e in examples)
        return real(self, examples)

    monkeypatch.setattr(TaskRetrieval, "rows", spy)
    cfg = config_from(tune_args(setup, tiny_lm, tmp_path / "run", "gpt", "lora"))
    tune_mod.tune(cfg, progress=False)
    train = tune_mod.load_splits(cfg.task, cfg.task_file, seed=cfg.seed)["train"]
    order = list(range(len(train)))
    drawn = {train[i].id for step in range(cfg.steps) for i in tune_mod.loop.step_items(order, step, 2, cfg.seed)}
    asked_train = [i for i in asked if i in {e.id for e in train}]
    assert len(train) > len(drawn)  # the fixture has more training examples than 4 steps of 2 draw
    assert sorted(asked_train) == sorted(drawn)  # each drawn example retrieved once, no other


# ---- bad input: one-line errors ------------------------------------------------------------------
def invoke(args: list[str]):
    from typer.testing import CliRunner

    from ralm.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("change,needle", [
    (["--peft", "bitfit"], "--peft 'bitfit': unknown method"),
    (["--arch", "t5"], "--arch 't5': unknown"),
    (["--task", "wikiqa"], "unknown task 'wikiqa'"),
    (["--lora-rank", "0"], "--lora-rank 0: must be >= 1"),
    (["--docs", "-1"], "--docs -1"),
])
def test_bad_flags_are_one_line_errors(setup, tiny_lm, tmp_path, change, needle):
    from badinput import fails

    args = tune_args(setup, tiny_lm, tmp_path / "run")
    i = args.index(change[0])
    args[i + 1] = change[1]
    fails(invoke(args), needle)
    assert not (tmp_path / "run").exists()  # refused before the folder is made


def test_retro_without_checkpoint(setup, tiny_lm, tmp_path):
    from badinput import fails

    fails(invoke(tune_args(setup, tiny_lm, tmp_path / "run", "gpt", "lora", "--arch", "retro")),
          "--arch retro needs --checkpoint")
    root, squad, ds, _ = setup
    fails(invoke(["eval-task", "--zero-shot", "--arch", "retro", "--task", "squad", "--task-file", str(squad),
                  "--datastore", str(ds), "--model", tiny_lm]), "--arch retro needs --checkpoint")
    fails(invoke(["eval-task", "--split", "test"]), "give --run RUN or --zero-shot")
    fails(invoke(tune_args(setup, tiny_lm, tmp_path / "run", "retro", "lora", "--docs", "0")),
          "--docs 0: --arch retro reads the retrieved chunks")


def test_more_virtual_tokens_than_the_context(setup, tiny_lm, tmp_path):
    from badinput import fails

    fails(invoke(tune_args(setup, tiny_lm, tmp_path / "a", "gpt", "prompt", "--n-virtual", "500")),
          "--n-virtual 500", only=False)
    fails(invoke(tune_args(setup, tiny_lm, tmp_path / "b", "gpt", "prompt", "--n-virtual", "40")),
          "--max-len 96 with --n-virtual 40 needs 136 positions; the model's context holds 128", only=False)


def test_retro_checkpoint_for_another_base_model(setup, tiny_lm, tmp_path):
    from transformers import LlamaForCausalLM

    from badinput import fails

    torch.manual_seed(1)
    other = LlamaForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_lm).config)
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "other")
    args = tune_args(setup, tiny_lm, tmp_path / "run", "retro", "lora")
    args[args.index("--model") + 1] = str(tmp_path / "other")
    fails(invoke(args), "trained on base model", only=False)


def test_malformed_task_file(setup, tiny_lm, tmp_path):
    from badinput import fails

    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.1", "data": [{"title": "A"', encoding="utf-8")
    args = tune_args(setup, tiny_lm, tmp_path / "run")
    args[args.index("--task-file") + 1] = str(bad)
    fails(invoke(args), str(bad), only=False)


# ---- summaries and multiple choice -----------------------------------------------------------------
@pytest.fixture(scope="module")
def other_tasks(setup, tmp_path_factory, tiny_tokenizer, tiny_encoder):
    import json
    import random

    from conftest import make_text
    from test_tasks import write_tqa

    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(3)
    papers = [(p, s) for p, s in zip("ABCDEF", ["train"] * 3 + ["validation"] * 2 + ["test"], strict=True)]
    with open(root / "aclsum.jsonl", "w", encoding="utf-8") as f:
        for pid, split in papers:
            f.write(json.dumps({"id": pid, "split": split, "title": f"Paper {pid}",
                                "summary": {a: make_text(rng, 6) for a in ("challenge", "approach", "outcome")},
                                "sections": {s: [make_text(rng, 5)] for s in ("abstract", "introduction",
                                                                                 "conclusion")},
                                "text": make_text(rng, 60)}) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(root / "cache"))
        build(BuildConfig(inputs=[str(root / "aclsum.jsonl")], out=str(root / "ds"), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(M), encoder=EncoderConfig(name=tiny_encoder, dtype="fp32")),
              progress=False)
    return root / "aclsum.jsonl", root / "ds", write_tqa(root / "tqa.jsonl", n=12)


def test_aclsum_retrieves_only_the_papers_own_chunks_and_reproduces_rouge(setup, tiny_lm, other_tasks, tmp_path):
    import json

    acl, ds_path, _ = other_tasks
    ds = Datastore.open(ds_path)
    examples = list(load_task("aclsum", "validation", acl))
    for ex, rows in zip(examples, TaskRetrieval(ds, docs=3).rows(examples), strict=True):
        assert len(rows) == 3 and {ds.chunk(r)["doc_id"] for r in rows} == {ex.paper_id}
    args = tune_args(setup, tiny_lm, tmp_path / "run", "retro", "lora")
    for flag, value in (("--task", "aclsum"), ("--task-file", str(acl)), ("--datastore", str(ds_path))):
        args[args.index(flag) + 1] = value
    code, text = cli(args)
    assert code == 0, text
    val = json.loads((tmp_path / "run" / "run.json").read_text())["validation"]
    assert {"rouge1", "rouge2", "rougeL", "loss"} <= set(val)
    code, text = cli(["eval-task", "--run", str(tmp_path / "run"), "--split", "validation", "--limit", "3", "--json"])
    assert code == 0, text
    result = json.loads(text.strip().splitlines()[-1])
    assert all(result[k] == val[k] for k in ("rouge1", "rouge2", "rougeL", "loss"))


@pytest.mark.parametrize("arch", ["gpt", "retro"])
def test_multiple_choice_zero_shot_and_tuned(setup, tiny_lm, other_tasks, tmp_path, arch):
    import json

    root, squad, ds, ckpt = setup
    _, _, tqa = other_tasks
    store = ["--datastore", str(ds)] if arch == "retro" else []  # gpt: no store, no chunks
    ck = ["--checkpoint", str(ckpt)] if arch == "retro" else []
    code, text = cli(["eval-task", "--zero-shot", "--arch", arch, "--task", "truthfulqa-mc", "--task-file", str(tqa),
                      "--model", tiny_lm, "--split", "validation", "--docs", "2", "--max-len", "96", *store, *ck,
                      "--json"])
    assert code == 0, text
    zs = json.loads(text.strip().splitlines()[-1])
    assert {"acc", "acc_sum", "acc_per_token", "acc_per_byte"} <= set(zs) and zs["acc"] == zs["acc_per_byte"]
    args = tune_args(setup, tiny_lm, tmp_path / "run", arch, "adapter")
    args[args.index("--task") + 1], args[args.index("--task-file") + 1] = "truthfulqa-mc", str(tqa)
    if arch == "gpt":
        i = args.index("--datastore")
        del args[i:i + 2]
    code, text = cli(args)
    assert code == 0, text
    code, text = cli(["eval-task", "--run", str(tmp_path / "run"), "--split", "validation", "--limit", "3"])
    assert code == 0 and text.startswith("truthfulqa-mc validation (3 examples)") and "acc" in text, text


@pytest.mark.parametrize("arch", ["gpt", "retro"])
def test_a_rows_score_does_not_depend_on_its_batch(setup, tiny_lm, arch):
    from ralm.methods.task_model import PlainHandle, TaskSettings, build_base, encoder_for, score

    root, squad, ds_path, ckpt = setup
    net, tok, ds, _ = build_base(arch, tiny_lm, str(ckpt) if arch == "retro" else None, str(ds_path))
    examples = list(load_task("squad", "train", squad))[:5]
    out = []
    for b in (1, 5):
        s = TaskSettings(docs=2, doc_tokens=8, max_len=96, max_target=8, max_new_tokens=3, batch_size=b)
        out.append(score(PlainHandle(net), encoder_for(net, tok, arch, ds, s), TaskRetrieval(ds, 2), examples, s))
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], abs=1e-4)
    assert out[0]["predictions"] == out[1]["predictions"]


def test_a_run_refuses_a_changed_base_model(setup, tiny_lm, runs, tmp_path):
    import json
    import shutil

    from badinput import fails

    run = tmp_path / "run"
    shutil.copytree(runs["gpt", "lora"][0], run)
    meta = json.loads((run / "run.json").read_text())
    meta["model_fingerprint"] = "0" * 16
    (run / "run.json").write_text(json.dumps(meta))
    fails(invoke(["eval-task", "--run", str(run), "--split", "validation"]), "tuned on other weights", only=False)


def test_task_retrieval_over_served_stores_equals_the_directories(setup, tiny_lm, other_tasks):
    """Issue 16: tune / eval-task with `--datastore http://HOST:PORT/NAME` (two stores on one service): the same
    rows (SQuAD's search, ACLSum's search of the paper's own chunks) and the same model inputs."""
    from ralm.errors import RalmError
    from ralm.serve.app import create_app
    from ralm.serve.client import open_store
    from ralm.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    _, squad, ds_path, _ = setup
    acl, acl_ds, _ = other_tasks
    local = {"squad": Datastore.open(ds_path), "acl": Datastore.open(acl_ds)}
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    with ThreadServer(create_app(local, ServeConfig())) as srv:
        for name, task, path, split in (("squad", "squad", squad, "train"), ("acl", "aclsum", acl, "validation")):
            examples = list(load_task(task, split, path))[:4]
            remote = open_store(f"{srv.url}/{name}")
            want = TaskRetrieval(local[name], docs=3).rows(examples)
            assert TaskRetrieval(remote, docs=3).rows(examples) == want and all(want)
            for arch in ("gpt", "retro"):
                encoders = [TaskEncoder(tok, arch, ds, doc_tokens=8, max_len=400, chunk_size=M, neighbour_len=2 * M)
                            for ds in (local[name], remote)]
                for ex, rows in zip(examples, want, strict=True):
                    a, b = (e.encode(ex, rows, None) for e in encoders)
                    assert a.prompt == b.prompt and (a.neighbours is None or torch.equal(a.neighbours, b.neighbours))
        with pytest.raises(RalmError, match="serves 2 stores"):
            open_store(srv.url)
