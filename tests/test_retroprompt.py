"""RetroPrompt's model-side pieces (issue 14): prompt + verbalizer, knowledge store, p_kNN, kNN-guided loss,
interpolation, neural demonstrations. Tiny random Llama from conftest, generated texts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import make_text
from ralm.errors import RalmError
from ralm.lm.hidden import final_states
from ralm.methods.retroprompt.demos import neural_demos, zscore_weights
from ralm.methods.retroprompt.knn import KNNConfig, interpolate, knn_guided_loss, knn_probs, store_knn_probs
from ralm.methods.retroprompt.prompt import PromptConfig, PromptModel, Verbalizer
from ralm.methods.retroprompt.store import KnowledgeStore

VERBALIZER = ["neg=gamma", "pos=epsilon"]  # first tokens Ġg, Ġe (the tiny BPE merges little)


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return LlamaForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


@pytest.fixture
def pm(lm):
    model, tok = lm
    return PromptModel(model, tok, PromptConfig(template="Review: {text} It was", verbalizer=VERBALIZER))


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [make_text(rng, rng.randint(3, 25)) for _ in range(n)]


# ---- prompt and verbalizer ----

def test_p_model_is_the_softmax_over_the_label_words_at_the_last_position(pm, lm):
    model, tok = lm
    text = texts(1)[0]
    ids, _ = pm.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids("[CLS]")  # the start token
    out = pm.forward(pm.batch([text]))
    full = torch.tensor([ids])
    logits = model(input_ids=full).logits[0, -1]
    words = [tok.encode(" gamma", add_special_tokens=False)[0], tok.encode(" epsilon", add_special_tokens=False)[0]]
    torch.testing.assert_close(out.class_logits[0], torch.log_softmax(logits[words], -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reps[0], final_states(model, full)[0, -1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.class_logits.exp().sum(-1), torch.ones(1))


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    """A tiny GPT-2: learned absolute positions, so left padding is wrong unless positions start at each row."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.bos_token = "[CLS]"
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(cfg).eval(), tok


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_rows_output_does_not_depend_on_its_batch(lm, gpt2, arch, side):
    model, tok = lm if arch == "llama" else gpt2
    pm = PromptModel(model, tok, PromptConfig(template="Review: {text} It was", verbalizer=VERBALIZER))
    batch = texts(5, seed=3)
    together = pm.forward(pm.batch(batch, padding_side=side))
    for i, t in enumerate(batch):
        alone = pm.forward(pm.batch([t]))
        torch.testing.assert_close(together.class_logits[i], alone.class_logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together.reps[i], alone.reps[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_virtual_tokens_go_in_front_of_every_row(lm, gpt2, arch):
    from peft import PromptTuningConfig, PromptTuningInit
    from peft.tuners.prompt_tuning import PromptEmbedding

    from ralm.methods.peft.prompt import VirtualTokens, extend_inputs

    model, tok = lm if arch == "llama" else gpt2
    torch.manual_seed(0)
    enc = PromptEmbedding(PromptTuningConfig(num_virtual_tokens=3, token_dim=32, num_transformer_submodules=1,
                                             prompt_tuning_init=PromptTuningInit.RANDOM), model.get_input_embeddings())
    virtual = VirtualTokens(enc, 3, 128)
    pm = PromptModel(model, tok, PromptConfig(verbalizer=VERBALIZER), virtual=virtual)
    plain = PromptModel(model, tok, PromptConfig(verbalizer=VERBALIZER))
    batch = texts(4, seed=2)
    for side in ("left", "right"):
        out = pm.forward(pm.batch(batch, padding_side=side))
        for i, t in enumerate(batch):  # the peft module's own layout, one row (no padding)
            embeds, _, _ = extend_inputs(virtual, model.get_input_embeddings(), torch.tensor([pm.encode(t)[0]]))
            logits = model(inputs_embeds=embeds).logits[:, -1]
            torch.testing.assert_close(out.class_logits[i], pm.verbalizer.class_logits(logits)[0], atol=1e-5,
                                       rtol=1e-4)
    assert (out.class_logits - plain.forward(plain.batch(batch)).class_logits).abs().max() > 1e-6
    out.class_logits.sum().backward()
    assert enc.embedding.weight.grad is not None  # the virtual tokens train through p_model


def test_several_words_per_class_sum_in_probability(lm):
    model, tok = lm
    pm = PromptModel(model, tok, PromptConfig(verbalizer=["a=gamma|forest", "b=epsilon"]))
    out = pm.forward(pm.batch(["Alpha beta."]))
    ids = pm.verbalizer.token_ids
    logits = model(input_ids=torch.tensor([pm.encode("Alpha beta.")[0]])).logits[0, -1]
    p = torch.softmax(logits[list(ids)], -1)
    torch.testing.assert_close(out.class_logits[0].exp(), torch.stack([p[0] + p[1], p[2]]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("template, words", [
    ("no slot here", "{text}"), ("{text} and {label}", "{text}"), ("{}", "{text}"), ("{text", "{text}"),
    ("{text} {text}", "exactly one")])
def test_bad_template_is_one_line(template, words):
    with pytest.raises(RalmError, match="--template") as e:
        PromptConfig(template=template)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("verbalizer, match", [
    (["neg=river"], "two classes"), (["neg=river", "river"], "class=word"), (["neg=", "pos=ocean"], "class=word"),
    (["neg=river", "pos=river"], "'river' is given for 'neg' and 'pos'"), (["a=x", "a=y"], "given twice"),
    (["neg=river|ocean", "pos=ocean"], "given for")])
def test_bad_verbalizer_is_one_line(verbalizer, match):
    with pytest.raises(RalmError, match=match) as e:
        PromptConfig(verbalizer=verbalizer)
    assert "\n" not in str(e.value)


def test_label_words_with_the_same_first_token_are_refused(lm):
    _, tok = lm
    with pytest.raises(RalmError, match="start with the same token"):
        Verbalizer.build(PromptConfig(verbalizer=["neg=music", "pos=mountain"]), tok)  # both Ġm


def test_a_label_missing_from_the_verbalizer_is_one_line(pm):
    assert pm.verbalizer.label_index("pos") == 1
    with pytest.raises(RalmError, match="label 'neutral' is missing from --verbalizer"):
        pm.verbalizer.label_index("neutral")


def test_a_long_text_is_cut_keeping_the_template_ending(lm):
    model, tok = lm
    pm = PromptModel(model, tok, PromptConfig(template="{text} It was", verbalizer=VERBALIZER, max_tokens=12))
    ids, _ = pm.encode(make_text(random.Random(0), 80))
    assert len(ids) == 12 and ids[-len(pm._tail):] == pm._tail  # noqa: SLF001


# ---- store ----

def test_leave_self_out_removes_exactly_the_example():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(10, 8)).astype(np.float32)
    reps[7] = reps[3]  # an exact duplicate of row 3: it must stay among row 3's neighbours
    store = KnowledgeStore(reps, [0, 1] * 5, 2)
    sims_in, ids_in = store.search(reps, 4)
    assert ids_in[0, 0] == 0 and set(ids_in[3, :2].tolist()) == {3, 7}  # kept in: itself first
    sims, ids = store.search(reps, 4, exclude=list(range(10)))
    full_sims, full_ids = store.search(reps, 5)
    for i in range(10):
        assert i not in ids[i].tolist()
        want = [j for j in full_ids[i].tolist() if j != i][:4]
        assert ids[i].tolist() == want
    assert 7 in ids[3].tolist() and 3 in ids[7].tolist()
    torch.testing.assert_close(sims[3, 0], torch.tensor(1.0))  # the duplicate, cosine 1


def test_k_larger_than_the_store_or_class_is_refused():
    store = KnowledgeStore(torch.randn(6, 4), [0, 0, 0, 1, 1, 1], 2, ["neg", "pos"])
    store.search(torch.randn(2, 4), 6)
    with pytest.raises(RalmError, match=r"--k 7: larger than the knowledge store \(6 examples\)"):
        store.search(torch.randn(2, 4), 7)
    with pytest.raises(RalmError, match="one left out as the query itself"):
        store.search(torch.randn(2, 4), 6, exclude=[0, 1])
    with pytest.raises(RalmError, match="--k 4: larger than class 'pos'"):
        store.search(torch.randn(2, 4), 4, label=1)
    with pytest.raises(RalmError, match="must be >= 1"):
        store.search(torch.randn(2, 4), 0)


def test_bad_store_input_is_refused():
    with pytest.raises(RalmError, match="class indices"):
        KnowledgeStore(torch.randn(3, 4), [0, 1, 2], 2)
    with pytest.raises(RalmError, match="at least one"):
        KnowledgeStore(torch.randn(0, 4), [], 2)
    reps = torch.randn(3, 4)
    store = KnowledgeStore(reps, [0, 1, 1], 2)
    reps.zero_()  # the store holds its own copy of the representations
    assert store.raw.abs().sum() > 0 and np.abs(store.keys).sum() > 0
    with pytest.raises(RalmError, match=r"refresh needs \(3, d\)"):
        store.refresh(torch.randn(2, 4))
    with pytest.raises(RalmError, match=r"queries must be \(Q, 4\)"):
        store.search(torch.randn(2, 5), 1)


def test_refresh_changes_keys_after_a_training_step_and_not_before(lm, tiny_lm):
    _, tok = lm
    model = LlamaForCausalLM.from_pretrained(tiny_lm)  # its own copy: this test trains it
    pm = PromptModel(model, tok, PromptConfig(verbalizer=VERBALIZER))
    train = texts(8, seed=5)
    labels = torch.tensor([0, 1] * 4)
    store = KnowledgeStore(pm.represent(train, batch_size=3), labels.tolist(), 2)
    keys0 = store.keys.copy()
    store.refresh(pm.represent(train))  # no step yet: the same keys (another batching, too)
    np.testing.assert_allclose(store.keys, keys0, atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = pm.forward(pm.batch(train))
    p_knn = store_knn_probs(store, out.reps, KNNConfig(k=4), rows=range(8))
    knn_guided_loss(out.class_logits, labels, p_knn, beta=1.0).backward()
    opt.step()
    np.testing.assert_allclose(store.keys, keys0, atol=1e-5)  # the store holds its copy until refreshed
    seconds = store.refresh(pm.represent(train))
    assert np.abs(store.keys - keys0).max() > 1e-3
    assert store.refreshes == 3 and seconds > 0 and store.refresh_seconds >= seconds


# ---- p_kNN, loss, interpolation ----

def test_knn_probs_sum_the_softmax_of_similarities_per_label():
    sims = torch.tensor([[0.9, 0.5, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    w = torch.softmax(sims / 0.5, -1)[0]
    torch.testing.assert_close(knn_probs(sims, labels, 3, 0.5), torch.stack([w[1], w[0] + w[2], torch.tensor(0.)])[None])


def test_store_knn_probs_leave_self_out_makes_training_p_knn_nontrivial():
    reps = torch.eye(4)  # orthogonal: each row's only similar row is itself
    store = KnowledgeStore(reps, [0, 1, 0, 1], 2)
    kept = store_knn_probs(store, reps, KNNConfig(k=1, leave_self_out=False), rows=range(4))
    assert torch.equal(kept, F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float())  # trivially the gold label
    out = store_knn_probs(store, reps, KNNConfig(k=3), rows=range(4))
    torch.testing.assert_close(out, torch.full((4, 2), 0.5).index_put_(
        (torch.arange(4), torch.tensor([0, 1, 0, 1])), torch.full((4,), 1 / 3)).index_put_(
        (torch.arange(4), torch.tensor([1, 0, 1, 0])), torch.full((4,), 2 / 3)))


def test_interpolation_endpoints_are_exact():
    p_model = torch.softmax(torch.randn(5, 3), -1)
    p_knn = torch.softmax(torch.randn(5, 3), -1)
    assert torch.equal(interpolate(p_model, p_knn, 0.0), p_model)
    assert torch.equal(interpolate(p_model, p_knn, 1.0), p_knn)
    torch.testing.assert_close(interpolate(p_model, p_knn, 0.2), 0.8 * p_model + 0.2 * p_knn)
    with pytest.raises(RalmError, match="--lmbda 1.5"):
        interpolate(p_model, p_knn, 1.5)


def test_beta_zero_is_plain_cross_entropy_exactly_and_p_knn_gets_no_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    p_knn = torch.softmax(torch.randn(6, 3), -1).requires_grad_()
    assert torch.equal(knn_guided_loss(logits, y, p_knn, 0.0), F.cross_entropy(logits, y))
    loss = knn_guided_loss(logits, y, p_knn, 0.5)
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(loss, ((1 + 0.5 * -p_knn[torch.arange(6), y].log()) * ce).mean())
    loss.backward()
    assert p_knn.grad is None and logits.grad is not None
    zero = torch.zeros(6, 3)  # no neighbour of the gold label: the weight is capped, not infinite
    assert torch.isfinite(knn_guided_loss(logits, y, zero, 1.0))


@pytest.mark.parametrize("kw, flag", [({"k": 0}, "--k"), ({"temperature": 0}, "--temperature"),
                                      ({"beta": -1}, "--beta"), ({"lmbda": 2}, "--lmbda"), ({"demos": -1}, "--demos")])
def test_bad_knn_config_is_one_line(kw, flag):
    with pytest.raises(RalmError, match=flag):
        KNNConfig(**kw)


# ---- neural demonstrations ----

def test_demonstrations_are_zscore_softmax_weighted_sums_of_the_class_neighbours():
    rng = np.random.default_rng(1)
    reps = torch.from_numpy(rng.normal(size=(9, 5)).astype(np.float32))
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 1]
    store = KnowledgeStore(reps, labels, 2)
    q = torch.from_numpy(rng.normal(size=(2, 5)).astype(np.float32))
    q0 = q.clone()
    demos = neural_demos(store, q, m=3)
    assert torch.equal(q, q0) and torch.equal(store.raw, reps)  # the caller's tensors are left as they were
    assert demos.shape == (2, 2, 5)
    for c in range(2):
        sims, ids = store.search(q, 3, label=c)
        z = (sims - sims.mean(-1, keepdim=True)) / sims.std(-1, keepdim=True)
        want = torch.einsum("qm,qmd->qd", torch.softmax(z, -1), reps[ids])
        torch.testing.assert_close(demos[:, c], want)
        assert all(labels[j] == c for j in ids.flatten().tolist())


def test_demonstrations_leave_the_example_itself_out():
    reps = torch.eye(6)
    store = KnowledgeStore(reps, [0, 0, 0, 1, 1, 1], 2)
    demos = neural_demos(store, reps, m=2, rows=range(6))
    for i in range(6):
        own = i // 3
        assert demos[i, own, i] == 0  # its own representation carries no weight
        assert torch.isclose(demos[i, own].sum(), torch.tensor(1.0))  # the two others, weights summing to 1


def test_demonstrations_of_an_empty_class_or_too_few_examples_are_refused():
    store = KnowledgeStore(torch.randn(4, 3), [0, 0, 2, 2], 3, ["a", "b", "c"])
    with pytest.raises(RalmError, match="class 'b' has no examples"):
        neural_demos(store, torch.randn(1, 3), m=1)
    store = KnowledgeStore(torch.randn(4, 3), [0, 0, 1, 1], 2, ["a", "b"])
    neural_demos(store, torch.randn(1, 3), m=2)
    with pytest.raises(RalmError, match="--demos 2: larger than class 'a'.*left out"):
        neural_demos(store, torch.randn(1, 3), m=2, rows=[0])


def test_zscore_weights_are_uniform_on_ties():
    assert torch.equal(zscore_weights(torch.ones(2, 4)), torch.full((2, 4), 0.25))
    assert torch.equal(zscore_weights(torch.ones(2, 1)), torch.ones(2, 1))


def test_demonstrations_enter_the_prompt_at_the_class_placeholders(pm, lm):
    model, _ = lm
    batch_texts = texts(3, seed=7)
    d = model.config.hidden_size
    torch.manual_seed(0)
    vecs = torch.randn(3, 2, d)
    for side in ("left", "right"):
        batch = pm.batch(batch_texts, demos=True, padding_side=side)
        out = pm.forward(batch, vecs)
        embeds = model.get_input_embeddings()(batch.input_ids)
        rows = torch.arange(3)[:, None]
        embeds[rows, batch.demo_slots] = vecs  # the same layout written by hand
        ref = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        logits = ref.logits[torch.arange(3), batch.last]
        torch.testing.assert_close(out.class_logits, pm.verbalizer.class_logits(logits), atol=1e-5, rtol=1e-4)
        ids, slots = pm.encode(batch_texts[0], demos=True)
        assert [ids[s + 1] for s in slots] == list(pm.verbalizer.token_ids)  # placeholder, then the label word
        for i, t in enumerate(batch_texts):  # batch independence with demonstrations too
            alone = pm.forward(pm.batch([t], demos=True), vecs[i:i + 1])
            torch.testing.assert_close(out.class_logits[i], alone.class_logits[0], atol=1e-5, rtol=1e-4)
    other = pm.forward(pm.batch(batch_texts, demos=True), vecs * 2)
    assert (other.class_logits - out.class_logits).abs().max() > 1e-6  # the vectors are read
    with pytest.raises(RalmError, match="exactly when the batch has placeholders"):
        pm.forward(pm.batch(batch_texts), vecs)
    with pytest.raises(RalmError, match=r"expected \(3, 2, 32\)"):
        pm.forward(pm.batch(batch_texts, demos=True), vecs[:, :1])


def test_demonstrations_at_embedding_norm_enter_with_the_mean_embedding_norm(pm, lm):
    model, tok = lm
    cfg = PromptConfig(template="Review: {text} It was", verbalizer=VERBALIZER, demo_norm="embedding")
    scaled = PromptModel(model, tok, cfg)
    batch_texts = texts(3, seed=7)
    torch.manual_seed(0)
    vecs = torch.randn(3, 2, model.config.hidden_size) * 40
    vecs[1, 0] = 0  # a class with no neighbour found: a zero demonstration stays zero
    target = model.get_input_embeddings().weight.norm(dim=-1).mean()
    want = torch.where(vecs.norm(dim=-1, keepdim=True) > 0, vecs / vecs.norm(dim=-1, keepdim=True) * target, vecs)
    batch = pm.batch(batch_texts, demos=True)
    torch.testing.assert_close(scaled.forward(batch, vecs).class_logits, pm.forward(batch, want).class_logits,
                               atol=1e-5, rtol=1e-4)  # the raw model given the rescaled vectors by hand
    assert (scaled.forward(batch, vecs).class_logits - pm.forward(batch, vecs).class_logits).abs().max() > 1e-4
    torch.testing.assert_close(scaled.forward(pm.batch(batch_texts)).class_logits,
                               pm.forward(pm.batch(batch_texts)).class_logits)  # no demonstrations: no change
    with pytest.raises(RalmError, match="--demo-norm 'unit': choose raw or embedding"):
        PromptConfig(demo_norm="unit")


def test_store_demos_and_knn_from_the_prompt_model_end_to_end(pm):
    train = texts(8, seed=9)
    labels = [0, 1] * 4
    store = KnowledgeStore(pm.represent(train), labels, pm.n_classes, pm.verbalizer.classes)
    reps = pm.represent(train)
    demos = neural_demos(store, reps, m=3, rows=range(8))
    out = pm.forward(pm.batch(train, demos=True), demos)
    p = interpolate(out.class_logits.exp(), store_knn_probs(store, out.reps, KNNConfig(k=4)), 0.2)
    torch.testing.assert_close(p.sum(-1), torch.ones(8))


def test_the_store_loss_and_interpolation_work_on_any_representation():
    """The vision path: frozen features (here random) through a trained head, no LM involved."""
    torch.manual_seed(0)
    feats = torch.randn(12, 16)
    labels = torch.tensor([0, 1, 2] * 4)
    head = torch.nn.Linear(16, 3)
    store = KnowledgeStore(feats, labels.tolist(), 3)
    cfg = KNNConfig(k=4, beta=1.0)
    p_knn = store_knn_probs(store, feats, cfg, rows=range(12))
    logits = head(feats)
    loss = knn_guided_loss(logits, labels, p_knn, cfg.beta)
    loss.backward()
    assert head.weight.grad is not None and loss > F.cross_entropy(logits, labels)  # weights >= 1 scale it up
    demos = neural_demos(store, feats, m=3, rows=range(12))  # (12, 3, 16): what a head could read beside x
    assert demos.shape == (12, 3, 16)
    p = interpolate(torch.softmax(logits, -1), p_knn, 0.2)
    torch.testing.assert_close(p.sum(-1), torch.ones(12))
