"""Question answering evaluation (``ralm eval-qa``): closed-book vs open-book answers, SQuAD EM and F1,
and recall@K of the gold paragraph.

- Closed book: the model answers from the question alone. Open book: the top ``docs`` passages retrieved
  from a datastore for the question go into the prompt. With a store, the closed-book baseline runs on
  the same questions too (``closed_book=True``), so the gain from retrieval is measured, not assumed.
- Prompts (``format_prompt``): a model whose tokenizer has a chat template gets a system message asking
  for a short answer (copied from the passage, open book), three hand-written demonstrations as
  user/assistant turns (``demos``; small models otherwise answer in full sentences), and the passages and
  question as the last user message; any other model gets the same as plain text in
  ``Question: ...\\nPassage: ...\\nQuestion: ...\\nAnswer:`` blocks. Greedy decoding, batched (similar lengths together,
  padded on the left; the prefix shared by all prompts is computed once and its cache reused), stopping at
  a newline or EOS; the answer (``extract_answer``) is the first line, without an ``Answer:`` prefix,
  surrounding quotes, a trailing period or a leading restatement of the question ("The capital of
  France is Paris" -> "Paris"), the same for both modes. An open-book user message puts the question
  before the passages and again after them.
- Metrics (``squad_em`` / ``squad_f1``, in ``eval/task_metrics.py`` with the other task metrics and
  importable from here): the SQuAD v1.1 definitions, in points (0-100). Both sides are
  normalised (lower case, punctuation removed, articles a/an/the removed, whitespace collapsed); EM is
  exact equality, F1 the harmonic mean of bag-of-token precision and recall; each question takes the
  maximum over its gold answers. An empty normalised prediction scores 0 (1 only if the gold answer also
  normalises to empty).
- recall@K: the fraction of questions whose gold paragraph id (``ralm.data.squad``) is the ``doc_id`` of
  one of the top-K hits; meaningful for a store built from the same SQuAD file (``ralm build squad.json``).
  If no hit ever names a paragraph of the file, the store holds other documents and recall is ``None``.
"""

from __future__ import annotations

import copy
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ralm.core.start_token import start_token_id
from ralm.core.task_metrics import (  # noqa: F401 (squad_em, squad_f1: imported from here too)
    normalize_answer,
    squad_em,
    squad_f1,
    squad_scores,
)
from ralm.data.squad import load_squad, parse_squad
from ralm.errors import RalmError
from ralm.lm.models import load
from ralm.lm.presets import tokenizer_fingerprint
from ralm.serve.client import open_store

# ---- retrieval metric ---------------------------------------------------------------------------


