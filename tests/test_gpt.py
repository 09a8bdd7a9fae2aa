"""The gpt-* models: shapes, parameter counts, causal attention against a reference written from the
definition, and the model cut into K modules computing exactly what the whole model computes."""
from __future__ import annotations

import math

import pytest
import torch

from dbench.models.base import describe
from dbench.models.gpt import SIZES, CausalSelfAttention
from dbench.partition import partition, split_modules
from dbench.registry import MODELS

VOCAB = 256


def expected_params(layers: int, width: int, context: int, vocab: int = VOCAB) -> int:
    """Counted from the architecture: embeddings; per layer two LayerNorms (2·2w), qkv (3w²+3w),
    projection (w²+w), MLP (4w²+4w and 4w²+w); final LayerNorm (2w) and an untied head without bias (w·V)."""
    per_layer = 4 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (4 * width * width + 4 * width) + (4 * width * width + width)
    return vocab * width + context * width + layers * per_layer + 2 * width + width * vocab


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_are_described_with_their_parameter_counts(name):
    layers, width, heads, context = SIZES[name]
    info = describe(name)
    assert info["params"] == expected_params(layers, width, context)
    assert info["blocks"] == layers + 2
    assert info["inputs"] == "text" and info["context"] == context
    assert width % heads == 0


def test_gpt_small_has_gpt2_small_shape():
    layers, width, heads, context = SIZES["gpt-small"]
    assert (layers, width, heads, context) == (12, 768, 12, 1024)
    # GPT-2 small has 124M parameters with its 50257-token vocabulary, tied; with 256 bytes and an untied head:
    assert 80e6 < describe("gpt-small")["params"] < 90e6


def reference_attention(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head causal attention written out: softmax(q kᵀ / sqrt(d) + mask) v per head, float64."""
    b, t, c = x.shape
    h = attn.heads
    d = c // h
    w, bias = attn.qkv.weight.double(), attn.qkv.bias.double()
    qkv = x.double() @ w.T + bias
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    out = torch.empty(b, t, c, dtype=torch.float64)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
        out[..., sl] = torch.softmax(scores, dim=-1) @ v[..., sl]
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def test_attention_is_causal_multi_head_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4)
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(attn(x).double(), reference_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_a_position_does_not_see_the_future():
    torch.manual_seed(0)
    model = MODELS.get("gpt-nano")()
    x = torch.randint(0, VOCAB, (2, 20))
    changed = x.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert a.shape == (2, 20, VOCAB)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_a_sequence_longer_than_the_context_is_refused():
    model = MODELS.get("gpt-nano")()
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_split_model_equals_unsplit(k):
    torch.manual_seed(0)
    model = MODELS.get("gpt-nano")()
    x = torch.randint(0, VOCAB, (3, 32))
    y = torch.randint(0, VOCAB, (3, 32))
    whole = model(x)
    torch.nn.functional.cross_entropy(whole.flatten(0, 1), y.flatten()).backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    modules = split_modules(model.blocks, partition(model.blocks, k, "blocks"))
    assert len(modules) == k
    h = x
    for module in modules:
        h = module(h)
    torch.testing.assert_close(h, whole, rtol=0, atol=0)
    torch.nn.functional.cross_entropy(h.flatten(0, 1), y.flatten()).backward()
    for g, p in zip(whole_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    layers, width, _, _ = SIZES["gpt-micro"]
    model = MODELS.get("gpt-micro")()
    block = model.blocks[1]
    assert abs(block.attn.qkv.weight.std().item() - 0.02) < 0.002
    scaled = 0.02 / math.sqrt(2 * layers)
    assert abs(block.attn.proj.weight.std().item() - scaled) < 0.1 * scaled
    assert abs(block.mlp[2].weight.std().item() - scaled) < 0.1 * scaled
    assert torch.all(block.attn.qkv.bias == 0)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_builds_and_runs_on_meta_device(name):
    with torch.device("meta"):
        model = MODELS.get(name)()
        out = model(torch.empty(2, 16, dtype=torch.long))
    assert out.shape == (2, 16, VOCAB) and model.name == name


def test_blocks_leave_their_input_untouched():
    # Decoupled methods keep a block's input to replay the block later; an in-place op would corrupt it.
    torch.manual_seed(0)
    model = MODELS.get("gpt-nano")().train()
    h = torch.randint(0, VOCAB, (2, 16))
    for block in model.blocks:
        before = h.detach().clone()
        out = block(h)
        assert torch.equal(h.detach(), before)
        h = out.detach().requires_grad_()
