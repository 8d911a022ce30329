"""Shared fixtures: a tiny BPE tokenizer, a tiny random BERT encoder and a generated corpus.

Everything is made locally in a few seconds (no downloads), and the environment points ralm's caches at
a temporary folder so tests never touch the user's home.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda river mountain city forest music "
         "science history football election market energy ocean planet garden winter summer engine").split()


def make_text(rng: random.Random, n_words: int) -> str:
    sents = []
    while n_words > 0:
        k = min(n_words, rng.randint(5, 14))
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sents)


def write_corpus(path: Path, n_docs: int = 30, seed: int = 0, words: int = 120, prefix: str = "d") -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            f.write(json.dumps({"id": f"{prefix}{i}", "text": make_text(rng, words)}) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "ralm-cache"
    monkeypatch.setenv("RALM_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer folder (fast, with offsets), trained on the generated vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(rng, 200) for _ in range(50)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, tiny_tokenizer) -> str:
    """A randomly initialised 1-layer BERT encoder folder (dim 32) using the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("tiny-encoder")
    BertModel(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


@pytest.fixture
def build_args(tiny_tokenizer, tiny_encoder):
    """CLI flags for a fast build with the tiny models (fp32 so results are deterministic)."""
    return ["--tokenizer", tiny_tokenizer, "--encoder", tiny_encoder, "--encoder-dtype", "fp32",
            "--chunk-tokens", "16", "--quiet"]


@pytest.fixture
def build_config(tiny_tokenizer, tiny_encoder):
    """Factory for a BuildConfig with the tiny models."""
    from ralm.datastore.build import BuildConfig
    from ralm.datastore.chunking import ChunkingConfig
    from ralm.datastore.encoders import EncoderConfig

    def make(inputs, out, **kw):
        chunking = kw.pop("chunking", ChunkingConfig(chunk_tokens=16))
        encoder = kw.pop("encoder", EncoderConfig(name=tiny_encoder, dtype="fp32"))
        return BuildConfig(inputs=[str(i) for i in inputs], out=str(out), tokenizer=tiny_tokenizer,
                           chunking=chunking, encoder=encoder, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory, tiny_tokenizer) -> str:
    """A randomly initialised 2-layer Llama causal LM folder (with the tiny tokenizer, BOS = [CLS])."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    tok.bos_token = "[CLS]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-lm")
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
