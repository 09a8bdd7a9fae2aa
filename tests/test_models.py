"""Model zoo: shapes, block layout, parameter counts, determinism, replay safety."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dbench.models import BlockModel, count_params, describe
from dbench.registry import MODELS

ALL_MODELS = MODELS.names()
# The models that read 32x32 images; the language models (gpt-*) have their own tests in test_gpt.py.
IMAGE_MODELS = [name for name in ALL_MODELS if describe(name)["inputs"] == "image"]


def build(name: str, num_classes: int = 10, seed: int = 0) -> BlockModel:
    torch.manual_seed(seed)
    return MODELS.get(name)(num_classes=num_classes)


def test_expected_models_are_registered():
    expected = {
        "mlp", "cnn",
        "resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet164",
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "wrn28_10", "revnet14", "revnet18", "revnet34", "revnet50",
    }
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_output_shape(name, num_classes):
    model = build(name, num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_builds_and_runs_on_meta_device(name):
    with torch.device("meta"):
        model = MODELS.get(name)(num_classes=100)
        out = model(torch.empty(2, 3, 32, 32))
    assert isinstance(model, BlockModel)
    assert model.name == name
    assert out.shape == (2, 100)


@pytest.mark.parametrize(
    "name, blocks",
    [
        ("resnet8", 5),
        ("resnet20", 11),
        ("resnet56", 29),
        ("resnet110", 56),
        ("resnet164", 56),
        ("resnet18", 10),
        ("resnet50", 18),
        ("resnet101", 35),
        ("resnet152", 52),
        ("wrn28_10", 14),
        ("mlp", 3),
        ("cnn", 5),
    ],
)
def test_block_count(name, blocks):
    assert describe(name)["blocks"] == blocks


@pytest.mark.parametrize(
    "name, published",
    [
        ("resnet20", 0.27e6),  # He et al. 2016, table 6
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
        ("resnet164", 1.7e6),  # He et al. 2016, "Identity Mappings", table 2
        ("wrn28_10", 36.5e6),  # Zagoruyko & Komodakis 2016
        ("resnet18", 11.17e6),  # ImageNet ResNet-18 with the CIFAR stem and a 10-way head
        ("resnet50", 23.5e6),
    ],
)
def test_param_count_matches_published(name, published):
    assert describe(name)["params"] == pytest.approx(published, rel=0.02)


def test_describe_matches_a_real_build():
    info = describe("resnet20")
    model = build("resnet20")
    assert info == {"name": "resnet20", "params": count_params(model), "blocks": len(model.blocks),
                    "inputs": "image", "context": None}


def test_blocks_are_the_children_in_order():
    model = build("resnet20")
    assert model.blocks == list(model.children())
    assert isinstance(model.blocks[0][0], nn.Conv2d)  # stem
    assert isinstance(model.blocks[-1][-1], nn.Linear)  # head


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet164", "resnet18", "resnet50", "wrn28_10"])
def test_running_blocks_one_by_one_equals_the_model(name):
    model = build(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        h = x
        for block in model.blocks:
            h = block(h)
    assert torch.equal(h, expected)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet8", "resnet164", "resnet18", "resnet50", "wrn28_10"])
def test_blocks_leave_their_input_untouched(name):
    # Decoupled methods keep a block's input to replay the block later; an
    # in-place op on it would corrupt the replay.
    model = build(name).train()
    h = torch.randn(2, 3, 32, 32, requires_grad=True)
    for block in model.blocks:
        before = h.detach().clone()
        out = block(h)
        assert torch.equal(h.detach(), before)
        h = out.detach().requires_grad_()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_no_inplace_relu_and_no_dropout(name):
    with torch.device("meta"):
        model = MODELS.get(name)()
    for module in model.modules():
        assert not isinstance(module, nn.modules.dropout._DropoutNd)
        assert not getattr(module, "inplace", False), f"{name}: in-place {module}"


def test_same_seed_gives_same_weights():
    for name in ["cnn", "resnet20"]:
        a, b, c = build(name, seed=1).state_dict(), build(name, seed=1).state_dict(), build(name, seed=2).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


def test_initialization():
    model = build("resnet56")
    conv = model.blocks[5].conv1  # 32 -> 32 channels, 3x3
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    bn = model.blocks[5].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="duplicate"):
        MODELS.register("resnet20")(lambda num_classes=10: None)
    assert MODELS.get("resnet20").__name__ == "resnet20"


def test_describe_all_models_is_quick():
    import time

    start = time.perf_counter()
    infos = [describe(name) for name in ALL_MODELS]
    assert time.perf_counter() - start < 10  # typically well under 1 s
    assert all(info["params"] > 0 for info in infos)
