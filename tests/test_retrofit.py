"""RETRO-fit training, checkpoints, resumption and evaluation on a tiny random LM and a tiny store."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import write_corpus
from ralm.cli import app
from ralm.datastore.build import build
from ralm.datastore.chunking import ChunkingConfig
from ralm.errors import IncompatibleError, RalmError
from ralm.eval.lm import LMEvalConfig
from ralm.eval.runner import EvalLMConfig, run_eval_lm
from ralm.methods.retro.checkpoint import load_retrofit
from ralm.methods.retro.method import RetroRunConfig
from ralm.methods.retro.model import RetroConfig
from ralm.tuning.retrofit import RetrofitConfig, retrofit

M = 16  # the conftest store's chunk size


def small_retro(**kw) -> RetroConfig:
    return RetroConfig(**{"chunk_size": M, "neighbour_len": 2 * M, "enc_dim": 16, "enc_layers": 1, "enc_heads": 2,
                          "cca_dim": 16, "cca_heads": 2, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.encoders import EncoderConfig

    root = tmp_path_factory.mktemp("retrofit")
    corpus = write_corpus(root / "corpus.jsonl", n_docs=12, words=90)
    held = write_corpus(root / "held.jsonl", n_docs=2, words=90, seed=7, prefix="h")
    ds = root / "ds"
    build(BuildConfig(inputs=[str(corpus)], out=str(ds), tokenizer=tiny_tokenizer, chunking=ChunkingConfig(M),
                      encoder=EncoderConfig(name=tiny_encoder, dtype="fp32")), progress=False)
    return root, corpus, held, ds


def train_cfg(setup, tiny_lm, out, **kw) -> RetrofitConfig:
    root, corpus, held, ds = setup
    base = dict(datastore=str(ds), train=[str(corpus)], out=str(out), model=tiny_lm, eval=[str(held)],
                retro=small_retro(), steps=4, batch_size=2, seq_len=64, warmup=1, eval_every=2, save_every=2,
                eval_windows=2, lr=1e-2, bf16=False)
    return RetrofitConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(setup, tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    summary = retrofit(train_cfg(setup, tiny_lm, out), progress=False)
    return out, summary


def test_training_changes_only_the_new_layers(trained, tiny_lm):
    out, summary = trained
    assert summary["steps"] == 4 and summary["trained_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert 0 < summary["new_share"] < 1 and "eval_ppl_on" in summary
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model, meta = load_retrofit(out, base, tok)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_lm)
    for (name, p), (_, q) in zip(model.base.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), f"base weight {name} changed"
    outs = [v for k, v in model.new_state_dict().items() if k.endswith("attn.out.weight") and k.startswith("cca.")]
    assert outs and all(v.abs().sum() > 0 for v in outs)  # the zero-initialised outputs moved
    assert meta["step"] == 4
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "eval_loss_on" in log[1]


def test_checkpoint_round_trip_reproduces_logits(trained, tiny_lm, setup):
    out, _ = trained
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    a, _ = load_retrofit(out, AutoModelForCausalLM.from_pretrained(tiny_lm), tok)
    b, _ = load_retrofit(out, AutoModelForCausalLM.from_pretrained(tiny_lm), tok)
    ids = torch.randint(0, 50, (1, 48))
    nb = torch.randint(0, 50, (1, 3, 2, 2 * M))
    with torch.no_grad():
        la, lb = a(ids, neighbours=nb).logits, b(ids, neighbours=nb).logits
        assert torch.equal(la, lb)
        assert not torch.equal(la, a(ids).logits)  # trained layers read the neighbours


def kill_after_step_2(monkeypatch, cfg: RetrofitConfig) -> None:
    """Run ``cfg`` until the third training step raises (after the step-2 checkpoint), as a kill would."""
    import ralm.tuning.retrofit as rf

    real, calls = rf.batch_loss, []

    def crash_at_step_3(model, *a, **kw):
        calls.extend([1] if model.training else [])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, *a, **kw)

    monkeypatch.setattr(rf, "batch_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):  # killed after the step-2 checkpoint
        retrofit(cfg, progress=False)
    monkeypatch.setattr(rf, "batch_loss", real)


def test_resume_continues_exactly_where_it_stopped(setup, tiny_lm, tmp_path, trained, monkeypatch):
    out = tmp_path / "resumed"
    kill_after_step_2(monkeypatch, train_cfg(setup, tiny_lm, out))
    (out / "train_log.jsonl").open("a").write(json.dumps({"step": 3, "loss": 0.0}) + "\n")  # logged, not saved
    summary = retrofit(train_cfg(setup, tiny_lm, out), progress=False)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert summary["steps"] == 4
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    a, _ = load_retrofit(out, AutoModelForCausalLM.from_pretrained(tiny_lm), tok)
    b, _ = load_retrofit(trained[0], AutoModelForCausalLM.from_pretrained(tiny_lm), tok)
    for (k, x), (_, y) in zip(a.new_state_dict().items(), b.new_state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=f"{k} differs after resuming")
    with pytest.raises(RalmError, match="already trained for 4 steps"):
        retrofit(train_cfg(setup, tiny_lm, out, steps=4), progress=False)
    with pytest.raises(RalmError, match="other settings"):
        retrofit(train_cfg(setup, tiny_lm, out, steps=6, lr=1e-3), progress=False)
    edit_trainer_state(out / "trainer.safetensors", model_fingerprint="0" * 16)
    with pytest.raises(RalmError, match="other base-model weights"):
        retrofit(train_cfg(setup, tiny_lm, out, steps=6), progress=False)


def edit_trainer_state(path, **changes) -> None:
    """Rewrite keys of a trainer state's JSON header (its tensors and their checksum stay as they were)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        head, tensors = json.loads(f.metadata()["ralm"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for key, value in changes.items():
        if value is None:
            del head[key]
        else:
            head[key] = value
    save_file(tensors, str(path), metadata={"ralm": json.dumps(head)})


