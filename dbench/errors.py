"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class DbenchError(Exception):
    """Bad input or environment: the message names the bad value and what is accepted."""
