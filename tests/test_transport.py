"""The distributed engine's transport, checked from its contract: every message sent on a stream arrives
bit-equal with its tag, per channel in the order sent, whatever the sizes and dtypes and whichever order the
receiver asks for its channels in, epoch after epoch."""
from __future__ import annotations

import torch
import torch.multiprocessing as mp

from distributed_workers import transport_expected, transport_worker
from dbench.engine.launch import free_port


def test_every_message_arrives_bit_equal_with_its_tag_in_channel_order(tmp_path):
    world = 3
    path = str(tmp_path / "got")
    mp.start_processes(transport_worker, args=(world, free_port(), path), nprocs=world, start_method="forkserver")
    for rank in range(world):
        expected = []
        for epoch in range(2):
            by_channel = transport_expected(rank, world, epoch)
            for channel in sorted(by_channel, reverse=True):
                expected += [(channel, tensor, tag) for tensor, tag in by_channel[channel]]
        got = torch.load(f"{path}.{rank}", weights_only=True)
        assert len(got) == len(expected) > 20
        for (channel, tensor, tag), (c, t, g) in zip(expected, got):
            assert (c, tuple(g)) == (channel, tag)
            assert t.dtype == tensor.dtype and t.shape == tensor.shape
            assert torch.equal(t, tensor), (rank, channel, tag)