def test_eval_lm_retro_off_and_untrained_equal_the_plain_lm(setup, tiny_lm, tmp_path, trained):
    root, corpus, held, ds = setup
    lmcfg = LMEvalConfig(context=64, window_stride=24)
    none = run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], lm=lmcfg), progress=False)
    off = run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], method="retro", lm=lmcfg,
                                   options={"retro": RetroRunConfig(str(trained[0]), retrieval="off")}), progress=False)
    assert off["ppl"] == none["ppl"] and off["tokens"] == none["tokens"]
    on = run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], method="retro",
                                  options={"retro": RetroRunConfig(str(trained[0]))}, lm=lmcfg, leakage_report=True),
                     progress=False)
    assert on["datastore"] == str(ds.resolve()) and on["tokens"] == none["tokens"] and on["ppl"] != none["ppl"]
    assert on["leakage"]["buckets"]
    # a checkpoint saved before any step is the untrained model: retrieval on equals the plain LM
    untrained = tmp_path / "untrained"
    _save_untrained(untrained, tiny_lm)
    zero = run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], method="retro",
                                    options={"retro": RetroRunConfig(str(untrained))}, datastore=str(ds), lm=lmcfg),
                       progress=False)
    assert zero["ppl"] == none["ppl"]


def _save_untrained(path, tiny_lm) -> None:
    from ralm.lm.hidden import model_fingerprint
    from ralm.lm.presets import tokenizer_fingerprint
    from ralm.methods.retro.checkpoint import save_checkpoint
    from ralm.methods.retro.model import RetroFit

    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    save_checkpoint(path, RetroFit(base, small_retro()), {
        "model": tiny_lm, "model_fingerprint": model_fingerprint(base), "step": 0,
        "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_lm))})


def test_checkpoint_for_another_base_model_is_refused(trained, tiny_lm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(**{**AutoModelForCausalLM.from_pretrained(tiny_lm).config.to_dict()}))
    with pytest.raises(IncompatibleError, match="trained on base model"):
        load_retrofit(trained[0], other, AutoTokenizer.from_pretrained(tiny_lm))


def test_checkpoint_of_another_format_version_is_refused(trained, tiny_lm, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained[0], old, ignore=shutil.ignore_patterns("neighbours", "trainer.pt"))
    meta = json.loads((old / "retro.json").read_text())
    (old / "retro.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(IncompatibleError, match="checkpoint format 1.*retrain"):
        load_retrofit(old, AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm))


def test_chunk_size_mismatch_with_the_store(setup, tiny_lm, tmp_path):
    with pytest.raises(IncompatibleError, match="16-token chunks.*chunk size is 8"):
        retrofit(train_cfg(setup, tiny_lm, tmp_path / "o", retro=small_retro(chunk_size=8, neighbour_len=16),
                           seq_len=64), progress=False)


def test_a_precomputed_neighbours_cache_serves_a_new_run(setup, tiny_lm, tmp_path, trained):
    summary = retrofit(train_cfg(setup, tiny_lm, tmp_path / "new" / "run", steps=1,
                                 neighbours=str(trained[0] / "neighbours")), progress=False)
    assert summary["steps"] == 1 and (tmp_path / "new" / "run" / "retro.json").exists()
    assert not (tmp_path / "new" / "run" / "neighbours").exists()  # read from the given cache


def test_missing_neighbours_cache(setup, tiny_lm, tmp_path):
    with pytest.raises(RalmError, match="missing neighbours cache"):
        retrofit(train_cfg(setup, tiny_lm, tmp_path / "o", neighbours=str(tmp_path / "nowhere")), progress=False)


@pytest.mark.parametrize(("kw", "match"), [({"seq_len": 60}, "multiple of the chunk size"), ({"steps": 0}, "--steps"),
                                           ({"lr": 0.0}, "--lr"), ({"train": []}, "--train")])
def test_bad_training_config(setup, tiny_lm, tmp_path, kw, match):
    with pytest.raises(RalmError, match=match):
        train_cfg(setup, tiny_lm, tmp_path / "o", **kw)


def test_cli_errors_are_one_line(setup, tiny_lm, tmp_path, trained):
    root, corpus, held, ds = setup
    runner = CliRunner()
    res = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "retro"])
    assert res.exit_code == 2 and "needs --checkpoint" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held), "--method", "retro",
                              "--checkpoint", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no such checkpoint" in res.output
    res = runner.invoke(app, ["retrofit", "--model", tiny_lm, "--datastore", str(ds), "--train", str(corpus),
                              "--out", str(tmp_path / "o"), "--chunk-size", "8", "-q"])
    assert res.exit_code == 2 and "chunk size is 8" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["retrofit", "--model", tiny_lm, "--datastore", str(ds), "--train", str(corpus),
                              "--out", str(tmp_path / "o"), "--cca-layers", "a,b", "-q"])
    assert res.exit_code == 2 and "--cca-layers" in res.output


