"""Small models for tests and the quick default run (not from a paper)."""
from __future__ import annotations

from torch import nn

from dbench.registry import MODELS
from dbench.models.base import BlockModel, conv_bn_relu, init_weights, pool_linear_head


@MODELS.register("mlp")
def mlp(num_classes: int = 10) -> BlockModel:
    """Flatten, two hidden layers of 256 with ReLU, linear head: 3 blocks."""
    blocks = [
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 256), nn.ReLU(inplace=False)),
        nn.Sequential(nn.Linear(256, 256), nn.ReLU(inplace=False)),
        nn.Linear(256, num_classes),
    ]
    return BlockModel(blocks, "mlp")


@MODELS.register("cnn")
def cnn(num_classes: int = 10) -> BlockModel:
    """Four conv3x3-BN-ReLU blocks (16/32/64/128 channels), the first three max-pooled, then pool + linear.

    Sized to train at well over 1500 images/s (batch 128) on a 2-core CPU. The
    first block runs at full 32x32 resolution, where its BN, ReLU and pooling are
    memory bound; at 32 channels there, the net trained at under 1000 images/s.
    """
    blocks = [
        nn.Sequential(*conv_bn_relu(3, 16), nn.MaxPool2d(2)),  # -> 16x16
        nn.Sequential(*conv_bn_relu(16, 32), nn.MaxPool2d(2)),  # -> 8x8
        nn.Sequential(*conv_bn_relu(32, 64), nn.MaxPool2d(2)),  # -> 4x4
        conv_bn_relu(64, 128),
        pool_linear_head(128, num_classes),
    ]
    model = BlockModel(blocks, "cnn")
    init_weights(model)
    return model
