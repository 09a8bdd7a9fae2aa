"""Messages in a checkpoint: the tensor and its tag, as plain types ``torch.load(weights_only=True)`` reads."""
from __future__ import annotations

import torch

from dbench.method import Message


def pack(message: Message) -> dict:
    return {"tensor": message.tensor.detach().cpu(), "tag": list(message.tag)}


def unpack(saved, device: torch.device) -> Message:
    # Checkpoints written before messages were tagged hold bare tensors.
    if isinstance(saved, torch.Tensor):
        return Message(saved.to(device), ())
    return Message(saved["tensor"].to(device), tuple(saved["tag"]))
