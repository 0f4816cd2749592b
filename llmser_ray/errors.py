"""User-facing errors: each names the problem and the fix, and the CLI prints it on one line."""

from __future__ import annotations


class LLMSeRError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""

    def __init__(self, problem: str, fix: str) -> None:
        # Both arguments in ``args`` so that copy/pickle rebuild the error: Ray Tune copies a
        # trial's exception, and Ray ships errors between processes.
        super().__init__(problem, fix)
        self.problem = problem
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.problem}. Fix: {self.fix}"


class ConfigError(LLMSeRError):
    pass


class DataError(LLMSeRError):
    pass


class StageError(LLMSeRError):
    """A stage's required input (an earlier stage's output) is missing or stale."""


class WorkdirInUse(StageError):
    """Another command is writing into the same workdir (``llmser_ray.lock``)."""
