"""Transformer text decoder over an image feature map, with KV-cached greedy and beam search.

The layer math is ``nn.TransformerDecoderLayer`` (post-norm, ReLU, batch-first) and the parameter
names are the same, so state dicts move between the two. It is written out here because
``nn.TransformerDecoder`` has no key/value cache: generating token t with it re-runs all t-1
previous tokens through every layer. Here each layer keeps its self-attention keys/values, and the
cross-attention keys/values of the image memory are projected once per image, so a new token costs
one position per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CachedMultiheadAttention",
    "CachedTransformerDecoderLayer",
    "DecoderCache",
    "TransformerTextDecoder",
    "sinusoidal_encoding",
    "sinusoidal_encoding_2d",
]


def sinusoidal_encoding(length: int, d_model: int) -> torch.Tensor:
    """Vaswani et al. positional encoding, [length, d_model]: sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
    return pe


def sinusoidal_encoding_2d(height: int, width: int, d_model: int) -> torch.Tensor:
    """Row/column sinusoidal encoding of a flattened H×W grid, [H*W, d_model] (row-major)."""
    quarter = d_model // 4
    freq = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(10000.0) / max(quarter, 1)))
    y = torch.arange(height, dtype=torch.float32)[:, None] * freq  # [H, q]
    x = torch.arange(width, dtype=torch.float32)[:, None] * freq  # [W, q]
    grid = torch.cat(
        [
            torch.sin(y)[:, None].expand(height, width, quarter),
            torch.cos(y)[:, None].expand(height, width, quarter),
            torch.sin(x)[None].expand(height, width, quarter),
            torch.cos(x)[None].expand(height, width, quarter),
        ],
        dim=-1,
    )
    return F.pad(grid.reshape(height * width, 4 * quarter), (0, d_model - 4 * quarter))


class CachedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch-first, same parameters and init) split into key/value
    projection and attention, so projected keys/values can be kept and reused."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.d_model, self.nhead, self.dropout = d_model, nhead, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.nhead, self.d_model // self.nhead).transpose(1, 2)

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values of ``x`` [B, L, d] as [B, heads, L, d/heads] each."""
        d = self.d_model
        k, v = F.linear(x, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Attend from queries ``x`` [B, Lq, d] to projected ``k``/``v``; ``causal`` needs Lq == Lk."""
        d = self.d_model
        q = self._heads(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))


