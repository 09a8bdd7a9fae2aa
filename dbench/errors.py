"""Errors a user can fix, as click exceptions: the CLI shows each as its one line and exits with its code."""
import click


class DbenchError(click.ClickException):
    """Bad input or environment: the message names the bad value and what is accepted. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.args = (message,)  # as an Exception's: str(e) is the message, and it pickles (a worker's report)

    def __str__(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class RunInterrupted(click.ClickException):
    """A run stopped by Ctrl-C or SIGTERM; it is marked interrupted and its checkpoint says where it resumes.
    Exit code 130, as a shell's for SIGINT."""

    exit_code = 130

    def __init__(self, path, epochs_done: int, steps: int = 0):
        held = f"{epochs_done} finished epoch(s)" + (f" and {steps} step(s) of epoch {epochs_done + 1}" if steps else "")
        super().__init__(f"interrupted: {path} holds {held}; continue with: dbench run --resume {path}")
        self.path = path
        self.args = (path, epochs_done, steps)  # it pickles with the arguments it is built from

    def __str__(self) -> str:
        return self.message

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True, file=file)