def test_generate_retrieves_at_chunk_boundaries(setup, tiny_lm, trained, tmp_path):
    from ralm.datastore.store import Datastore
    from ralm.generate import GenerateConfig, generate
    from ralm.methods.retro.model import RetroFit

    root, corpus, held, ds_path = setup
    ds = Datastore.open(ds_path)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    prompt = json.loads(held.read_text().splitlines()[0])["text"][:60]
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    plain = generate(base, tok, prompt, GenerateConfig(max_new_tokens=20))
    ref = base.generate(torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]]),
                        max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert plain["continuation"] == tok.decode(ref[0, n_prompt:], skip_special_tokens=True)
    # an untrained RETRO-fit generates exactly what the plain LM does, retrieving at every chunk boundary
    untrained = RetroFit(base, small_retro()).eval()
    got = generate(base, tok, prompt, GenerateConfig(method="retro", max_new_tokens=20), ds=ds, retro=untrained)
    untrained.remove_hooks()
    assert got["continuation"] == plain["continuation"]
    assert [r["position"] for r in got["retrievals"]] == list(range(M, n_prompt + got["new_tokens"], M))
    assert all(len(r["neighbours"]) == 2 for r in got["retrievals"])
    ic = generate(base, tok, prompt, GenerateConfig(method="in-context", max_new_tokens=20, stride=8), ds=ds)
    assert [r["position"] for r in ic["retrievals"]] == [n_prompt, n_prompt + 8, n_prompt + 16]