@dataclass
class DecoderCache:
    """Per-layer attention state for incremental decoding of N sequences.

    ``cross`` holds each layer's projected memory keys/values (computed once); ``keys``/``values``
    are preallocated [N, heads, max_length, d/heads] self-attention buffers filled up to ``length``.
    """

    cross: list[tuple[torch.Tensor, torch.Tensor]]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new position's k/v for ``layer``; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows (beam search). ``index`` must map each row to a beam of the same image:
        those rows share the image memory, so the memory keys/values need no reordering."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class CachedTransformerDecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer(batch_first=True)`` default math (post-norm, ReLU), with a cache.

    Parameter names match, so ``load_state_dict`` works both ways.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = CachedMultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = CachedMultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        cache: DecoderCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Without ``cache``: causal attention over all of ``x``. With it: ``x`` holds the newest
        position(s), which attend to the cached ones (so no mask is needed)."""
        k, v = self.self_attn.key_value(x)
        if cache is None:
            sa = self.self_attn(x, k, v, causal=True)
        else:
            sa = self.self_attn(x, *cache.append(layer, k, v))
        x = self.norm1(x + self.dropout1(sa))
        x = self.norm2(x + self.dropout2(self.multihead_attn(x, *memory_kv)))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm3(x + self.dropout3(ff))


class TransformerTextDecoder(nn.Module):
    """Text head of MedSegText: flattened image features as memory, Transformer decoder, vocab logits.

    Args:
        vocab_size: tokenizer vocabulary size (embedding rows and output classes).
        memory_channels: channels of the image feature map (f4), projected to ``d_model``.
        pad_id, bos_id, eos_id: special token ids; pad/BOS are never generated.
        d_model, nhead, num_layers, dim_feedforward, dropout: Transformer sizes (paper: 768, 8, 6,
            2048 = the ``nn.TransformerDecoderLayer`` default, 0.1).
        max_length: longest sequence including BOS and EOS (paper: 50).
        memory_pos: add a 2D sinusoidal position code to the memory. Not in the paper; added because
            findings name sides and lung zones, and cross-attention over an unordered set of feature
            vectors only sees position through what the convolutions leak. Parameter-free.
    """

    def __init__(
        self,
        vocab_size: int,
        memory_channels: int,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        d_model: int = 768,
        nhead: int = 8,
        num_layers: int = 6,
        dim_feedforward: int = 2048,
        max_length: int = 50,
        dropout: float = 0.1,
        memory_pos: bool = True,
    ):
        super().__init__()
        for name, idx in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= idx < vocab_size:
                raise ValueError(f"{name}={idx} is outside the vocabulary (size {vocab_size})")
        self.vocab_size, self.d_model, self.max_length = vocab_size, d_model, max_length
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.memory_pos = memory_pos
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.register_buffer("pos", sinusoidal_encoding(max_length, d_model), persistent=False)
        self.memory_proj = nn.Linear(memory_channels, d_model)
        self.layers = nn.ModuleList(
            CachedTransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout) for _ in range(num_layers)
        )
        self.embed_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    # ---- memory and embeddings -------------------------------------------------------------
    def encode_memory(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map [B, C, H, W] -> memory [B, H*W, d_model]."""
        _, _, h, w = features.shape
        memory = self.memory_proj(features.flatten(2).transpose(1, 2))
        if self.memory_pos:
            memory = memory + sinusoidal_encoding_2d(h, w, self.d_model).to(memory)
        return memory

    def _embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d_model) + self.pos[offset : offset + tokens.shape[1]]
        return self.embed_dropout(x)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Raise a clear error for token tensors the model cannot embed."""
        if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor B×L, got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.max_length:
            raise ValueError(f"tokens have length {tokens.shape[1]} > max_length {self.max_length}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}) (vocab_size); got min {int(tokens.min())}, "
                f"max {int(tokens.max())}. Is the tokenizer the one this model was built for?"
            )

    # ---- teacher forcing ---------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Causal decoder states [B, L, d_model] for input ids ``tokens`` [B, L]."""
        x = self._embed(tokens)
        for layer in self.layers:
            x = layer(x, layer.multihead_attn.key_value(memory))
        return x

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits [B, L, vocab]; position t predicts token t+1."""
        self.check_tokens(tokens)
        return self.out(self.hidden_states(tokens, memory))

    # ---- incremental decoding ----------------------------------------------------------------
    def init_cache(self, memory: torch.Tensor, max_length: int | None = None) -> DecoderCache:
        """Project the memory keys/values of every layer once and allocate self-attention buffers."""
        n = memory.shape[0]
        length = max_length or self.max_length
        cross, keys, values = [], [], []
        for layer in self.layers:
            attn = layer.self_attn
            cross.append(layer.multihead_attn.key_value(memory))
            shape = (n, attn.nhead, length, self.d_model // attn.nhead)
            keys.append(memory.new_zeros(shape))
            values.append(memory.new_zeros(shape))
        return DecoderCache(cross, keys, values)

    def step(self, tokens: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Feed one new token per sequence ([N] ids) and return next-token logits [N, vocab]."""
        x = self._embed(tokens[:, None], offset=cache.length)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.cross[i], cache, i)
        cache.length += 1
        return self.out(x[:, 0])

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        max_length: int | None = None,
        beam_size: int = 1,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Decode from image memory [B, S, d_model]; returns ids [B, T] without BOS, ending at EOS
        and padded with ``pad_id`` after it. ``max_length`` counts BOS and EOS (default: the
        model's). Beam search ranks hypotheses by ``sum log p / length ** length_penalty`` and stops
        when every beam has produced EOS. ``use_cache=False`` re-runs the whole prefix each step
        (the reference the cached path is tested and benchmarked against)."""
        max_length = max_length or self.max_length
        if not 2 <= max_length <= self.max_length:
            raise ValueError(f"max_length must be in [2, {self.max_length}], got {max_length}")
        if not 1 <= beam_size <= self.vocab_size:
            raise ValueError(f"beam_size must be in [1, vocab_size={self.vocab_size}], got {beam_size}")
        memory = memory.repeat_interleave(beam_size, dim=0)
        stepper = _CachedStepper(self, memory, max_length) if use_cache else _RecomputeStepper(self, memory)
        if beam_size == 1:
            return self._greedy(stepper, memory, max_length - 1)
        return self._beam(stepper, memory, max_length - 1, beam_size, length_penalty)

    def _next_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[:, [self.pad_id, self.bos_id]] = float("-inf")  # never valid outputs
        return logits

    def _greedy(self, stepper, memory: torch.Tensor, max_new: int) -> torch.Tensor:
        n = memory.shape[0]
        seqs = torch.full((n, 1), self.bos_id, dtype=torch.long, device=memory.device)
        finished = torch.zeros(n, dtype=torch.bool, device=memory.device)
        for _ in range(max_new):
            token = self._next_logits(stepper(seqs)).argmax(-1).masked_fill(finished, self.pad_id)
            seqs = torch.cat([seqs, token[:, None]], dim=1)
            finished |= token == self.eos_id
            if finished.all():
                break
        return seqs[:, 1:]

    def _beam(self, stepper, memory: torch.Tensor, max_new: int, k: int, length_penalty: float) -> torch.Tensor:
        n, device, v = memory.shape[0], memory.device, self.vocab_size
        b = n // k
        seqs = torch.full((n, 1), self.bos_id, dtype=torch.long, device=device)
        # All beams start identical: only beam 0 may expand at the first step, or the top-k would
        # hold k copies of the same hypothesis.
        scores = torch.zeros(b, k, device=device)
        scores[:, 1:] = float("-inf")
        scores = scores.view(-1)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        lengths = torch.zeros(n, device=device)  # generated tokens including EOS
        # A finished hypothesis can only be extended by PAD, at no cost, so it keeps its score and
        # competes with live ones until every beam has ended.
        pad_only = torch.full((v,), float("-inf"), device=device)
        pad_only[self.pad_id] = 0.0
        row_base = torch.arange(b, device=device)[:, None] * k
        for _ in range(max_new):
            log_probs = torch.log_softmax(self._next_logits(stepper(seqs)), dim=-1)
            log_probs = torch.where(finished[:, None], pad_only, log_probs)
            cand = scores[:, None] + log_probs  # [N, V]
            cand_len = lengths + (~finished).float()
            ranked = cand / cand_len.clamp(min=1)[:, None] ** length_penalty
            top = ranked.view(b, k * v).topk(k, dim=1).indices  # [B, K]
            index = (row_base + top // v).view(-1)
            token = (top % v).view(-1)
            scores = cand.view(b, k * v).gather(1, top).view(-1)
            lengths = cand_len[index]
            finished = finished[index] | (token == self.eos_id)
            seqs = torch.cat([seqs[index], token[:, None]], dim=1)
            stepper.reorder(index)
            if finished.all():
                break
        final = (scores / lengths.clamp(min=1) ** length_penalty).view(b, k)
        best = final.argmax(dim=1)
        return seqs.view(b, k, -1)[torch.arange(b, device=device), best, 1:]


class _CachedStepper:
    """Next-token logits from the KV cache: one new position per call."""

    def __init__(self, decoder: TransformerTextDecoder, memory: torch.Tensor, max_length: int):
        self.decoder = decoder
        self.cache = decoder.init_cache(memory, max_length)

    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(seqs[:, -1], self.cache)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


class _RecomputeStepper:
    """Next-token logits by re-running the whole prefix (no cache); projects only the last position
    to the vocabulary so the comparison with the cache is about the decoder layers alone."""

    def __init__(self, decoder: TransformerTextDecoder, memory: torch.Tensor):
        self.decoder, self.memory = decoder, memory

    def __call__(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.decoder.out(self.decoder.hidden_states(seqs, self.memory)[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        """Nothing to move: the prefix is re-run and memory rows are shared by an image's beams."""
