"""`ralm eval-lm` end to end on a tiny random LM and a tiny store built with the same tokenizer."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import write_corpus
from ralm.cli import app
from ralm.datastore.build import build

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_lm, tiny_tokenizer, tiny_encoder):
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    base = tmp_path_factory.mktemp("eval-cli")
    store_docs = write_corpus(base / "store.jsonl", n_docs=12, seed=11, prefix="s")
    held_out = write_corpus(base / "eval.jsonl", n_docs=3, seed=12, words=80, prefix="e")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(base / "cache"))
        build(BuildConfig(inputs=[str(store_docs)], out=str(base / "ds"), tokenizer=tiny_tokenizer,
                          chunking=ChunkingConfig(chunk_tokens=16), encoder=EncoderConfig(name=tiny_encoder, dtype="fp32")),
              progress=False)
    return base, held_out


def run(args):
    r = runner.invoke(app, ["eval-lm", *args, "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_methods_score_the_same_tokens(setup, tiny_lm):
    base, held_out = setup
    common = ["--model", tiny_lm, "--data", str(held_out), "--context", "64"]
    none = run(common)
    ic = run([*common, "--method", "in-context", "--datastore", str(base / "ds"), "--stride", "8", "--doc-tokens", "24"])
    rp = run([*common, "--method", "replug", "--datastore", str(base / "ds"), "--stride", "8", "--docs", "2",
              "--doc-tokens", "24"])
    for r in (none, ic, rp):
        assert {"ppl", "bpb", "tokens", "bytes", "seconds", "tokens_per_second"} <= set(r)
        assert (r["tokens"], r["bytes"], r["documents"]) == (none["tokens"], none["bytes"], 3)
    assert ic["ppl"] != none["ppl"] and rp["ppl"] != ic["ppl"]
    assert 0 < ic["retrieval_share"] < 1 and none["retrieval_share"] == 0


@pytest.mark.parametrize("args,needle", [
    (["--method", "knn"], "--method"),
    (["--method", "in-context"], "needs --datastore"),
    (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
    (["--decontaminate", "0"], "--decontaminate"),
])
def test_bad_input(setup, tiny_lm, args, needle):
    base, held_out = setup
    full = ["eval-lm", "--model", tiny_lm, "--data", str(held_out), "--quiet", *args]
    r = runner.invoke(app, full)
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_store_with_another_tokenizer_is_refused(setup, tmp_path, tiny_lm, build_config):
    from ralm.datastore.encoders import EncoderConfig

    base, held_out = setup
    other = tmp_path / "bm25"
    build(build_config([write_corpus(tmp_path / "c.jsonl", n_docs=3)], other, encoder=EncoderConfig(name="bm25")),
          progress=False)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 16
    manifest.pop("manifest_sha256")  # as a store from before manifest checksums (an edited sealed one is refused)
    (other / "manifest.json").write_text(json.dumps(manifest))
    r = runner.invoke(app, ["eval-lm", "--model", tiny_lm, "--data", str(held_out), "--method", "in-context",
                            "--datastore", str(other), "--quiet"])
    assert r.exit_code != 0 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_document_with_nothing_to_score_is_one_line(tmp_path, tiny_lm):
    """Without a BOS token a one-token document has no scored target: refused, naming the document."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.bos_token = None
    no_bos = tmp_path / "no-bos-lm"
    AutoModelForCausalLM.from_pretrained(tiny_lm).save_pretrained(no_bos)
    tok.save_pretrained(no_bos)
    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"id": "tiny-doc", "text": "a"}) + "\n")  # one byte: one token
    r = runner.invoke(app, ["eval-lm", "--model", str(no_bos), "--data", str(data), "--quiet"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tiny-doc" in lines[0] and "nothing to score" in lines[0], r.stderr


@pytest.mark.parametrize("content,needle", [
    ("not json", "not valid JSON"),
    ('{"version": "1.1"}', "data"),
    ('{"data": [{"title": "t", "paragraphs": [{"qas": []}]}]}', "context"),
])
def test_malformed_squad_is_one_line(tmp_path, tiny_lm, content, needle):
    path = tmp_path / "squad.json"
    path.write_text(content)
    r = runner.invoke(app, ["eval-qa", "--model", tiny_lm, "--data", str(path), "--quiet"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and needle in lines[0], r.stderr


# ---- the JSON reports the windows each method used (issue 11, item 9) ------------------------------
@pytest.mark.parametrize("method", ["in-context", "replug"])
def test_in_context_reports_its_block_stride_as_window_stride(setup, tiny_lm, method):
    """Issue 11 item 9: in-context scored blocks of --stride 8 but reported "window_stride": 32 (context/2)."""
    base, held = setup
    common = ["--model", tiny_lm, "--data", str(held), "--context", "64"]
    plain = run(common)
    assert plain["window_stride"] == 32
    r = run([*common, "--method", method, "--datastore", str(base / "ds"), "--stride", "8", "--doc-tokens", "16"])
    assert r["window_stride"] == 8 and r["stride"] == 8


def test_leakage_baseline_keeps_the_plain_lm_windows(setup, tiny_lm):
    """Issue 11 item 9: the leakage report's baseline is still the plain LM with its own windows, not in-context's blocks."""
    base, held = setup
    common = ["--model", tiny_lm, "--data", str(held), "--context", "64"]
    plain = run(common)
    r = run([*common, "--method", "in-context", "--datastore", str(base / "ds"), "--stride", "8", "--doc-tokens", "16",
             "--leakage-report"])
    assert r["window_stride"] == 8
    assert r["leakage"]["all"]["baseline"]["ppl"] == pytest.approx(plain["ppl"], rel=1e-6)