def test_generate_cli(setup, tiny_lm, trained):
    root, corpus, held, ds = setup
    res = CliRunner().invoke(app, ["generate", "--model", tiny_lm, "--method", "retro", "--checkpoint",
                                   str(trained[0]), "--max-new-tokens", "8", "--json", "the"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["method"] == "retro" and out["new_tokens"] >= 1
    res = CliRunner().invoke(app, ["generate", "--model", tiny_lm, "--method", "in-context", "the"])
    assert res.exit_code == 2 and "needs --datastore" in res.output


def test_same_doc_fraction_lets_training_chunks_find_themselves(setup, tiny_lm, tmp_path):
    from ralm.methods.retro.neighbours import NeighbourCache
    from ralm.tuning.retrofit import same_doc_docs

    assert same_doc_docs(["a", "b", "c", "d"], 0.5, 0) == same_doc_docs(["a", "b", "c", "d"], 0.5, 0)
    assert len(same_doc_docs(["a", "b", "c", "d"], 0.5, 0)) == 2 and not same_doc_docs(["a"], 0.0, 0)
    out = tmp_path / "own"
    retrofit(train_cfg(setup, tiny_lm, out, steps=1, same_doc_fraction=1.0, eval=None), progress=False)
    root, corpus, held, ds = setup
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    cache = NeighbourCache.load(out / "neighbours" / "train")
    assert cache.header["same_doc_documents"] == 12
    text = json.loads(corpus.read_text().splitlines()[0])["text"]
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    top = cache.doc(0)[1, 0, :M].tolist()  # top neighbour of chunk 1: a stored chunk of this very document
    runs = [ids[i:i + M] for i in range(len(ids) - M + 1)]
    assert top in runs and abs(runs.index(top) - M) <= 1  # the store's grid has no BOS: off by at most one
    with pytest.raises(RalmError, match="same-doc-fraction"):
        train_cfg(setup, tiny_lm, out, same_doc_fraction=1.5)


def test_retro_over_a_served_store_equals_the_directory(setup, tiny_lm, trained):
    """Issue 16: `--datastore http://...` for RETRO: same store id (the neighbour caches), same neighbours
    (what training reads), same perplexity (evaluation)."""
    from ralm.core.targets import make_targets
    from ralm.data.corpus import CorpusConfig, iter_documents
    from ralm.datastore.store import Datastore
    from ralm.methods.retro.model import PAD
    from ralm.methods.retro.neighbours import document_neighbours, store_id
    from ralm.serve.app import create_app
    from ralm.serve.client import RemoteStore
    from ralm.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    root, corpus, held, ds = setup
    local = Datastore.open(ds)
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    with ThreadServer(create_app({"ds": local}, ServeConfig())) as srv:
        remote = RemoteStore(srv.url)
        assert store_id(remote) == store_id(local)
        targets = [make_targets(d, tok) for d in iter_documents([str(corpus)], CorpusConfig())][:3]
        for a, b in zip(document_neighbours(local, tok, targets, small_retro(), decontaminate=8),
                        document_neighbours(remote, tok, targets, small_retro(), decontaminate=8), strict=True):
            assert torch.equal(a, b) and (b != PAD).any()
        runs = [run_eval_lm(EvalLMConfig(model=tiny_lm, data=[str(held)], method="retro", datastore=where,
                                         options={"retro": RetroRunConfig(str(trained[0]))},
                                         lm=LMEvalConfig(context=64, window_stride=24)), progress=False)
                for where in (str(ds), srv.url)]
    assert runs[0]["ppl"] == runs[1]["ppl"] and runs[1]["datastore"] == srv.url
