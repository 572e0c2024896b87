"""Atomic, strict output files every layer writes (reports, metrics, tables): JSON, text and CSV.

Each goes to a temporary name beside its destination and is renamed into place (data.io.atomic_path),
so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from .io import atomic_path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _finite(obj):
    """NaN/inf -> None, so the JSON stays strict (other tools reject NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_jsonable(obj):
    """Plain, strict-JSON values (numpy scalars and arrays as Python numbers and lists, NaN as None):
    what a report file holds, and what a server may send."""
    return _finite(json.loads(json.dumps(obj, default=_json_default)))


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write strict JSON atomically (temp file in the same folder + os.replace)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    return write_text(text + "\n", path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows (dicts; the union of their keys, first-seen order, is the header) written atomically."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(buffer.getvalue(), path)
