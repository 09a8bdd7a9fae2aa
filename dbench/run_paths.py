"""The paths a user gives ``dbench report``/``compare``: checked before the heavy imports (pandas, matplotlib)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dbench.errors import DbenchError


def check_given(paths: Iterable[Path | str]) -> None:
    """Each path must be a directory: a run directory, or a folder that holds run directories."""
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DbenchError(f"{path} does not exist: give run directories or folders that hold them")
        if not path.is_dir():
            raise DbenchError(f"{path} is not a directory: give run directories or folders that hold them")
