"""The training objective every method and meter shares: cross-entropy over the last dimension.

One rule covers both workloads, so no part of dbench asks which one it runs:
- an image classifier's logits are (batch, classes) with labels (batch,);
- a language model's logits are (batch, positions, vocabulary) with labels
  (batch, positions): every position predicts the next token.

The loss is the mean over every prediction (samples, or tokens), and a
prediction is correct when its argmax is its label. For (batch, classes) the
flattening below is a no-op view, so an image run computes exactly the numbers
``nn.CrossEntropyLoss()`` computed before this module existed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# Features of one sample shaped (positions, width): a transformer's residual stream, where every position
# makes its own prediction and so has its own label (what a method's side models reading them must follow).
SEQUENCE_RANK = 2


def label_shape(output_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The labels of a batch whose module output has this shape: one per sample, or one per position."""
    return tuple(output_shape[:2]) if len(output_shape) == 1 + SEQUENCE_RANK else tuple(output_shape[:1])


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., C) against ``labels`` (...), over every prediction."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)


class CrossEntropy(nn.Module):
    """``cross_entropy`` as the loss module a method's top stage calls (``Stage.loss_fn``)."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions are right (0-dim int64, on the logits' device)."""
    return (logits.argmax(dim=-1) == labels).sum()


def predictions(labels: torch.Tensor) -> int:
    """How many predictions a batch with these labels holds: one per sample, or one per token."""
    return labels.numel()
