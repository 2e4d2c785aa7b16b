"""Errors sorted once, at the CLI boundary, into exit codes (see CONTRACT.md)."""

from __future__ import annotations


class OrchestratorError(Exception):
    """A failure with a message meant for the user: it names the thing and what to do."""

    exit_code = 1


class RecipeError(OrchestratorError):
    """A bad recipe or bad arguments: exit 2, the message names the field or argument."""

    exit_code = 2


class RunError(OrchestratorError):
    """Any other failure of a run: exit 1."""

    exit_code = 1


class RunInterrupted(RunError):
    """The user interrupted the run (Ctrl-C) and its checkpoint is saved: exit 130, as for SIGINT."""

    exit_code = 130

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
