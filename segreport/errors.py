"""One error type for bad input: it always names the file and the problem."""

from __future__ import annotations

import sys
from os import PathLike


class InputError(ValueError):
    """Bad input data. ``str(err)`` is ``"<path>: <problem>"`` so logs and batch summaries say both."""

    def __init__(self, path: str | PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def input_error_cause(exc: BaseException) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s chain of causes (itself included), or None: what a
    wrapper (MONAI's config parser, a bundle loader) hides behind its own message."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report_input_errors_last() -> None:
    """Make an uncaught error whose cause is an :class:`InputError` end with one line naming the input
    and the problem. MONAI's config parser wraps every error of a bundle expression in "Failed to
    evaluate ConfigExpression", which would otherwise be the last line of a bundle run. Idempotent;
    the traceback before it is Python's own."""
    previous = sys.excepthook
    if getattr(previous, "segreport_input_errors", False):
        return

    def hook(kind, value, tb):
        previous(kind, value, tb)
        cause = input_error_cause(value)
        if cause is not None and cause is not value:
            print(f"segreport: error: {cause}", file=sys.stderr)

    hook.segreport_input_errors = True
    sys.excepthook = hook
