"""RETRO-fitting (Borgeaud et al. 2022): chunked cross-attention and a retrieval encoder on a frozen causal LM.

The pretrained LM stays frozen and untouched; forward hooks on chosen decoder layers add

    h <- h + CCA(h, E)        E = RetrievalEncoder(neighbours, decoder activations of their chunk)

so only the encoder and the CCA layers train. Every CCA output projection starts at zero, which makes an
untrained RETRO-fit model give the frozen model's logits bit for bit, and a forward pass without neighbours
skips the hooks altogether (retrieval OFF is the frozen model, always).

One addition to the paper (``RetroConfig.match_gate``): each chunk's CCA output is scaled by a learned gate
on how much of the chunk its best neighbour contains (``trigram_match``). RETRO trained from scratch on
trillions of tokens learns when a neighbour is worth reading; fitted in an hour onto a frozen LM, the CCA
otherwise copies whatever its neighbours hold, and unrelated neighbours then cost perplexity.

Chunk geometry (chunk size m). Chunks sit on a grid of *absolute* positions in the document: chunk u holds
positions [u·m, (u+1)·m). The neighbours of chunk u were retrieved with chunk u's text, so only positions
from its last token on may read them: the *attending chunk* of u is [u·m + m − 1, (u+1)·m + m − 2].
A forward pass sees a window of the document starting at absolute position ``offset``; neighbours are given
for the chunks lying wholly inside the window (the retrieval encoder reads their decoder activations), and
positions before the first attending chunk read nothing, exactly as the first m − 1 tokens of a document.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ralm.errors import RalmError, refuse_below

PAD = -1  # neighbour token padding (short neighbours, missing neighbours)
GATE_SCALE = 30.0  # match gate logit multiplier (see ChunkedCrossAttention)


@dataclass
class RetroConfig:
    chunk_size: int = field(default=64, metadata={"help": "tokens per chunk m (RETRO: 64); must match the store"})
    neighbours: int = field(default=2, metadata={"help": "neighbours read per chunk (RETRO: 2)"})
    neighbour_len: int | None = field(default=None, metadata={"help": "tokens per neighbour: chunk + continuation "
                                                                      "(default: twice --chunk-size)"})
    cca_layers: list[int] | None = field(default=None, metadata={
        "help": "comma-separated 0-based decoder layers followed by CCA (default: RETRO's every 3rd layer from the 6th)"})
    enc_dim: int = field(default=256, metadata={"help": "retrieval encoder width"})
    enc_layers: int = field(default=2, metadata={"help": "retrieval encoder depth"})
    enc_heads: int = field(default=4, metadata={"help": "retrieval encoder attention heads"})
    cca_dim: int = field(default=256, metadata={"help": "inner width of each chunked cross-attention"})
    cca_heads: int = field(default=4, metadata={"help": "chunked cross-attention heads"})
    ffn_mult: int = field(default=4, metadata={"help": "encoder feed-forward width / enc_dim"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the new layers while training"})
    relative_positions: bool = field(default=True, metadata={
        "help": "CCA adds a learned bias per (attending token, neighbour token) offset, as RETRO's relative "
                "positions; it lets the model line a neighbour up with the text it continues"})
    rel_init: float = field(default=5.0, metadata={
        "help": "starting relative-position bias on the offsets j - i = m-1, m, m+1, where a neighbour's "
                "continuation lines up with the text being predicted: attention starts on the aligned tokens, "
                "so copying from a near-duplicate is learnt in tens of steps instead of thousands (Adam moves a "
                "bias by about lr per step); 0 starts uniform"})
    match_gate: bool = field(default=True, metadata={
        "help": "scale each chunk's CCA output by a learned gate on its match: the share of the chunk's token "
                "trigrams found in its best neighbour. It starts 95% open whatever the match and learns how far "
                "to close on poor ones, so the new layers can leave unrelated neighbours alone"})

    def __post_init__(self) -> None:
        if self.neighbour_len is None:  # RETRO: a neighbour is its chunk and that chunk's continuation
            self.neighbour_len = 2 * self.chunk_size
        refuse_below(self, ("chunk_size", "neighbours", "neighbour_len", "enc_dim", "enc_layers", "enc_heads",
                            "cca_dim", "cca_heads", "ffn_mult"))
        if self.chunk_size < 2:
            raise RalmError(f"--chunk-size {self.chunk_size}: must be >= 2")
        if self.enc_dim % self.enc_heads or self.cca_dim % self.cca_heads:
            raise RalmError("--enc-dim and --cca-dim must be multiples of their number of heads")
        if not 0.0 <= self.dropout < 1.0:
            raise RalmError(f"--dropout {self.dropout}: must be in [0, 1)")
        if self.cca_layers is not None:
            self.cca_layers = sorted(set(int(i) for i in self.cca_layers))
            if not self.cca_layers or self.cca_layers[0] < 0:
                raise RalmError(f"--cca-layers {self.cca_layers}: need at least one layer index >= 0")


def default_cca_layers(n_layers: int) -> list[int]:
    """RETRO's rule, 0-based: CCA after every 3rd layer from the 6th (12 layers: 6, 9, 12 in 1-based terms)."""
    return [i - 1 for i in range(min(6, n_layers), n_layers + 1, 3)]


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder's list of layers (Llama, Gemma 3, GPT-2, ... all keep one ModuleList of that length)."""
    n = model.config.get_text_config().num_hidden_layers
    modules = dict(model.named_modules())
    known = ("model.layers", "transformer.h", "model.language_model.layers", "model.decoder.layers", "gpt_neox.layers")
    for name in (*known, *modules):  # the usual places first; a vision tower's layers are never the decoder
        module = modules.get(name)
        if isinstance(module, nn.ModuleList) and len(module) == n and "vision" not in name and "visual" not in name:
            return module
    raise RalmError(f"{type(model).__name__}: cannot find its {n} decoder layers to fit CCA onto")


