"""One error type for bad input: it always names the file and the problem."""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad input data. ``str(err)`` is ``"<path>: <problem>"`` so logs and batch summaries say both."""

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
