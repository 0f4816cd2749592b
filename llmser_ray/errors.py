"""User-facing errors: each names the problem and the fix, and the CLI prints it on one line."""

from __future__ import annotations


class LLMSeRError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}. Fix: {fix}")
        self.problem = problem
        self.fix = fix


class ConfigError(LLMSeRError):
    pass


class DataError(LLMSeRError):
    pass


class StageError(LLMSeRError):
    """A stage's required input (an earlier stage's output) is missing or stale."""
