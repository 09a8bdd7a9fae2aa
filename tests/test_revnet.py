"""RevNets in PETRA's layout (docs/ALGORITHMS.md, "PETRA"): counts from the section, the coupling and its inverse
written out here from the section's equations, and a method training one cut in two."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dbench.models.base import count_params, describe
from dbench.models.revnet import Downsampling, Reversible, revnet
from dbench.registry import MODELS


@pytest.mark.parametrize("name, blocks, reversible", [
    ("revnet18", 10, 5),  # stem, [R, R], [D, R], [D, R], [D, R], head
    ("revnet34", 18, 13),  # stem, [R×3], [D, R×3], [D, R×5], [D, R×2], head
    ("revnet50", 18, 12),  # stem, [D, R×2], [D, R×3], [D, R×5], [D, R×2], head
    ("revnet14", 8, 4),
])
def test_the_layouts(name, blocks, reversible):
    model = MODELS.get(name)()
    assert describe(name)["blocks"] == blocks == len(model.blocks)
    kinds = [getattr(b, "reversible", None) for b in model.blocks]
    assert kinds[0] is None and kinds[-1] is None  # stem and head: neither
    assert kinds.count(True) == reversible and kinds.count(False) == blocks - 2 - reversible


def test_parameter_counts_are_the_released_codes():
    # counted from the released code's tensors (docs/ALGORITHMS.md, "PETRA", Layouts)
    assert count_params(MODELS.get("revnet18")(num_classes=10)) == 11_185_802
    imagenet50 = revnet([3, 4, 6, 3], [64, 128, 256, 512], 1000, "revnet50-imagenet", bottleneck=True, imagenet=True)
    assert count_params(imagenet50) == 30_421_608
    # as small as resnet20 (0.27M): the model the tests train
    assert count_params(MODELS.get("revnet14")()) < 0.3e6


def test_a_reversible_block_is_the_coupling_and_its_inverse_recovers_the_input():
    torch.manual_seed(0)
    block = MODELS.get("revnet14")().blocks[1]
    assert isinstance(block, Reversible)
    h = torch.randn(4, 32, 32, 32, dtype=torch.float64)
    block = block.double()
    for mode in ("train", "eval"):
        block.train(mode == "train")
        with torch.no_grad():
            x, x_tilde = h[:, :16], h[:, 16:]
            out = block(h)
            # y = x̃ + F(x), ỹ = x, written out from the section
            assert torch.equal(out[:, 16:], x)
            assert torch.allclose(out[:, :16], x_tilde + block.residual(x), atol=1e-12)
            assert torch.allclose(block.inverse(out), h, atol=1e-10)


def test_reconstruct_is_the_inverse_and_the_forward_with_one_evaluation_of_f():
    """For a backward without the stored input: the halves are the inverse's, the recomputed output is the
    block's output, and the gradients through it are those of the forward at the inverse's input."""
    torch.manual_seed(0)
    block = Reversible(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())).double()
    h = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out = block(h)
    (x, x_tilde), recomputed = block.reconstruct(out)
    inverse = block.inverse(out).detach().requires_grad_()
    assert torch.equal(torch.cat([x, x_tilde], dim=1), inverse)
    delta = torch.randn_like(out)
    recomputed.backward(delta)
    grads = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    block(inverse).backward(delta)
    assert torch.equal(torch.cat([x.grad, x_tilde.grad], dim=1), inverse.grad)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, block.parameters()))


def test_a_downsampling_block_keeps_the_sections_equations():
    torch.manual_seed(0)
    basic = Downsampling(16, 32, stride=2).eval()
    h = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        out = basic(h)
        inner = basic.first(h[:, :16])
        assert torch.allclose(out[:, 32:], inner)  # ỹ = h = ReLU(BN(conv3×3_s2(x)))
        assert torch.allclose(out[:, :32], basic.second(inner) + basic.shortcut(h[:, 16:]))
    bottleneck = Downsampling(16, 64, stride=1, hidden=16).eval()
    with torch.no_grad():
        out = bottleneck(h)
        assert torch.allclose(out[:, 64:], bottleneck.carry(h[:, :16]))  # ỹ = BN(conv1×1_s(x))
        assert torch.allclose(out[:, :64], bottleneck.residual(h[:, :16]) + bottleneck.shortcut(h[:, 16:]))


@pytest.mark.parametrize("method", ["bp", "fr"])
def test_a_method_trains_a_revnet_cut_in_two(method):
    """BP (PETRA's fair reference) and a decoupled method train revnet14 cut into two modules: the loss on a
    fixed batch falls. Small images (8x8: the stem keeps the size, the two strided stages and the head's
    global pooling take any size) keep it to a second."""
    from dbench import Trainer

    from conftest import batches, group

    model = MODELS.get("revnet14")()
    cut = [(0, 4), (4, len(model.blocks))]
    x, y = batches(1)[0]
    trainer = Trainer(group(list(model.blocks), cut), method, num_classes=10, lr=0.05, momentum=0.9)
    losses = [trainer.step(x, y).item() for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses
