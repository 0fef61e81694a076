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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.width = config.width
        self.c_attn = nn.Linear(config.width, 3 * config.width, bias=False)
        self.c_proj = nn.Linear(config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.width, dim=2)
        # (b, t, c) -> (b, heads, t, head_size)
        q = q.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, vocab) for `tokens` of shape (batch, time)."""
        _, t = tokens.shape
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds context {self.config.context}")
        positions = torch.arange(t, device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)  # (b, t, c)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight)  # tied head: (b, t, vocab)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per token."""
        logits = self(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
