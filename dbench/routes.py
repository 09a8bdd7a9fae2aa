"""The channels stages talk on and where each one's messages go: the protocol's routing table.

Torch-free, so that what reads a trace (dbench.projection, the reports) needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

UP = "up"
DOWN = "down"
ERROR = "error"
PROBE_UP = "probe_up"
PROBE_DOWN = "probe_down"


@dataclass(frozen=True)
class Route:
    """Who sends on a channel and who receives: one neighbour (``step`` +1 up, -1 down), or a broadcast
    from one stage (``sender``, counted from the end when negative) to every other stage."""

    step: int | None = None
    sender: int | None = None

    def targets(self, channel: str, k: int, num_stages: int) -> list[int]:
        """The stages that stage k's message on ``channel`` reaches."""
        if self.step is not None:
            j = k + self.step
            if not 0 <= j < num_stages:
                raise RuntimeError(f"stage {k} sent {channel!r} past the end of the pipeline")
            return [j]
        if k != self.sender % num_stages:
            raise RuntimeError(f"stage {k} sent on {channel!r}, which only stage {self.sender % num_stages} sends on")
        return [j for j in range(num_stages) if j != k]

    def source(self, k: int, num_stages: int) -> int | None:
        """The stage whose messages on this channel stage k receives (None: none can reach it)."""
        j = k - self.step if self.step is not None else self.sender % num_stages
        return j if 0 <= j < num_stages and j != k else None

    def readers(self, k: int, num_stages: int) -> list[int]:
        """The stages that read stage k's messages on this channel (none where k cannot send on it)."""
        if self.step is not None:
            j = k + self.step
            return [j] if 0 <= j < num_stages else []
        return [j for j in range(num_stages) if j != k] if k == self.sender % num_stages else []


# Where a message on each channel goes. The engines and the transport derive every route from this table.
ROUTES = {UP: Route(step=+1), DOWN: Route(step=-1), ERROR: Route(sender=-1),
          PROBE_UP: Route(step=+1), PROBE_DOWN: Route(step=-1)}
CHANNELS = tuple(ROUTES)


def route(channel: str) -> Route:
    try:
        return ROUTES[channel]
    except KeyError:
        raise ValueError(f"unknown channel {channel!r}; channels: {', '.join(CHANNELS)}") from None
