"""Where a case's time goes: named stages, timed when a run collects them and free otherwise.

``with stage("read"): ...`` adds the block's wall time to the stage ``read`` of the collection that is
active in this thread (``with collect_stages() as times: ...``), if any. The batch runner collects per
case (``stage_s`` in summary.json); ``benchmarks/bench_whole_ct.py`` reads them. Stages are not nested:
each second of a case is counted in at most one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter

__all__ = ["stage", "collect_stages"]

_active: ContextVar[dict[str, float] | None] = ContextVar("segreport_stages", default=None)


@contextmanager
def stage(name: str) -> Iterator[None]:
    times = _active.get()
    if times is None:
        yield
        return
    start = perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + perf_counter() - start


@contextmanager
def collect_stages(into: dict[str, float] | None = None) -> Iterator[dict[str, float]]:
    """Collect the stages timed in this thread (and in what it calls) into ``into`` (a new dict by default)."""
    times = {} if into is None else into
    token = _active.set(times)
    try:
        yield times
    finally:
        _active.reset(token)
