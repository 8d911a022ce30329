"""Plain text starts with the token the model was pretrained with, everywhere alike (issue 11, item 8).

The smollm2-135m preset ships SmolLM2-135M-Instruct, whose BOS is <|im_start|>, its chat-turn token; plain
documents scored after it cost 7-20 nats per article more than after <|endoftext|>, the separator of its
pretraining documents. The tiny models here reproduce that tokenizer's shape: BOS <|im_start|> inside the
chat template, <|endoftext|> outside it.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from badinput import fails, runner, write_jsonl
from conftest import write_corpus
from ralm.cli import app
from ralm.core.start_token import start_token, start_token_id
from ralm.core.targets import make_targets
from ralm.data.document import Document
from ralm.errors import RalmError
from ralm.lm.presets import PRESETS, declare_start_token, start_token_change
from ralm.methods.plain import token_nll

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CTX = 32


def _chat_tokenizer(tiny_tokenizer: str, template: str | None = TEMPLATE, separator: bool = True):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                            "additional_special_tokens": ["<|endoftext|>"] if separator else []})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, tiny_tokenizer, tiny_lm) -> str:
    """The tiny random LM with three more embeddings, its tokenizer shaped like SmolLM2-Instruct's."""
    torch.manual_seed(0)
    tok = _chat_tokenizer(tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():  # resizing gives the new tokens one mean embedding: make them tell apart
        new = model.get_input_embeddings().weight[-3:]
        new.copy_(torch.randn_like(new))
    model.config.bos_token_id = tok.bos_token_id
    out = tmp_path_factory.mktemp("chat-lm")
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_a_chat_turn_bos_gives_way_to_the_document_separator(tiny_tokenizer):
    """Item 8: the BOS is the start unless it is a chat-turn token and a document separator exists."""
    tok = _chat_tokenizer(tiny_tokenizer)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert start_token(tok) == "<|endoftext|>" and start_token_id(tok) == eot
    t = make_targets(Document("d", "alpha beta gamma", "x"), tok)
    assert t.ids[0] == eot and t.first == 1 and t.n_targets == len(t.ids) - 1
    assert start_token(_chat_tokenizer(tiny_tokenizer, template=None)) == "<|im_start|>"  # no chat template: BOS
    assert start_token(_chat_tokenizer(tiny_tokenizer, separator=False)) == "<|im_start|>"  # nothing better to use
    # a base model's template that inserts the BOS by variable (Gemma's `{{ bos_token }}`) keeps its BOS
    assert start_token(_chat_tokenizer(tiny_tokenizer, template="{{ bos_token }}{% for m in messages %}"
                                                                 "<start_of_turn>{{ m['content'] }}{% endfor %}")) \
        == "<|im_start|>"
    plain = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert start_token(plain) is None and start_token_id(plain) is None  # no BOS: first token unscored, as before


def test_presets_declare_their_plain_text_start_token(tiny_tokenizer):
    """Item 8: each preset names the token its weights saw plain text after; a preset's tokenizer carries it."""
    assert PRESETS["smollm2-135m"].start_token == "<|endoftext|>"
    assert PRESETS["gemma3-270m"].start_token == "<bos>"
    tok = _chat_tokenizer(tiny_tokenizer, template=None)  # the rule alone would keep <|im_start|> here
    declare_start_token(tok, "smollm2-135m")
    assert start_token(tok) == "<|endoftext|>"
    declare_start_token(tok, "not-a-preset")  # other names: nothing declared, nothing changed
    assert start_token(tok) == "<|endoftext|>"
    with pytest.raises(RalmError, match="start token"):
        declare_start_token(AutoTokenizer.from_pretrained(tiny_tokenizer), "gemma3-270m")  # no <bos> in it


def test_eval_lm_scores_after_the_start_token_and_reports_it(chat_lm, tmp_path):
    """Item 8: eval-lm's NLL is the model's after <|endoftext|>, not after <|im_start|>, and its JSON says so."""
    data = write_corpus(tmp_path / "d.jsonl", n_docs=2, words=30)
    r = runner.invoke(app, ["eval-lm", "--model", chat_lm, "--data", str(data), "--context", str(CTX), "--json", "-q"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["start_token"] == "<|endoftext|>"
    model, tok = AutoModelForCausalLM.from_pretrained(chat_lm).eval(), AutoTokenizer.from_pretrained(chat_lm)
    docs = [json.loads(line)["text"] for line in data.read_text().splitlines()]

    def nll_after(start: str) -> float:
        total, n = 0.0, 0
        for text in docs:
            ids = [tok.convert_tokens_to_ids(start), *tok(text, add_special_tokens=False)["input_ids"]]
            t = make_targets(Document("d", text, "x"), tok)
            t.ids = torch.tensor(ids)
            nll = token_nll(model, t, CTX, CTX // 2)
            total, n = total + float(nll.double().sum()), n + len(nll)
        return total / n

    assert out["nll"] == pytest.approx(nll_after("<|endoftext|>"), rel=1e-5)
    assert abs(out["nll"] - nll_after("<|im_start|>")) > 1e-3  # the start token matters to this model


def test_every_consumer_starts_plain_text_alike(chat_lm, tiny_lm):
    """Item 8: in-context blocks, generation prompts and plain QA prompts start with the same token as eval-lm."""
    from ralm.eval import qa
    from ralm.generate import GenerateConfig, generate
    from ralm.methods.in_context import InContextConfig, block_input, in_context_nll

    model, tok = AutoModelForCausalLM.from_pretrained(chat_lm).eval(), AutoTokenizer.from_pretrained(chat_lm)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    t = make_targets(Document("d", "alpha beta gamma delta river " * 8, "x"), tok)
    assert block_input(t.ids, 5, 9, [7, 8], CTX, start_token_id(tok))[0] == eot
    # no retrieval: in-context reproduces the plain LM, start token included (context - 1 a multiple of stride)
    nll, _ = in_context_nll(model, tok, t, None, InContextConfig(stride=16), 33)
    torch.testing.assert_close(nll, token_nll(model, t, 33, 16))
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        generate(model, tok, "alpha beta", GenerateConfig(max_new_tokens=1))
    finally:
        handle.remove()
    assert int(seen[0][0, 0]) == eot
    assert qa._ids(tok, "<|im_start|>user\nhi<|im_end|>\n")[0] == tok.bos_token_id  # a chat prompt: its template
    plain = AutoTokenizer.from_pretrained(tiny_lm)  # BOS [CLS], no chat template: plain QA prompts
    assert qa._ids(plain, "Question: who?\nAnswer:")[0] == plain.bos_token_id == start_token_id(plain)


def test_knn_store_records_its_start_token_and_refuses_another(chat_lm, tmp_path, tiny_lm):
    """Item 8: kNN keys computed after another start token match no eval-time state: such a store is refused."""
    import shutil

    corpus = write_corpus(tmp_path / "c.jsonl", n_docs=3, words=40)
    held = write_jsonl(tmp_path / "h.jsonl", [{"id": "h", "text": "alpha beta gamma river mountain city " * 4}])
    out, lm = tmp_path / "knn", tmp_path / "lm"
    shutil.copytree(chat_lm, lm)  # its own copy: its tokenizer is changed below
    r = runner.invoke(app, ["knnlm", "build", str(corpus), "--out", str(out), "--model", str(lm), "--context",
                            str(CTX), "--index", "flat", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["start_token"] == "<|endoftext|>"
    ok = runner.invoke(app, ["eval-lm", "--model", str(lm), "--data", str(held), "--method", "knn-lm",
                             "--datastore", str(out), "--context", str(CTX), "-q"])
    assert ok.exit_code == 0, ok.output
    # same weights, same vocabulary, no chat template: this tokenizer starts plain text with <|im_start|>
    tok = AutoTokenizer.from_pretrained(lm)
    tok.chat_template = None
    for f in lm.glob("chat_template*"):
        f.unlink()
    tok.save_pretrained(lm)
    assert start_token(AutoTokenizer.from_pretrained(lm)) == "<|im_start|>"
    r = runner.invoke(app, ["eval-lm", "--model", str(lm), "--data", str(held), "--method", "knn-lm",
                            "--datastore", str(out), "--context", str(CTX), "-q"])
    fails(r, str(out), "'<|endoftext|>'", "'<|im_start|>'", "rebuild")
    # a store written before ralm recorded it was made after the tokenizer's BOS
    assert start_token_change({}, AutoTokenizer.from_pretrained(chat_lm)) is not None
    assert start_token_change({}, AutoTokenizer.from_pretrained(tiny_lm)) is None  # plain BOS: still valid


def test_retro_checkpoint_of_another_start_token_warns(chat_lm, tmp_path, capsys):
    """Item 8: a RETRO-fit checkpoint records its start token; one trained after another says so plainly."""
    from ralm.lm.hidden import model_fingerprint
    from ralm.lm.presets import tokenizer_fingerprint
    from ralm.methods.retro.checkpoint import load_retrofit, save_checkpoint
    from ralm.methods.retro.model import RetroFit
    from test_retro import small_cfg

    base, tok = AutoModelForCausalLM.from_pretrained(chat_lm).eval(), AutoTokenizer.from_pretrained(chat_lm)
    meta = {"model": chat_lm, "model_fingerprint": model_fingerprint(base),
            "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    for name, made in (("now", {"start_token": "<|endoftext|>"}), ("old", {}), ("other", {"start_token": "<|im_start|>"})):
        save_checkpoint(tmp_path / name, RetroFit(base, small_cfg()), {**meta, **made})
        capsys.readouterr()
        model, _ = load_retrofit(tmp_path / name, base, tok)
        model.remove_hooks()
        err = capsys.readouterr().err
        if name == "now":
            assert "warning" not in err
        else:
            assert "warning:" in err and "'<|im_start|>'" in err and "'<|endoftext|>'" in err and "retrain" in err
