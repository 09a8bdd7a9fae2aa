"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class DbenchError(Exception):
    """Bad input or environment: the message names the bad value and what is accepted."""


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; it is marked interrupted and its checkpoint says where it resumes."""

    def __init__(self, path, epochs_done: int, steps: int = 0):
        held = f"{epochs_done} finished epoch(s)" + (f" and {steps} step(s) of epoch {epochs_done + 1}" if steps else "")
        super().__init__(f"interrupted: {path} holds {held}; continue with: dbench run --resume {path}")
        self.path = path
