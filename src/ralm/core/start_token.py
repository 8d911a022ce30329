"""The plain-text start token: the one token every document, prompt and chunk grid starts with.

Its own module, without torch, because ``lm/presets.py`` (imported at CLI start) declares presets' tokens with it.
"""

from __future__ import annotations

from typing import Any

_START_ATTR = "ralm_start_token"  # set on a preset's tokenizer object: the preset's declared start token
SEPARATORS = ("<|endoftext|>",)  # document separators of pretraining corpora, tried before the eos token


def _template_text(tok: Any) -> str:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, dict):  # named templates
        return "\n".join(str(v) for v in tpl.values())
    return tpl or ""


def start_token(tok: Any) -> str | None:
    """The token every plain text is scored after (None: the tokenizer has no BOS; the first token is unscored).

    A preset's declared token; else the tokenizer's BOS, unless the BOS is a chat-turn token (it appears
    literally in the chat template, as <|im_start|> does for instruct models) and a document separator
    exists (<|endoftext|>, or an eos token that is not itself part of the chat template): an instruct
    model's weights were pretrained on plain text after that separator, not after a chat turn.
    """
    declared = getattr(tok, _START_ATTR, None)
    if declared is not None:
        return declared
    bos = tok.bos_token
    template = _template_text(tok)
    if bos is None or bos not in template:
        return bos
    for sep in (*SEPARATORS, tok.eos_token):
        if sep is not None and sep != bos and _has_token(tok, sep) and sep not in template:
            return sep
    return bos


def _has_token(tok: Any, token: str) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)  # a fast tokenizer: a lookup, not a copy of the vocabulary
    return backend.token_to_id(token) is not None if backend is not None else token in tok.get_vocab()


def start_token_id(tok: Any) -> int | None:
    """Id of ``start_token(tok)``: the first input id of every plain document, prompt and chunk grid."""
    token = start_token(tok)
    return None if token is None else tok.convert_tokens_to_ids(token)
