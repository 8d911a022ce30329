"""Question answering evaluation: EM/F1, answer cleaning, prompts, recall@K, run_eval_qa (SQuAD files: test_squad)."""

from __future__ import annotations

import json
import random

import pytest

from conftest import make_text
from ralm.data.squad import load_squad
from ralm.errors import IncompatibleError, RalmError
from ralm.eval import qa
from ralm.eval.qa import (
    EvalQAConfig,
    build_prompt,
    clean_answer,
    format_prompt,
    normalize_answer,
    recall_at_k,
    run_eval_qa,
    squad_em,
    squad_f1,
    squad_scores,
)
from squad_data import write_squad


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory, build_config):
    """A generated SQuAD file and a store built from it with the tiny tokenizer and encoder."""
    from ralm.datastore.build import build
    from ralm.datastore.chunking import ChunkingConfig

    base = tmp_path_factory.mktemp("eval-qa")
    squad = write_squad(base / "squad.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RALM_CACHE_DIR", str(base / "cache"))
        build(build_config([squad], base / "ds", chunking=ChunkingConfig(chunk_tokens=64, continuation=False)),
              progress=False)
    return base, squad


@pytest.fixture(scope="module")
def build_config(tiny_tokenizer, tiny_encoder):  # module-scoped twin of the conftest factory
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.encoders import EncoderConfig

    def make(inputs, out, **kw):
        return BuildConfig(inputs=[str(i) for i in inputs], out=str(out), tokenizer=kw.pop("tokenizer", tiny_tokenizer),
                           encoder=EncoderConfig(name=tiny_encoder, dtype="fp32"), **kw)

    return make


# ---- metrics --------------------------------------------------------------------------------------
def test_normalisation_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The Denver  Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear & the\tplum.") == "apple pear plum"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer("U.S.") == "us"