def window_chunks(offset: int, length: int, m: int) -> tuple[int, int, int]:
    """For a window of ``length`` tokens at absolute ``offset``: (local start of its first whole chunk,
    absolute index of that chunk, number of whole chunks)."""
    o = (-offset) % m
    return o, (offset + o) // m, max(0, (length - o) // m)


def trigram_match(chunks: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Share of each chunk's token trigrams found anywhere in its best neighbour.

    chunks (B, U, m) token ids; neighbours (B, U, K, R) token ids, PAD where absent -> (B, U) in [0, 1].
    A bag of trigrams: it ignores where the match sits, so a shift of the grid (BOS) leaves it unchanged.
    """
    def grams(x: torch.Tensor) -> torch.Tensor:  # (..., n) -> (..., n-2) trigram hashes, -1 if any is PAD
        h = (x[..., :-2] << 40) | (x[..., 1:-1] << 20) | x[..., 2:]  # ids < 2^20 (Gemma 3: 262,144)
        return h.masked_fill((x[..., :-2] < 0) | (x[..., 1:-1] < 0) | (x[..., 2:] < 0), -1)

    c, n = grams(chunks), grams(neighbours)  # (B, U, m-2), (B, U, K, R-2)
    if c.shape[-1] == 0 or n.shape[-1] == 0:
        return chunks.new_zeros(chunks.shape[:2], dtype=torch.float)
    hit = ((c[:, :, :, None, None] == n[:, :, None]) & (n[:, :, None] >= 0)).any(-1)  # (B, U, m-2, K)
    return hit.float().mean(2).amax(-1)


# ---- building blocks ---------------------------------------------------------------------------------
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, key_ok: torch.Tensor | None,
            dropout: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention: q (N, Lq, D), k/v (N, Lk, D), key_ok (N, Lk) bool or None -> (N, Lq, D).

    ``bias`` (h, Lq, Lk) is added to the attention logits (relative positions). A query whose keys are all
    masked would get NaN from softmax; its keys are unmasked here instead and the caller zeroes what it
    produced.
    """
    N, Lq, D = q.shape
    split = lambda x: x.view(N, x.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731 (N, h, L, D/h)
    mask = None
    if key_ok is not None:
        mask = (key_ok | ~key_ok.any(-1, keepdim=True))[:, None, None, :]  # (N, 1, 1, Lk)
    if bias is not None:
        bias = bias.to(q.dtype)[None]  # (1, h, Lq, Lk)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(N, Lq, D)


class CrossAttention(nn.Module):
    """Pre-norm cross-attention from ``x`` (width d_q) to ``ctx`` (width d_kv) through an inner width."""

    def __init__(self, d_q: int, d_kv: int, inner: int, heads: int, dropout: float, zero_out: bool = False):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d_q), nn.LayerNorm(d_kv)
        self.q, self.kv = nn.Linear(d_q, inner, bias=False), nn.Linear(d_kv, 2 * inner, bias=False)
        self.out = nn.Linear(inner, d_q, bias=False)
        if zero_out:  # the layer starts as an exact no-op
            nn.init.zeros_(self.out.weight)
        self.heads, self.dropout = heads, dropout

    def project_kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of ``ctx``: what a decode keeps per chunk instead of projecting it every step."""
        k, v = self.kv(self.norm_kv(ctx)).chunk(2, dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_ok: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        k, v = self.project_kv(ctx) if kv is None else kv
        drop = self.dropout if self.training else 0.0
        return self.out(_attend(self.q(self.norm_q(x)), k, v, self.heads, ctx_ok, drop, bias))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk's decoder activations, FFN.

    Every branch's output starts at zero, so an untrained encoder passes each neighbour token's own embedding
    through unchanged: the chunk context is the same for all 128 tokens of a neighbour and, at random
    initialisation, drowns what tells them apart (measured on SmolLM2: 2% of the encoding's variance left
    token-specific), which is exactly what copying from a neighbour needs.
    """

    def __init__(self, cfg: RetroConfig, d_model: int):
        super().__init__()
        e = cfg.enc_dim
        self.self_attn = CrossAttention(e, e, e, cfg.enc_heads, cfg.dropout, zero_out=True)
        self.cross_attn = CrossAttention(e, d_model, e, cfg.enc_heads, cfg.dropout, zero_out=True)
        self.ffn = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, cfg.ffn_mult * e), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * e, e), nn.Dropout(cfg.dropout))
        nn.init.zeros_(self.ffn[3].weight)
        nn.init.zeros_(self.ffn[3].bias)

    def forward(self, x: torch.Tensor, x_ok: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        # x (N, R, e) neighbour tokens; x_ok (N, R); chunk (N, m, d) decoder activations of its chunk
        x = x + self.self_attn(x, x, x_ok)
        x = x + self.cross_attn(x, chunk)
        return x + self.ffn(x)


class RetrievalEncoder(nn.Module):
    """Encodes each neighbour (chunk + continuation, embedded with the frozen LM's token embeddings),
    conditioned on the decoder activations of the chunk it was retrieved for."""

    def __init__(self, cfg: RetroConfig, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Sequential(nn.Linear(d_model, cfg.enc_dim), nn.LayerNorm(cfg.enc_dim))
        self.pos = nn.Parameter(torch.randn(cfg.neighbour_len, cfg.enc_dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(cfg, d_model) for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(cfg.enc_dim)

    def forward(self, emb: torch.Tensor, ok: torch.Tensor, chunks: torch.Tensor) -> torch.Tensor:
        # emb (B, U, K, R, d) neighbour token embeddings; ok (B, U, K, R); chunks (B, U, m, d)
        B, U, K, R, d = emb.shape
        x = self.proj(emb) + self.pos[:R]  # (B, U, K, R, e), unit scale whatever the LM's embedding scale
        x = x.view(B * U * K, R, -1)
        ctx = chunks.unsqueeze(2).expand(B, U, K, *chunks.shape[2:]).reshape(B * U * K, chunks.shape[2], d)
        x_ok = ok.reshape(B * U * K, R)
        for layer in self.layers:
            x = layer(x, x_ok, ctx)
        return self.norm(x).view(B, U, K * R, -1)  # (B, U, K·R, e)


class ChunkedCrossAttention(nn.Module):
    """Tokens of the attending chunk of u read the encoded neighbours of chunk u (zero-initialised output,
    scaled by each attending token's residual-stream RMS)."""

    def __init__(self, cfg: RetroConfig, d_model: int):
        super().__init__()
        self.m, self.r = cfg.chunk_size, cfg.neighbour_len
        self.attn = CrossAttention(d_model, cfg.enc_dim, cfg.cca_dim, cfg.cca_heads, cfg.dropout, zero_out=True)
        # RETRO's relative positions: one learned logit bias per head for every offset j - i between the
        # i-th attending token and the j-th token of a neighbour
        self.rel = None
        if cfg.relative_positions:
            rel = torch.zeros(cfg.cca_heads, self.m + self.r - 1)  # index j - i + m - 1
            rel[:, 2 * self.m - 2:2 * self.m + 1] = cfg.rel_init  # j - i in {m-1, m, m+1} (±1: a BOS shift)
            self.rel = nn.Parameter(rel)
        # gate = sigmoid(GATE_SCALE · (w · match + c)), starting at (w, c) = (0, 0.1): 95% open whatever the
        # match. Starting closed on poor matches starves the new layers of the broad signal they learn from
        # first (measured: worse than frozen on near-copies after 16 steps, where an open start had gained
        # 0.4 nats); the scale lets Adam (steps of about lr) move the logit by ~30·lr per step, so the gate
        # can close on unrelated neighbours within a short run.
        self.gate = nn.Parameter(torch.tensor([0.0, 0.1])) if cfg.match_gate else None

    def _bias(self, K: int, R: int) -> torch.Tensor | None:
        """(h, m, K·R) logit bias of every (attending token, neighbour token) pair."""
        if self.rel is None:
            return None
        i, j = torch.arange(self.m)[:, None], torch.arange(R)[None, :]
        b = self.rel[:, j - i + self.m - 1]  # (h, m, R)
        return b.repeat(1, 1, K)  # the same offsets within each of the K neighbours

    def forward(self, h: torch.Tensor, enc: torch.Tensor, enc_ok: torch.Tensor, first: int, K: int,
                match: torch.Tensor | None = None) -> torch.Tensor:
        # h (B, L, d); enc (B, U, K·R, e); enc_ok (B, U, K·R); first: local start of the first whole chunk;
        # match (B, U): trigram_match of each chunk and its neighbours (needed with the match gate)
        B, L, d = h.shape
        U, m = enc.shape[1], self.m
        s = first + m - 1  # the first attending chunk starts at the last token of the first chunk
        if U == 0 or s >= L:
            return torch.zeros_like(h)
        att = h[:, s:s + U * m]  # (B, <=U·m, d)
        n = att.shape[1]
        att = F.pad(att, (0, 0, 0, U * m - n)).reshape(B * U, m, d)  # (B·U, m, d)
        bias = self._bias(K, enc.shape[2] // K)
        out = self._read(att, enc.reshape(B * U, *enc.shape[2:]), enc_ok.reshape(B * U, -1), bias,
                         None if match is None else match.reshape(B * U))
        out = out.reshape(B, U * m, d)[:, :n]
        return F.pad(out, (0, 0, s, L - s - n))  # (B, L, d)

    def step(self, h: torch.Tensor, start: int, first: int, enc: torch.Tensor, enc_ok: torch.Tensor, K: int,
             match: torch.Tensor | None, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``forward`` for the positions [start, start + L) of a sequence whose earlier positions were seen
        (a cached decode): h (B, L, d) those positions only; enc (B, U, K·R, e), enc_ok, match (B, U) every
        whole chunk so far; ``kv`` this layer's keys/values per chunk, extended here as chunks are read."""
        B, L, d = h.shape
        m, s = self.m, first + self.m - 1
        bias = self._bias(K, enc.shape[2] // K)  # (h, m, K·R)
        out = torch.zeros_like(h)
        i = max(start, s)
        while i < start + L:  # one attending chunk at a time (a decode step: one position, one chunk)
            u, a = divmod(i - s, m)  # chunk u is whole: its last token s + u·m <= i
            j = min(start + L, s + (u + 1) * m)
            while len(kv) <= u:
                kv.append(self.attn.project_kv(enc[:, len(kv)]))
            out[:, i - start:j - start] = self._read(
                h[:, i - start:j - start], enc[:, u], enc_ok[:, u], None if bias is None else bias[:, a:a + j - i],
                None if match is None else match[:, u], kv[u])
            i = j
        return out

    def _read(self, att: torch.Tensor, enc: torch.Tensor, enc_ok: torch.Tensor, bias: torch.Tensor | None,
              match: torch.Tensor | None, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # att (N, q, d) attending tokens of one chunk each; enc (N, K·R, e); enc_ok (N, K·R); match (N,)
        out = self.attn(att, enc, enc_ok, bias, kv=kv)
        # write in units of the stream's own RMS: it grows with depth (SmolLM2: ~90 after layer 6, ~730
        # after layer 30), and a fixed-scale output would need a different learning rate at every layer
        out = out * att.float().pow(2).mean(-1, keepdim=True).sqrt().to(out.dtype)
        out = out * enc_ok.any(-1).reshape(-1, 1, 1)  # chunks without any neighbour read nothing
        if self.gate is not None:
            if match is None:
                raise ValueError("a CCA layer with a match gate needs each chunk's match")
            w, c = self.gate.unbind()
            out = out * torch.sigmoid(GATE_SCALE * (w * match + c)).reshape(-1, 1, 1).to(out.dtype)
        return out


# ---- the RETRO-fit wrapper ---------------------------------------------------------------------------
@dataclass
class RetroCache:
    """What an incremental decode keeps between forward passes (with the base model's ``past_key_values``):
    the tokens and first-CCA-layer activations seen (a chunk is encoded from its own activations once its
    last token is in), each whole chunk's encoding, match and, per CCA layer, keys and values. Outputs equal
    the recomputed window's: RETRO-fit is causal (a position reads only chunks that end at or before it)."""

    length: int = 0  # positions seen
    ids: torch.Tensor | None = None  # (B, T) token ids seen (PAD at virtual positions)
    acts: torch.Tensor | None = None  # (B, T, d) the first CCA layer's input activations
    encoded: torch.Tensor | None = None  # (B, U, K·R, e) every whole chunk so far
    encoded_ok: torch.Tensor | None = None  # (B, U, K·R)
    match: torch.Tensor | None = None  # (B, U), match gate only
    kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass
class _Pass:
    """What the hooks of one forward pass need: the neighbours and, once encoded, their encoding."""

    neighbours: torch.Tensor  # (B, U, K, R) token ids, PAD where absent
    first: int  # local start of the first whole chunk
    match: torch.Tensor | None  # (B, U) trigram_match of each whole chunk with its neighbours (match gate only)
    encoded: torch.Tensor | None = None  # (B, U, K·R, e)
    encoded_ok: torch.Tensor | None = None  # (B, U, K·R)
    cache: RetroCache | None = None  # a decode's state; then ``match`` holds only the chunks new in this pass
    start: int = 0  # with ``cache``: the sequence position of the window's first token


class RetroFit(nn.Module):
    """A frozen causal LM with a retrieval encoder and CCA layers hooked after chosen decoder layers.

    ``model(input_ids, neighbours=N, offset=o)``: ``N`` (B, U, K, R) holds the neighbour tokens of the U
    whole chunks of a window starting at absolute position ``o`` (see ``window_chunks``); ``None`` runs
    the frozen model alone. Any other keyword goes to the base model.
    """

    def __init__(self, base: Any, cfg: RetroConfig):
        super().__init__()
        text = base.config.get_text_config()
        layers = decoder_layers(base)
        cfg = replace(cfg, cca_layers=cfg.cca_layers or default_cca_layers(len(layers)))  # the caller's stays as is
        if cfg.cca_layers[-1] >= len(layers):
            raise RalmError(f"--cca-layers {cfg.cca_layers}: the model has {len(layers)} layers (0-based)")
        self.cfg, self.base = cfg, base
        for p in base.parameters():
            p.requires_grad_(False)
        d = text.hidden_size
        self.encoder = RetrievalEncoder(cfg, d)
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(cfg, d) for i in cfg.cca_layers})
        self._pass: _Pass | None = None
        self._handles = [layers[i].register_forward_hook(self._hook(str(i))) for i in cfg.cca_layers]

    # the new parameters are the only ones that train and the only ones a checkpoint holds
    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def new_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().contiguous() for n, p in self.new_parameters().items()}

    def load_new_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.new_parameters()
        if set(state) != set(own):
            missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise RalmError(f"checkpoint does not fit this RETRO-fit layout (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
        with torch.no_grad():
            for name, p in own.items():
                if state[name].shape != p.shape:
                    raise RalmError(f"checkpoint tensor {name} has shape {tuple(state[name].shape)}, "
                                    f"expected {tuple(p.shape)}")
                p.copy_(state[name])

    def no_weight_decay(self) -> set[str]:
        """The matrices the training loop must not decay: the relative-position biases (a bias of 0 means
        uniform attention, which decay would pull back to)."""
        return {n for n in self.new_parameters() if n.endswith(".rel")}

    def train(self, mode: bool = True) -> RetroFit:
        """Train or evaluate the new layers; the frozen LM always keeps inference behaviour (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    def parameter_counts(self) -> dict[str, int]:
        new = sum(p.numel() for p in self.new_parameters().values())
        base = sum(p.numel() for p in self.base.parameters())
        return {"new": new, "base": base, "new_share": new / base}

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            p = self._pass
            if p is None:  # retrieval OFF: the frozen layer's output, untouched
                return None
            h = output[0] if isinstance(output, tuple) else output  # (B, L, d)
            x = h.to(self.encoder.pos.dtype)  # the new layers may hold another dtype than the base
            if p.encoded is None:  # the first CCA layer encodes the neighbours from its own activations
                p.encoded, p.encoded_ok = self._encode(p, x) if p.cache is None else self._extend(p, x)
            K = p.neighbours.shape[2]
            if p.start == 0:  # the whole window (a decode's prompt too)
                out = self.cca[name](x, p.encoded, p.encoded_ok, p.first, K, p.match)
            else:
                out = self.cca[name].step(x, p.start, p.first, p.encoded, p.encoded_ok, K, p.match,
                                          p.cache.kv.setdefault(name, []))
            h = h + out.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    def _encode(self, p: _Pass, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, U = p.neighbours.shape[:2]
        m = self.cfg.chunk_size
        return self._encode_chunks(p.neighbours, h[:, p.first:p.first + U * m].reshape(B, U, m, h.shape[-1]))

    def _encode_chunks(self, N: torch.Tensor, chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # N (B, U, K, R) neighbour tokens; chunks (B, U, m, d) the decoder activations of their chunks
        B, U, K, R = N.shape
        ok = N != PAD
        if U == 0:
            return chunks.new_zeros(B, 0, K * R, self.cfg.enc_dim), ok.reshape(B, 0, K * R)
        emb = self.base.get_input_embeddings()(N.clamp(min=0))  # (B, U, K, R, d), frozen embeddings
        enc = self.encoder(emb.to(chunks.dtype), ok, chunks)
        return enc, ok.reshape(B, U, K * R)

    def _extend(self, p: _Pass, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode's first CCA layer: keep the window's activations, encode the chunks it completes."""
        c, m = p.cache, self.cfg.chunk_size
        c.acts = x if c.acts is None else torch.cat([c.acts, x], 1)  # (B, T + L, d)
        U0, U = (0 if c.encoded is None else c.encoded.shape[1]), p.neighbours.shape[1]
        B, d = x.shape[0], x.shape[-1]
        chunks = c.acts[:, p.first + U0 * m:p.first + U * m].reshape(B, U - U0, m, d)
        enc, ok = self._encode_chunks(p.neighbours[:, U0:U], chunks)
        if c.encoded is None:
            c.encoded, c.encoded_ok, c.match = enc, ok, p.match
        else:
            c.encoded, c.encoded_ok = torch.cat([c.encoded, enc], 1), torch.cat([c.encoded_ok, ok], 1)
            c.match = None if p.match is None else torch.cat([c.match, p.match], 1)
        p.match = c.match  # from here on the CCA layers read every chunk's
        return c.encoded, c.encoded_ok

    @contextmanager
    def _with(self, p: _Pass | None):
        self._pass = p
        try:
            yield
        finally:
            self._pass = None

    def forward(self, input_ids: torch.Tensor, neighbours: torch.Tensor | None = None, offset: int = 0,
                retro_cache: RetroCache | None = None, **kwargs: Any) -> Any:
        # with ``inputs_embeds`` (prompt tuning) the base reads those, and ``input_ids`` only give the window's
        # shape and the tokens the match gate compares (PAD at the virtual positions: they match nothing)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = embeds
        if neighbours is None:
            if retro_cache is not None:
                raise RalmError("a RETRO-fit decode cache needs the neighbours (retrieval off: the base's own cache)")
            return self.base(**kwargs)
        if retro_cache is not None:
            return self._decode(input_ids, neighbours, offset, retro_cache, kwargs)
        B, L = input_ids.shape
        first, _, U = window_chunks(offset, L, self.cfg.chunk_size)
        if neighbours.dim() != 4 or neighbours.shape[:2] != (B, U) or neighbours.shape[3] > self.cfg.neighbour_len:
            raise RalmError(f"neighbours of shape {tuple(neighbours.shape)}: expected ({B}, {U}, K, "
                            f"<={self.cfg.neighbour_len}) for a {L}-token window at offset {offset}")
        if U == 0:
            return self.base(**kwargs)
        neighbours = neighbours.to(input_ids.device)
        match = None
        if self.cfg.match_gate:  # only the gate reads it; every forward pass would pay for it otherwise
            match = trigram_match(input_ids[:, first:first + U * self.cfg.chunk_size].reshape(B, U, -1), neighbours)
        with self._with(_Pass(neighbours, first, match)):
            return self.base(**kwargs)

    def _decode(self, input_ids: torch.Tensor, neighbours: torch.Tensor, offset: int, c: RetroCache,
                kwargs: dict[str, Any]) -> Any:
        """One forward pass of a cached decode: ``input_ids`` (B, L) continue the ``c.length`` positions seen,
        in a sequence starting at absolute ``offset``; ``neighbours`` (B, U, K, R) are those of every whole
        chunk of the sequence so far (the same layout a window over all of it would take)."""
        B, L = input_ids.shape
        m = self.cfg.chunk_size
        first, _, U = window_chunks(offset, c.length + L, m)
        U0 = 0 if c.encoded is None else c.encoded.shape[1]
        if neighbours.dim() != 4 or neighbours.shape[:2] != (B, U) or neighbours.shape[3] > self.cfg.neighbour_len:
            raise RalmError(f"neighbours of shape {tuple(neighbours.shape)}: expected ({B}, {U}, K, "
                            f"<={self.cfg.neighbour_len}) for {c.length} + {L} decoded positions at offset {offset}")
        neighbours = neighbours.to(input_ids.device)
        ids = input_ids if c.ids is None else torch.cat([c.ids, input_ids], 1)  # (B, T + L)
        match = None
        if self.cfg.match_gate:  # the chunks this pass completes
            match = trigram_match(ids[:, first + U0 * m:first + U * m].reshape(B, U - U0, m), neighbours[:, U0:U])
        with self._with(_Pass(neighbours, first, match, cache=c, start=c.length)):
            out = self.base(**kwargs)
        c.length, c.ids = c.length + L, ids
        return out


def pad_neighbours(seqs: list[list[list[int]]], k: int, r: int) -> torch.Tensor:
    """(U, K, R) tensor from per-chunk lists of neighbour token lists (fewer than K or shorter than R: PAD)."""
    out = torch.full((len(seqs), k, r), PAD, dtype=torch.long)
    for u, chunk in enumerate(seqs):
        for j, toks in enumerate(chunk[:k]):
            toks = toks[:r]
            out[u, j, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out

