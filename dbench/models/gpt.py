"""GPT-style decoder-only transformers as dbench's flat list of blocks.

Block 0 embeds tokens and adds learned positions; blocks 1..N are pre-norm
transformer layers (``x + attn(LN(x))``, then ``x + MLP(LN(x))``) with causal
self-attention through ``torch.nn.functional.scaled_dot_product_attention``;
the last block is the final LayerNorm and the language-model head. A module
boundary falls between whole blocks, so what crosses it is the residual
stream, (batch, positions, width).

Choices, and why:
- No weight tying between the embedding and the head (GPT-2 ties them): the
  two sit at the two ends of the model, in different modules on different
  devices, and a tied weight would have to be shared across modules, which no
  decoupled method's update rule defines. Every size below is untied.
- No dropout: every run is deterministic, and the engines must agree bit for bit.
- GPT-2's initialisation: normal(0, 0.02) weights, zero biases, and the two
  projections that write into the residual stream scaled by 1/sqrt(2·layers).
- Positions: a table of ``context`` learned vectors; a sequence may be
  shorter than the context, never longer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dbench.models.base import BlockModel
from dbench.registry import MODELS

VOCAB = 256  # byte-level tokens: the default number of classes of every size
INIT_STD = 0.02


class Embedding(nn.Module):
    """Token embedding plus learned position embedding: (B, T) int64 -> (B, T, width)."""

    def __init__(self, vocab: int, context: int, width: int):
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context of {self.context}")
        return self.tokens(idx) + self.positions.weight[:length]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one projection to queries, keys and values, one back."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TransformerBlock(nn.Module):
    """Pre-norm transformer layer: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LanguageModelHead(nn.Module):
    """Final LayerNorm, then a linear map to the vocabulary at every position: (B, T, width) -> (B, T, vocab)."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def gpt(name: str, layers: int, width: int, heads: int, context: int, vocab: int = VOCAB) -> BlockModel:
    """Embedding, ``layers`` transformer blocks, head: ``layers + 2`` blocks."""
    blocks: list[nn.Module] = [Embedding(vocab, context, width)]
    blocks += [TransformerBlock(width, heads) for _ in range(layers)]
    blocks.append(LanguageModelHead(width, vocab))
    model = BlockModel(blocks, name, inputs="text", context=context)
    _init_gpt2(model, layers)
    return model


def _init_gpt2(model: nn.Module, layers: int) -> None:
    if any(p.is_meta for p in model.parameters()):
        return  # described on the meta device: no values to draw (see models.base.init_weights)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
    # The projections that add into the residual stream: 2 per layer, so the stream's variance stays put with depth.
    for m in model.modules():
        if isinstance(m, TransformerBlock):
            nn.init.normal_(m.attn.proj.weight, 0.0, INIT_STD / math.sqrt(2 * layers))
            nn.init.normal_(m.mlp[2].weight, 0.0, INIT_STD / math.sqrt(2 * layers))


# name: (layers, width, heads, context). nano is CPU-sized; small has GPT-2 small's shape (untied, byte vocabulary).
SIZES = {
    "gpt-nano": (4, 128, 4, 128),
    "gpt-micro": (6, 256, 8, 256),
    "gpt-mini": (8, 512, 8, 512),
    "gpt-small": (12, 768, 12, 1024),
}


def _register(name: str, layers: int, width: int, heads: int, context: int) -> None:
    def build(num_classes: int = VOCAB) -> BlockModel:
        return gpt(name, layers, width, heads, context, vocab=num_classes)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = (f"{layers} pre-norm transformer blocks of width {width}, {heads} heads, context {context}: "
                     f"{layers + 2} blocks with the embedding and the head.")
    MODELS.register(name)(build)


for _name, _size in SIZES.items():
    _register(_name, *_size)
