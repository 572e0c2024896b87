"""What a run has written under OUTPUT_DIR: which cases are complete (for --resume), the check before a
run starts (no silent overwrite), and the clean-up of a failed case or of a killed run's temp files."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Sequence

from .cases import Case, input_fingerprint

# temp names made by data.io.atomic_path: ".<name>.<pid>-<12 hex>.tmp<suffix>"
_TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]{12}\.tmp")


class OutputExistsError(RuntimeError):
    """OUTPUT_DIR already holds outputs and neither overwrite nor resume was asked for."""


def case_complete(case: Case, output_dir: Path, checkpoint_sha256: str | None = None, guide: str | None = None) -> bool:
    """Done = every output present AND its report was made from this very input (same fingerprint)
    by this very checkpoint (same sha256) and, for a text-guided model, from the same guide texts
    (``GuideTexts.fingerprint``): a replaced input, another model or another text is redone on --resume."""
    paths = case.outputs(output_dir)
    if not all(p.is_file() for p in paths.values()):
        return False
    try:
        made_from = json.loads(paths["report"].read_text()).get("provenance") or {}
    except (OSError, ValueError):
        return False
    same_input = made_from.get("input_fingerprint") == input_fingerprint(case)
    same_model = made_from.get("checkpoint_sha256") == checkpoint_sha256
    return same_input and same_model and made_from.get("guide_texts") == guide


def remove_case_outputs(case: Case, output_dir: Path) -> None:
    for path in case.outputs(output_dir).values():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _run_files(output_dir: Path) -> list[Path]:
    names = ["summary.csv", "summary.json", "manifest.json"]
    return [output_dir / n for n in names if (output_dir / n).exists()] + sorted(output_dir.glob("summary.rank*.json"))


def check_outputs(cases: Sequence[Case], output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to start when OUTPUT_DIR holds outputs, unless told to overwrite or resume."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other: overwrite re-runs every case, "
                         "resume keeps the finished ones")
    if overwrite or resume or not output_dir.exists():
        return
    existing = [p for case in cases for p in case.outputs(output_dir).values() if p.exists()]
    existing += _run_files(output_dir)
    if existing:
        raise OutputExistsError(
            f"{output_dir} already holds outputs of a previous run ({len(existing)} files, e.g. {existing[0].name}). "
            "Pass --overwrite to replace them, or --resume to keep the finished cases and run the rest."
        )


def remove_stale_temp_files(output_dir: Path) -> None:
    """Temp files left by a killed run (a clean exit or an exception removes its own)."""
    for path in output_dir.iterdir():
        if _TEMP_NAME.match(path.name) and path.is_file():
            path.unlink()


