"""The float model: a byte-level GPT in the style of nanoGPT.

This is the model miners train. Its architecture is the one the canonical
(integer) evaluator in `training.evaluate` computes exactly:

- byte vocabulary (256 symbols), learned token and position embeddings;
- pre-norm transformer blocks: LayerNorm (weight only, eps 1e-5), causal
  self-attention scaled by 1/sqrt(head_size), LayerNorm, MLP with exact GELU;
- a final LayerNorm and a language-model head tied to the token embedding;
- no biases anywhere, no dropout.

Weights are named as in `tensor_names()`; that order is the canonical order
used by the weight format, the slice partition and every hash over weights.

`GPT.generate` samples text from the model (nanoGPT's loop, with a key-value
cache while the sequence fits the context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYERNORM_EPS = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model; fixed by genesis."""

    vocab_size: int
    """Number of token symbols: 256 for a byte-level model."""
    context: int
    """Maximum sequence length (positions in the position embedding)."""
    layers: int
    """Number of transformer blocks."""
    heads: int
    """Attention heads per block."""
    width: int
    """Embedding width (residual stream size); a multiple of `heads`."""

    @property
    def head_size(self) -> int:
        return self.width // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight tensor's name and shape, in canonical order."""
        c = self.width
        shapes: dict[str, tuple[int, ...]] = {
            "wte.weight": (self.vocab_size, c),
            "wpe.weight": (self.context, c),
        }
        for i in range(self.layers):
            shapes[f"h.{i}.ln_1.weight"] = (c,)
            shapes[f"h.{i}.attn.c_attn.weight"] = (3 * c, c)
            shapes[f"h.{i}.attn.c_proj.weight"] = (c, c)
            shapes[f"h.{i}.ln_2.weight"] = (c,)
            shapes[f"h.{i}.mlp.c_fc.weight"] = (4 * c, c)
            shapes[f"h.{i}.mlp.c_proj.weight"] = (c, 4 * c)
        shapes["ln_f.weight"] = (c,)
        return shapes

    def tensor_names(self) -> list[str]:
        return list(self.tensor_shapes())

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())


@dataclass
class LayerCache:
    """One block's attention keys and values for the positions the model has seen, so that
    generation computes only the newest position each step. Mutable: `extend` appends."""

    keys: torch.Tensor | None = None
    """Keys of the positions seen, (batch, heads, time, head_size); None before the first."""
    values: torch.Tensor | None = None
    """Values of the positions seen, (batch, heads, time, head_size); None before the first."""

    @property
    def length(self) -> int:
        """Positions seen."""
        return 0 if self.keys is None else self.keys.size(2)

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new positions' keys and values; every position's, seen and new."""
        if self.keys is not None and self.values is not None:
            keys = torch.cat((self.keys, keys), dim=2)
            values = torch.cat((self.values, values), dim=2)
        self.keys, self.values = keys, values
        return keys, values


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.width = config.width
        self.c_attn = nn.Linear(config.width, 3 * config.width, bias=False)
        self.c_proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        # (b, t, c) -> (b, heads, t, head_size)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            seen = cache.length
            k, v = cache.extend(k, v)  # (b, heads, seen + t, head_size)
            # New position i (absolute seen + i) attends to positions 0 .. seen + i.
            mask = torch.ones(t, seen + t, dtype=torch.bool, device=x.device).tril(diagonal=seen)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # (b, heads, t, head_size) -> (b, t, c)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        out: torch.Tensor = self.c_proj(y)
        return out


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.width, 4 * config.width, bias=False)
        self.c_proj = nn.Linear(4 * config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c_proj(F.gelu(self.c_fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=LAYERNORM_EPS, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.width, eps=LAYERNORM_EPS, bias=False)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class GPT(nn.Module):
    """The float model. Build it from canonical weights with `training.weights`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.width)
        self.wpe = nn.Embedding(config.context, config.width)
        self.h = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, eps=LAYERNORM_EPS, bias=False)

    def forward(self, tokens: torch.Tensor, cache: list[LayerCache] | None = None) -> torch.Tensor:
        """Logits of shape (batch, time, vocab) for `tokens` of shape (batch, time).

        With `cache` (one `LayerCache` per block, from `new_cache`), `tokens` continue the
        positions the cache has seen, and the cache is extended by them."""
        _, t = tokens.shape
        seen = 0 if cache is None else cache[0].length
        if seen + t > self.config.context:
            raise ValueError(f"sequence length {seen + t} exceeds context {self.config.context}")
        positions = torch.arange(seen, seen + t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)  # (b, t, c)
        for layer, block in enumerate(self.h):
            x = block(x, None if cache is None else cache[layer])
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight)  # tied head: (b, t, vocab)

    def new_cache(self) -> list[LayerCache]:
        """An empty key-value cache for `forward`: one `LayerCache` per block."""
        return [LayerCache() for _ in self.h]

    def generate(
        self,
        tokens: torch.Tensor,
        new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`tokens` (batch, time) followed by `new_tokens` sampled ones: (batch, time + new_tokens).

        Each step samples the next token from softmax(logits / temperature) at the last
        position, among the `top_k` likeliest tokens when given (ties with the k-th kept),
        drawing from `generator` (seeded: the same tokens on the same device and build). The
        model sees its context's worth of tokens at most: the last `context`. While the
        sequence fits, a key-value cache computes only the newest position each step; once it
        is longer, each step recomputes the last `context` tokens (their positions start at 0).
        """
        if tokens.dim() != 2 or tokens.size(1) < 1:
            raise ValueError(f"tokens: shape {tuple(tokens.shape)}, want (batch, time) with time >= 1")
        if new_tokens < 0:
            raise ValueError(f"new_tokens: got {new_tokens}, want 0 or more")
        if not temperature > 0:
            raise ValueError(f"temperature: got {temperature}, want more than 0")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: got {top_k}, want at least 1")
        context = self.config.context
        cache = self.new_cache()
        unseen = tokens  # (b, t): the tokens the cache has not seen
        with torch.inference_mode():
            for _ in range(new_tokens):
                # (b, t, vocab); past the context, positions restart at the crop: the cache is of no use
                logits = self(unseen, cache) if tokens.size(1) <= context else self(tokens[:, -context:])
                logits = logits[:, -1, :]  # (b, vocab)
                # Shifted so that the largest is 0 first, and the temperature kept a normal number of
                # the logits' dtype: a tiny temperature gives -inf (greedy), never NaN.
                scale = max(temperature, torch.finfo(logits.dtype).tiny)
                logits = (logits - logits.max(dim=-1, keepdim=True).values) / scale
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (b, 1)
                    logits = logits.masked_fill(logits < kth, -math.inf)
                probabilities = F.softmax(logits, dim=-1)  # (b, vocab)
                unseen = torch.multinomial(probabilities, num_samples=1, generator=generator)  # (b, 1)
                tokens = torch.cat((tokens, unseen), dim=1)
        return tokens

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per token."""
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