def test_em_and_f1_cases():
    assert squad_em("the Broncos.", ["Broncos"]) == 1.0
    assert squad_em("Denver Broncos", ["Broncos"]) == 0.0
    assert squad_f1("Denver Broncos", ["Broncos"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    # bag of tokens: repeated tokens count as often as they occur on both sides, order does not matter
    assert squad_f1("y x y", ["y y z"]) == pytest.approx(2 / 3)
    assert squad_f1("x x x", ["x"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert squad_f1("river", ["ocean"]) == 0.0


def test_multiple_gold_answers_take_the_best():
    golds = ["Carolina Panthers", "the Denver Broncos", "Broncos"]
    assert squad_em("broncos", golds) == 1.0
    assert squad_f1("Denver", golds) == pytest.approx(2 / 3)  # vs "denver broncos"; 0 vs the others
    assert squad_f1("Denver", golds[:1]) == 0.0


def test_empty_prediction_scores_zero():
    assert squad_em("", ["Paris"]) == 0.0 and squad_f1("", ["Paris"]) == 0.0
    assert squad_em("The.", ["Paris"]) == 0.0 and squad_f1("the", ["Paris"]) == 0.0  # normalises to empty
    assert squad_f1("an", ["the"]) == 1.0 and squad_em("an", ["the"]) == 1.0  # both empty: equal


def test_scores_are_means_in_points():
    s = squad_scores(["Paris", "Denver", "no"], [["Paris"], ["Denver Broncos"], ["yes"]])
    assert s["em"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        squad_scores(["a"], [["a"], ["b"]])


@pytest.mark.parametrize("raw,answer", [
    ("Denver Broncos.\nThe Broncos won the game.", "Denver Broncos"),
    ("\n  Answer: Santa Clara, California.", "Santa Clara, California"),
    ('"golden anniversary"', "golden anniversary"),
    ("The answer is 1906.", "1906"),
    ("Answering machines", "Answering machines"),  # a word starting with 'answer' is kept
    ("U.S.", "U.S"),
    ("", ""),
])
def test_clean_answer(raw, answer):
    assert clean_answer(raw) == answer


@pytest.mark.parametrize("generated,question,answer", [
    ("The capital of France is Paris.", "What is the capital of France?", "Paris"),
    ("Harvard Stadium is located in the Allston neighborhood.", "Where is Harvard stadium located?",
     "Allston neighborhood"),
    ("Saul Alinsky", "Who is the founder of modern community organizing?", "Saul Alinsky"),
    ("Paris is the capital", "What is the capital of France?", "Paris is the capital"),  # answer first: kept
    ("France is", "What is the capital of France?", "France is"),  # one question word only: kept
    ("the capital of France", "What is the capital of France?", "the capital of France"),  # nothing left: kept
    ("Answer: The longest river in Europe is the Volga.\nmore", "What is the longest river in Europe?", "Volga"),
])
def test_extract_answer_drops_a_restated_question(generated, question, answer):
    assert qa.extract_answer(generated, question) == answer


# ---- recall ---------------------------------------------------------------------------------------
def test_recall_at_k_counts_gold_in_top_k():
    gold = ["a", "b", "c", "d"]
    hits = [["a", "x", "y"], ["x", "b", "y"], ["x", "y", "c"], ["x", "y", "z"]]
    assert recall_at_k(gold, hits, 1) == 0.25
    assert recall_at_k(gold, hits, 2) == 0.5
    assert recall_at_k(gold, hits, 3) == 0.75
    assert recall_at_k(["x"], [["a", "b"]], 2) == 0.0
    with pytest.raises(ValueError):
        recall_at_k(gold, hits[:2], 1)


def test_malformed_file_fails_eval_before_loading_the_model(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(RalmError, match=f"{path}: top level: no 'data' list"):
        run_eval_qa(EvalQAConfig(data=str(path), model="no-such-model-xyz"), progress=False)


# ---- prompts and generation -----------------------------------------------------------------------
def test_plain_prompts(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    assert qa.prompt_style(tok) == "plain"
    two = format_prompt(tok, "Who won?", ["Alpha beta.", "Gamma."], demos=False)
    assert two == (f"{qa.OPEN_INSTRUCTION}\n\nQuestion: Who won?\nPassage 1: Alpha beta.\nPassage 2: Gamma.\n"
                   "Question: Who won?\nAnswer:")
    one = format_prompt(tok, "Who won?", ["Alpha\n\nbeta."], demos=False)
    assert one == f"{qa.OPEN_INSTRUCTION}\n\nQuestion: Who won?\nPassage: Alpha\n\nbeta.\nQuestion: Who won?\nAnswer:"
    assert format_prompt(tok, "Who won?", [], demos=False) == f"{qa.CLOSED_INSTRUCTION}\n\nQuestion: Who won?\nAnswer:"
    with_demos = format_prompt(tok, "Who won?", ["Alpha beta."])
    assert with_demos.startswith(qa.OPEN_INSTRUCTION + "\n\nQuestion: ")
    assert with_demos.endswith("\n\nQuestion: Who won?\nPassage: Alpha beta.\nQuestion: Who won?\nAnswer:")
    for passage, question, answer in qa.DEMOS:
        assert f"Question: {question}\nPassage: {passage}\nQuestion: {question}\nAnswer: {answer}\n\n" in with_demos
    closed = format_prompt(tok, "Who won?", [])
    assert "Passage" not in closed and all(f"\n\nQuestion: {q}\nAnswer: {a}\n\n" in closed for _, q, a in qa.DEMOS)


def test_passage_truncation(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    long = make_text(random.Random(0), 200)
    full = build_prompt(tok, "Who won?", [long], doc_tokens=1000, room=10_000, demos=False)
    cut = build_prompt(tok, "Who won?", [long], doc_tokens=20, room=10_000, demos=False)
    room = len(build_prompt(tok, "Who won?", ["x", "x"], doc_tokens=1, room=10_000, demos=False)) + 40
    squeezed = build_prompt(tok, "Who won?", [long, long], doc_tokens=1000, room=room, demos=False)
    assert len(cut) < len(full) and room - 10 <= len(squeezed) <= room
    assert tok.decode(cut).endswith("\nQuestion: Who won?\nAnswer:")
    assert tok.decode(squeezed).count("Passage") == 2
    with pytest.raises(RalmError, match="question 'q7'.*does not fit.*--no-demos"):
        build_prompt(tok, long, [], doc_tokens=10, room=30, qid="q7", demos=False)
    with pytest.raises(RalmError, match="question 'q8'.*does not fit"):  # passages cannot shrink to nothing
        build_prompt(tok, "Who won?", [long, long], doc_tokens=1000, room=room - 45, qid="q8", demos=False)


def test_chat_prompt_uses_the_template(tiny_lm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}<assistant>"
    assert qa.prompt_style(tok) == "chat"
    text = format_prompt(tok, "Who won?", ["Alpha beta."], demos=False)
    assert text == (f"<system>{qa.OPEN_INSTRUCTION}</s>"
                    "<user>Question: Who won?\n\nPassage: Alpha beta.\n\nQuestion: Who won?</s><assistant>")
    shots = format_prompt(tok, "Who won?", ["Alpha beta."])
    assert shots.count("<user>") == 4 and shots.count("<assistant>") == 4
    for passage, question, answer in qa.DEMOS:
        turn = f"<user>Question: {question}\n\nPassage: {passage}\n\nQuestion: {question}</s><assistant>{answer}</s>"
        assert turn in shots
    closed = format_prompt(tok, "Who won?", [])
    assert closed.startswith(f"<system>{qa.CLOSED_INSTRUCTION}</s>") and "Passage" not in closed
    assert closed.endswith("<user>Question: Who won?</s><assistant>")


@pytest.fixture(scope="module")
def lively_lm(tmp_path_factory, tiny_tokenizer):
    """Folder of a tiny random Llama with large weights, so greedy continuations depend on the prompt
    (the conftest LM's small init answers '.' to everything), and a 512-token context."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.bos_token = "[CLS]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.5)
    out = tmp_path_factory.mktemp("lively-lm")
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_batched_generation_matches_one_at_a_time(lively_lm):
    """Left padding, the shared-prefix cache (padding between prefix and suffix) and length sorting
    change nothing: every prompt gets the answer it gets alone, computed from scratch."""
    from ralm.lm.models import load

    lm = load(lively_lm)
    model, tok = lm.model, lm.tokenizer
    rng = random.Random(3)
    enc = lambda s: tok(s)["input_ids"]  # noqa: E731
    shared = enc("Passage: " + make_text(rng, 12) + "\nQuestion:")
    prompts = [shared + enc(make_text(rng, n))[1:] for n in (3, 25, 9, 14, 30, 6)]
    assert qa.common_prefix_len(prompts) >= len(shared)
    alone = [qa.generate_answers(model, tok, [p], 8, batch_size=1)[0] for p in prompts]
    cached = qa.generate_answers(model, tok, prompts, 8, batch_size=4)
    padded = qa.generate_answers(model, tok, prompts, 8, batch_size=4, prefix_cache=False)
    assert len(set(alone)) == len(prompts)  # the answers differ, so a mix-up would show
    assert cached == alone and padded == alone
    assert qa.common_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2 and qa.common_prefix_len([[5, 1], [6, 1]]) == 0


def test_newline_stop(tiny_lm):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    nl, word = tok("\n", add_special_tokens=False)["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    assert len(nl) == 1 and len(word) == 1
    prompt = word * 3
    stop = qa.newline_stop(tok, prompt_len=len(prompt))
    rows = {"text then newline": (word + nl, True), "leading newline": (nl + nl, False),
            "newline then text": (nl + word, False), "text only": (word + word, False)}
    ids = torch.tensor([prompt + gen for gen, _ in rows.values()])
    assert stop(ids, None).tolist() == [want for _, want in rows.values()]


# ---- the evaluation -------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(RalmError, match="--docs 0"):
        EvalQAConfig(data="x.json", docs=0)
    with pytest.raises(RalmError, match="--limit 0"):
        EvalQAConfig(data="x.json", limit=0)
    with pytest.raises(RalmError, match="--limit -3"):
        EvalQAConfig(data="x.json", limit=-3)
    with pytest.raises(RalmError, match="--max-new-tokens"):
        EvalQAConfig(data="x.json", max_new_tokens=0)
    with pytest.raises(RalmError, match="--batch-size"):
        EvalQAConfig(data="x.json", batch_size=0)
    with pytest.raises(RalmError, match="--data"):
        EvalQAConfig(data="")


def test_limit_is_a_seeded_sample_in_file_order():
    items = list(range(100))
    a = qa.select_questions(items, 10, seed=0)
    assert a == qa.select_questions(items, 10, seed=0) == sorted(a) and len(set(a)) == 10
    assert a != qa.select_questions(items, 10, seed=1)
    assert qa.select_questions(items, 500, seed=0) == items


def test_closed_book_run(qa_setup, lively_lm):
    _, squad = qa_setup
    r = run_eval_qa(EvalQAConfig(data=str(squad), model=lively_lm, limit=5, max_new_tokens=4, batch_size=2, demos=False),
                    progress=False)
    assert r["mode"] == "closed-book" and r["n"] == 5
    assert 0 <= r["em"] <= r["f1"] <= 100
    assert r["closed_book"] == {"em": r["em"], "f1": r["f1"]} and r["open_book"] is None
    assert r["recall_at_k"] is None and r["f1_gain"] is None and r["prompt_style"] == "plain"
    assert r["questions_per_second"] > 0 and r["seconds"] > 0
    assert len(r["examples"]) == 5 and {"closed_book", "answers", "question"} <= set(r["examples"][0])


def test_open_book_run_and_recall(qa_setup, lively_lm):
    base, squad = qa_setup
    cfg = EvalQAConfig(data=str(squad), model=lively_lm, datastore=str(base / "ds"), docs=2, limit=6,
                       max_new_tokens=4, batch_size=4, demos=False)
    r = run_eval_qa(cfg, progress=False)
    assert r["mode"] == "open-book" and r["n"] == 6 and r["k"] == 2
    assert {"em", "f1", "n", "recall_at_k", "closed_book", "open_book", "seconds", "questions_per_second"} <= set(r)
    assert r["em"] == r["open_book"]["em"] and r["f1"] == r["open_book"]["f1"]
    assert 0 <= r["closed_book"]["em"] <= r["closed_book"]["f1"] <= 100
    assert r["f1_gain"] == pytest.approx(r["f1"] - r["closed_book"]["f1"])
    # every question is its own paragraph's text: the gold paragraph is the top hit
    assert r["recall_at_k"] == 1.0 and r["recall_at"] == {"1": 1.0, "2": 1.0}
    assert all(ex["gold_in_top_k"] and ex["retrieved"][0] for ex in r["examples"])
    no_closed = run_eval_qa(EvalQAConfig(**{**cfg.__dict__, "closed_book": False}), progress=False)
    assert no_closed["closed_book"] is None and no_closed["f1"] == r["f1"]


def test_prompt_that_cannot_fit_is_an_error(qa_setup, tiny_lm):
    _, squad = qa_setup  # the demonstrations alone overflow the tiny LM's 128-token context
    with pytest.raises(RalmError, match="does not fit the model's context.*--no-demos"):
        run_eval_qa(EvalQAConfig(data=str(squad), model=tiny_lm, limit=1), progress=False)


def test_recall_is_zero_when_the_gold_paragraph_is_another(qa_setup, lively_lm, tmp_path):
    base, _ = qa_setup
    # same paragraphs (same ids in the store), but each question is the text of the next paragraph
    shifted = write_squad(tmp_path / "shifted.json", shift=1)
    r = run_eval_qa(EvalQAConfig(data=str(shifted), model=lively_lm, datastore=str(base / "ds"), docs=1,
                                 max_new_tokens=2, closed_book=False, demos=False), progress=False)
    assert r["n"] == 9 and r["recall_at_k"] == 0.0
    # a store of other documents: recall is not reported as a (meaningless) zero
    other = write_squad(tmp_path / "other.json", seed=5)
    rec = json.loads(other.read_text())
    for art in rec["data"]:
        art["title"] = "Other_" + art["title"]
    other.write_text(json.dumps(rec))
    r = run_eval_qa(EvalQAConfig(data=str(other), model=lively_lm, datastore=str(base / "ds"), docs=1, limit=2,
                                 max_new_tokens=2, closed_book=False, demos=False), progress=False)
    assert r["recall_at_k"] is None and "recall_note" in r


def test_predictions_are_scored_against_their_own_question(qa_setup, lively_lm, monkeypatch):
    """A stand-in generator that answers correctly only when the gold passage is in the prompt."""
    base, squad = qa_setup
    examples = load_squad(squad)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lively_lm)

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=False, desc=""):
        out = []
        for ids in prompts:
            text = tokenizer.decode(ids)
            e = next(e for e in examples if e.question in text)
            out.append(f" {e.answers[0]}.\nmore" if f"Passage: {e.context}" in text else " nothing")
        return out

    monkeypatch.setattr(qa, "generate_answers", fake_generate)
    r = run_eval_qa(EvalQAConfig(data=str(squad), model=lively_lm, datastore=str(base / "ds"), docs=1, demos=False),
                    progress=False)
    assert (r["em"], r["f1"], r["closed_book"]["em"], r["closed_book"]["f1"], r["f1_gain"]) == (100, 100, 0, 0, 100)
    assert r["examples"][0]["open_book"] == examples[0].answers[0]
    assert tok.pad_token_id is not None


def test_bad_docs_and_store_tokenizer(qa_setup, lively_lm, tiny_tokenizer, build_config, tmp_path, monkeypatch):
    base, squad = qa_setup
    with pytest.raises(RalmError, match="--docs 100: the store .* has only 9 chunks"):
        run_eval_qa(EvalQAConfig(data=str(squad), model=lively_lm, datastore=str(base / "ds"), docs=100),
                    progress=False)
    # a store chunked with another tokenizer (one token more) is refused
    from transformers import AutoTokenizer

    from ralm.datastore.build import build
    from ralm.datastore.chunking import ChunkingConfig

    other_tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    other_tok.add_tokens(["zzzq"])
    other_tok.save_pretrained(tmp_path / "tok")
    monkeypatch.setenv("RALM_CACHE_DIR", str(tmp_path / "cache"))
    build(build_config([squad], tmp_path / "ds2", tokenizer=str(tmp_path / "tok"),
                       chunking=ChunkingConfig(chunk_tokens=64, continuation=False)), progress=False)
    with pytest.raises(IncompatibleError, match="chunked with tokenizer"):
        run_eval_qa(EvalQAConfig(data=str(squad), model=lively_lm, datastore=str(tmp_path / "ds2")), progress=False)


# ---- CLI (active once `ralm eval-qa` is registered in ralm.cli) ----------------------------------
def _cli_has_eval_qa() -> bool:
    from ralm.cli import app

    return any(c.name == "eval-qa" for c in app.registered_commands)


cli_only = pytest.mark.skipif(not _cli_has_eval_qa(), reason="`ralm eval-qa` not registered in ralm.cli yet")


@cli_only
def test_cli_eval_qa(qa_setup, lively_lm, tmp_path):
    from typer.testing import CliRunner

    from ralm.cli import app

    base, squad = qa_setup
    runner = CliRunner()
    r = runner.invoke(app, ["eval-qa", "--model", lively_lm, "--data", str(squad), "--datastore", str(base / "ds"),
                            "--docs", "2", "--limit", "3", "--max-new-tokens", "2", "--no-demos", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n"] == 3 and out["recall_at_k"] == 1.0 and {"em", "f1", "closed_book"} <= set(out)
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"paragraphs": [{"qas": []}]}]}')
    for args, needle in [(["--data", str(bad)], f"{bad}: data[0].paragraphs[0]: no 'context'"),
                         (["--data", str(squad), "--docs", "0"], "--docs 0"),
                         (["--data", str(squad), "--limit", "0"], "--limit 0")]:
        r = runner.invoke(app, ["eval-qa", "--model", lively_lm, *args, "--quiet"])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_open_book_over_a_served_store_equals_the_directory(qa_setup, lively_lm):
    """Issue 16: `eval-qa --datastore http://HOST:PORT`: the same passages retrieved, the same answers."""
    from ralm.datastore.store import Datastore
    from ralm.serve.app import create_app
    from ralm.serve.config import ServeConfig
    from serve_helpers import ThreadServer

    base, squad = qa_setup
    with ThreadServer(create_app({"ds": Datastore.open(base / "ds")}, ServeConfig())) as srv:
        runs = [run_eval_qa(EvalQAConfig(data=str(squad), model=lively_lm, datastore=where, docs=2, limit=4,
                                         max_new_tokens=4, batch_size=4, demos=False, closed_book=False),
                            progress=False) for where in (str(base / "ds"), srv.url)]
    local, http = runs
    assert [ex["retrieved"] for ex in local["examples"]] == [ex["retrieved"] for ex in http["examples"]]
    assert all(ex["retrieved"] for ex in http["examples"])
    assert (local["f1"], local["recall_at"]) == (http["f1"], http["recall_at"]) and http["datastore"] == srv.url
