"""Atomic CSV tables shared by every evaluation (JSON goes through report.write_json)."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .report import write_text


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows (dicts; the union of their keys, first-seen order, is the header) written atomically."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(buffer.getvalue(), path)