def recall_at_k(gold_ids: Sequence[str], hit_ids: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of questions whose gold paragraph id is among the first ``k`` hit doc ids."""
    if len(gold_ids) != len(hit_ids):
        raise ValueError(f"{len(gold_ids)} gold ids for {len(hit_ids)} hit lists")
    if not gold_ids:
        raise ValueError("no questions")
    if k < 1:
        raise ValueError(f"k={k}: must be >= 1")
    return sum(g in list(h)[:k] for g, h in zip(gold_ids, hit_ids, strict=True)) / len(gold_ids)


# ---- answers out of generated text ---------------------------------------------------------------
_PREFIX = re.compile(r"^(the\s+)?(short\s+)?answer\s*(is)?\s*[:\-]?\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’*"


def clean_answer(text: str) -> str:
    """First non-empty line of a generation, without an 'Answer:' prefix, quotes or a trailing period."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    m = _PREFIX.match(line)
    if m and (m.group(3) or ":" in m.group(0) or "-" in m.group(0)):  # "Answer: x", "The answer is x"
        line = line[m.end():]
    line = line.strip().strip(_QUOTES).strip()
    while line.endswith(".") and not line.endswith(".."):
        line = line[:-1].rstrip()
    return line.strip(_QUOTES).strip()


_FUNCTION_WORDS = frozenset(
    "is was are were be been being has had have did does do of in on at to for by with from and as that which "
    "who whom whose what when where why how it its their his her this these those there".split())


def strip_restatement(answer: str, question: str) -> str:
    """Drop a restatement of the question from the start of an answer.

    'The capital of France is Paris' for 'What is the capital of France?' gives 'Paris': the longest
    leading run of words that are all question words or function words is dropped when it holds at least
    two of the question's (non-function) words and something is left after it. Small models often answer
    in such sentences; SQuAD's gold answers are the bare span.
    """
    qwords = set(normalize_answer(question).split())
    words = answer.split()
    cut = content = 0
    for i, w in enumerate(words):
        toks = normalize_answer(w).split()
        if all(t in _FUNCTION_WORDS for t in toks):  # also articles and bare punctuation (no tokens)
            pass
        elif all(t in qwords or t in _FUNCTION_WORDS for t in toks):
            content += 1
        else:
            break
        cut = i + 1
    return " ".join(words[cut:]) if content >= 2 and cut < len(words) else answer


def extract_answer(generated: str, question: str) -> str:
    """The answer in a generation: ``clean_answer`` (first line, no prefix/quotes/period), then
    ``strip_restatement``."""
    return strip_restatement(clean_answer(generated), question)


# ---- config --------------------------------------------------------------------------------------
@dataclass
class EvalQAConfig:
    data: str = field(metadata={"help": "SQuAD-format JSON file (questions, answers, paragraphs)"})
    model: str = field(default="smollm2-135m",
                       metadata={"help": "preset (smollm2-135m, ...), model folder, GGUF file or hub id"})
    datastore: str | None = field(
        default=None, metadata={"help": "store to retrieve passages from (open book); without one: closed book only"})
    docs: int = field(default=1, metadata={"help": "K: passages retrieved per question, put in the prompt and "
                                                   "used for recall@K of the gold paragraph"})
    doc_tokens: int = field(default=256, metadata={"help": "each passage is truncated to this many LM tokens"})
    limit: int | None = field(default=None, metadata={"help": "evaluate a random sample of this many questions "
                                                              "(fixed by --seed; kept in file order)"})
    max_new_tokens: int = field(default=16, metadata={"help": "longest answer generated, in tokens"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch"})
    demos: bool = field(default=True, metadata={"help": "show the model three hand-written question/answer "
                                                        "demonstrations before the question"})
    closed_book: bool = field(default=True, metadata={"help": "with a store, also run the closed-book baseline "
                                                              "on the same questions"})
    seed: int = field(default=0, metadata={"help": "seed of the --limit sample"})
    examples: int = field(default=5, metadata={"help": "predictions shown in the result"})

    def __post_init__(self) -> None:
        if not self.data:
            raise RalmError("--data: give a SQuAD-format JSON file")
        for name in ("docs", "doc_tokens", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RalmError(f"--{name.replace('_', '-')} {value}: must be an integer >= 1")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise RalmError(f"--limit {self.limit}: must be an integer >= 1")
        if self.examples < 0:
            raise RalmError(f"--examples {self.examples}: must be >= 0")


# ---- prompts -------------------------------------------------------------------------------------
OPEN_INSTRUCTION = ("Answer the question using the passage. Reply with only the answer: a short phrase of a few "
                    "words, copied exactly from the passage. Never write a full sentence.")
CLOSED_INSTRUCTION = ("Answer the question. Reply with only the answer: a short phrase of a few words. "
                      "Never write a full sentence.")
# Hand-written demonstrations (not from any evaluation set): (passage, question, answer copied from it).
DEMOS = (
    ("The Eiffel Tower was built for the 1889 World's Fair in Paris. It was designed by the engineering company "
     "of Gustave Eiffel and is 330 metres tall.", "Whose company designed the Eiffel Tower?", "Gustave Eiffel"),
    ("The Amazon River flows through Brazil, Peru and Colombia. It is about 6,400 km long and carries more water "
     "than any other river.", "How long is the Amazon River?", "about 6,400 km"),
    ("Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity. She was the "
     "first woman to win a Nobel Prize, in 1903.", "In what year did Marie Curie win a Nobel Prize?", "1903"),
)


def prompt_style(tokenizer: Any) -> str:
    """'chat' when the tokenizer has a chat template, else 'plain'."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def _question_block(question: str, passages: Sequence[str], sep: str) -> str:
    """Closed book: the question. Open book: the question, the passages, the question again (a small
    model reads the passage knowing what to look for, and the question is still the last thing it read)."""
    if not passages:
        return f"Question: {question}"
    if len(passages) == 1:
        body = f"Passage: {passages[0]}{sep}"
    else:
        body = "".join(f"Passage {i + 1}: {p}{sep}" for i, p in enumerate(passages))
    return f"Question: {question}{sep}{body}Question: {question}"


def format_prompt(tokenizer: Any, question: str, passages: Sequence[str], demos: bool = True) -> str:
    """The prompt text for one question, open book (with passages) or closed book (without).

    Chat models: a system message with the instruction, then (``demos``) the hand-written ``DEMOS`` as
    user/assistant turns, then the question as a user message, ending at the assistant's turn. Other
    models: the same as plain text, ``[Question: ...\\nPassage: ...\\n]Question: ...\\nAnswer:`` blocks after
    the instruction.
    A closed-book prompt has no passages anywhere (the demonstrations lose theirs too).
    """
    open_book = bool(passages)
    instruction = OPEN_INSTRUCTION if open_book else CLOSED_INSTRUCTION
    shots = [(([p] if open_book else []), q, a) for p, q, a in DEMOS] if demos else []
    if prompt_style(tokenizer) == "chat":
        msgs = [{"role": "system", "content": instruction}]
        for ps, q, a in shots:
            msgs += [{"role": "user", "content": _question_block(q, ps, "\n\n")}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": _question_block(question, passages, "\n\n")})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    blocks = [f"{_question_block(q, ps, chr(10))}\nAnswer: {a}" for ps, q, a in shots]
    blocks.append(f"{_question_block(question, passages, chr(10))}\nAnswer:")
    return f"{instruction}\n\n" + "\n\n".join(blocks)


def _context_length(model: Any, tokenizer: Any) -> int:
    cfg = model.config.get_text_config()
    n = getattr(cfg, "max_position_embeddings", None)
    if n is None and tokenizer.model_max_length < 10**9:
        n = tokenizer.model_max_length
    return int(n or 2048)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # chat templates already hold their special tokens; plain prompts start as eval-lm's plain text does
    if prompt_style(tokenizer) == "chat":
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    start = start_token_id(tokenizer)
    return ([start] if start is not None else []) + tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(tokenizer: Any, question: str, passages: Sequence[str], doc_tokens: int, room: int,
                 qid: str = "", demos: bool = True) -> list[int]:
    """Token ids of the prompt, each passage cut to ``doc_tokens`` and all of it to ``room`` tokens."""
    toks = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in passages]
    budget = doc_tokens
    while True:
        cut = [tokenizer.decode(t[:budget]).strip() for t in toks]
        ids = _ids(tokenizer, format_prompt(tokenizer, question, cut, demos))
        if len(ids) <= room:
            return ids
        shrink = -(-(len(ids) - room) // len(passages)) if passages else 0  # spread over the passages
        if not passages or budget - shrink < 1:
            raise RalmError(f"question {qid!r}: its prompt of {len(ids)} tokens does not fit the model's "
                            f"context (room for {room} tokens with the answer); "
                            "try --no-demos, fewer --docs or a lower --max-new-tokens")
        budget -= shrink


# ---- generation ----------------------------------------------------------------------------------
_STOP_TOKENS: dict[int, tuple[Any, Any]] = {}


def _stop_tokens(tokenizer: Any) -> tuple[Any, Any]:
    """(ids whose text holds a newline, ids whose text is blank); the vocabulary scan runs once per tokenizer."""
    key = id(tokenizer)
    if key not in _STOP_TOKENS:
        ids = sorted(tokenizer.get_vocab().values())
        texts = tokenizer.batch_decode([[i] for i in ids])
        newline = torch.tensor([i for i, t in zip(ids, texts, strict=True) if "\n" in t], dtype=torch.long)
        blank = torch.tensor([i for i, t in zip(ids, texts, strict=True) if not t.strip()], dtype=torch.long)
        _STOP_TOKENS[key] = (newline, blank)
    return _STOP_TOKENS[key]


def newline_stop(tokenizer: Any, prompt_len: int) -> Any:
    """A StoppingCriteria ending a sequence at the first newline after some answer text.

    A sequence stops when its last token holds a newline and either that token or an earlier generated
    one holds text: a leading blank line (some models start with one) does not end the answer.
    """
    from transformers import StoppingCriteria  # ~3 s: only once answers are generated

    newline, blank = _stop_tokens(tokenizer)

    class NewlineStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # (B, T) -> (B,) bool
            new = input_ids[:, prompt_len:]
            last = new[:, -1]
            text_before = (~torch.isin(new[:, :-1], blank)).any(dim=1)
            return torch.isin(last, newline) & (text_before | ~torch.isin(last, blank))

    return NewlineStop()


def common_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all prompts, leaving each at least one token of its own."""
    if not prompts:
        return 0
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for other in prompts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def generate_answers(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
                     progress: bool = False, desc: str = "generate", prefix_cache: bool = True) -> list[str]:
    """Greedy answers (raw generated text) for prompt token ids, in batches of similar length.

    The prefix all prompts share (instructions, demonstrations) is run once and its key/value cache
    reused by every batch (``prefix_cache``); each row is then [shared prefix | padding | own suffix]
    with the padding masked out, so every prompt ends at the last column and positions stay contiguous
    (the model derives position ids from the attention mask). Without a shared prefix this is plain
    left padding.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    n_pre = common_prefix_len(prompts) if prefix_cache and len(prompts) > 1 else 0
    cache = None
    with torch.inference_mode():
        if n_pre:
            pre = torch.tensor([prompts[0][:n_pre]], dtype=torch.long, device=device)
            cache = model(input_ids=pre, use_cache=True).past_key_values
    with tqdm(total=len(prompts), desc=desc, unit="q", file=sys.stderr, disable=not progress) as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            width = n_pre + max(len(prompts[i]) - n_pre for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            mask[:, :n_pre] = 1
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, :n_pre] = torch.tensor(p[:n_pre], dtype=torch.long)
                ids[r, width - len(p) + n_pre:] = torch.tensor(p[n_pre:], dtype=torch.long)
                mask[r, width - len(p) + n_pre:] = 1
            kw: dict[str, Any] = {}
            if cache is not None:
                kw["past_key_values"] = copy.deepcopy(cache)  # generate appends to the cache it is given
                kw["past_key_values"].batch_repeat_interleave(len(idx))
            with torch.inference_mode():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad,
                                     stopping_criteria=[newline_stop(tokenizer, width)],
                                     temperature=None, top_p=None, top_k=None, **kw)
            for r, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[r, width:].tolist(), skip_special_tokens=True)
            bar.update(len(idx))
    return out


# ---- the evaluation ------------------------------------------------------------------------------
def select_questions(examples: list, limit: int | None, seed: int) -> list:
    """All questions, or a random sample of ``limit`` of them (fixed by ``seed``) in file order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _answer_all(model: Any, tok: Any, examples: list, passages: list[list[str]] | None, cfg: EvalQAConfig,
                room: int, progress: bool, desc: str) -> tuple[list[str], list[str], float]:
    t0 = time.perf_counter()
    prompts = [build_prompt(tok, e.question, passages[i] if passages else [], cfg.doc_tokens, room, e.id, cfg.demos)
               for i, e in enumerate(examples)]
    raw = generate_answers(model, tok, prompts, cfg.max_new_tokens, cfg.batch_size, progress, desc)
    return [extract_answer(r, e.question) for r, e in zip(raw, examples, strict=True)], raw, time.perf_counter() - t0


def run_eval_qa(cfg: EvalQAConfig, progress: bool = True) -> dict:
    """Answer ``cfg.data``'s questions with ``cfg.model`` (closed and/or open book); return the metrics dict.

    Keys: ``mode`` ('open-book' with a store, else 'closed-book'), ``em``, ``f1`` (of that mode, points),
    ``n``, ``closed_book`` ({em, f1} or None), ``open_book`` ({em, f1} or None), ``f1_gain`` (open - closed),
    ``recall_at_k`` (at K = ``docs``; None without a store), ``recall_at`` ({k: recall} for k = 1, K),
    ``k``, ``seconds`` (everything after loading), ``questions_per_second`` (of the reported mode:
    retrieval + prompting + generation), ``retrieval_seconds``, ``prompt_style``, ``examples``.
    """
    examples = select_questions(load_squad(cfg.data), cfg.limit, cfg.seed)
    ds = None
    if cfg.datastore:
        ds = open_store(cfg.datastore)
        if cfg.docs > len(ds):
            raise RalmError(f"--docs {cfg.docs}: the store {cfg.datastore} has only {len(ds)} chunks")
    lm = load(cfg.model)
    model, tok = lm.model, lm.tokenizer
    if ds is not None:  # chunk sizes are in the store's tokens; passages must be the model's tokens
        ds.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(tok), tokenizer_name=cfg.model)
    room = _context_length(model, tok) - cfg.max_new_tokens
    t0 = time.perf_counter()
    golds = [list(e.answers) for e in examples]
    result: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "datastore": cfg.datastore,
                              "n": len(examples), "k": cfg.docs if ds is not None else None,
                              "prompt_style": prompt_style(tok), "demos": cfg.demos,
                              "max_new_tokens": cfg.max_new_tokens}
    closed = opened = None
    retrieval_s = 0.0
    hit_ids: list[list[str]] = []
    if ds is None or cfg.closed_book:
        closed_pred, closed_raw, closed_s = _answer_all(model, tok, examples, None, cfg, room, progress, "closed book")
        closed = squad_scores(closed_pred, golds)
    if ds is not None:
        t1 = time.perf_counter()
        hits = ds.search([e.question for e in examples], k=cfg.docs)
        retrieval_s = time.perf_counter() - t1
        hit_ids = [[h.doc_id for h in per_q] for per_q in hits]
        passages = [[h.text for h in per_q] for per_q in hits]
        open_pred, open_raw, open_s = _answer_all(model, tok, examples, passages, cfg, room, progress, "open book")
        opened = squad_scores(open_pred, golds)
        known = {p.id for p in parse_squad(cfg.data)[0]}
        if any(d in known for ids in hit_ids for d in ids):
            recall = {k: recall_at_k([e.paragraph_id for e in examples], hit_ids, k) for k in sorted({1, cfg.docs})}
            result.update(recall_at_k=recall[cfg.docs], recall_at={str(k): v for k, v in recall.items()})
        else:
            result.update(recall_at_k=None, recall_at=None,
                          recall_note="no hit is a paragraph of this file (store built from other documents)")
    else:
        result.update(recall_at_k=None, recall_at=None)
    main = opened if opened is not None else closed
    main_s = (open_s + retrieval_s) if opened is not None else closed_s
    result.update(
        mode="open-book" if opened is not None else "closed-book", em=main["em"], f1=main["f1"],
        closed_book=closed, open_book=opened,
        f1_gain=(opened["f1"] - closed["f1"]) if opened is not None and closed is not None else None,
        seconds=round(time.perf_counter() - t0, 3), retrieval_seconds=round(retrieval_s, 3),
        questions_per_second=round(len(examples) / main_s, 3) if main_s > 0 else None,
    )
    shown = []
    for i, e in enumerate(examples[: cfg.examples]):
        ex: dict[str, Any] = {"id": e.id, "question": e.question, "answers": sorted(set(e.answers))}
        if closed is not None:
            ex.update(closed_book=closed_pred[i], closed_book_raw=closed_raw[i])
        if opened is not None:
            ex.update(open_book=open_pred[i], open_book_raw=open_raw[i], gold_in_top_k=e.paragraph_id in hit_ids[i],
                      retrieved=hit_ids[i])
        shown.append(ex)
    result["examples"] = shown
    return result
