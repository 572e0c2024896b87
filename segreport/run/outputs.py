"""What a run has written under OUTPUT_DIR: which cases are complete (for --resume), the check before a
run starts (no silent overwrite), and the clean-up of a failed case or of a killed run's temp files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .cases import OUTPUT_TYPES, Case, discover_cases, input_fingerprint, load_points, select_series

log = logging.getLogger("segreport.batch")

# temp names made by data.io.atomic_path: ".<name>.<pid>-<12 hex>.tmp<suffix>"
_TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]{12}\.tmp")


class OutputExistsError(RuntimeError):
    """OUTPUT_DIR already holds outputs and neither overwrite nor resume was asked for."""


class CannotStartError(RuntimeError):
    """The run cannot start: a device or output-folder problem found before the model loads."""


def check_output_dir(output_dir: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """A folder (or a path where one can be made) that is writable and is not, nor is inside, an input folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CannotStartError(f"{output_dir}: -o names a file, not a folder")
    real_output = output_dir.resolve()  # symlinks resolved on both sides: a link into the input is the input
    for given in inputs:
        folder = Path(given).absolute()
        real = folder.resolve()
        if folder.is_dir() and (real_output == real or real in real_output.parents):
            raise CannotStartError(f"{output_dir}: the output folder is {'the' if real_output == real else 'inside the'} "
                                   f"input folder {folder}; outputs never go into a folder given as input: pick another -o")
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CannotStartError(f"{output_dir}: cannot write there ({existing} is not a writable folder)")


@dataclass
class RunPlan:
    """What a run will do, checked before any model loads: its cases, the files that are no case, the clicks."""

    cases: list[Case]
    skipped_inputs: list[dict] = field(default_factory=list)  # listed in the manifest, never dropped silently
    points_spec: dict = field(default_factory=dict)
    points_source: str | None = None


def plan_run(inputs, output_dir: str | os.PathLike, pattern: str = "*.nii*", overwrite: bool = False,
             resume: bool = False, points=None, series_uid: str | None = None, output_type: str = "nifti") -> RunPlan:
    """Every check a run makes before its model loads, made once: the output folder (writable, not in an
    input folder), the cases (one DICOM series with ``series_uid``; only DICOM for DICOM outputs), outputs
    already there, the clicks file."""
    if output_type not in OUTPUT_TYPES:
        raise CannotStartError(f"--output-type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
    output_dir = Path(output_dir).absolute()
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    check_output_dir(output_dir, given)
    skipped: list[dict] = []
    cases = discover_cases(inputs, pattern, exclude=output_dir, skipped=skipped)
    for item in skipped:
        log.warning("skipped %s: %s", item["path"], item["reason"])
    if series_uid:  # one DICOM series of several
        cases = select_series(cases, series_uid, inputs)
    not_dicom = [c.path for c in cases if not c.is_dicom] if output_type != "nifti" else []
    if not_dicom:
        raise CannotStartError(f"{not_dicom[0]}: --output-type {output_type} writes a DICOM SEG and SR that reference the "
                               f"source DICOM series, and this input is a NIfTI file ({len(not_dicom)} such input(s)); "
                               f"use --output-type nifti for NIfTI inputs")
    check_outputs(cases, output_dir, overwrite, resume)
    points_spec, points_source = load_points(points)
    unused = set(points_spec) - {c.case_id for c in cases} - {Path(c.path).name for c in cases}
    if unused:
        log.warning("points for unknown cases ignored: %s", sorted(unused))
    return RunPlan(cases, skipped, points_spec, points_source)


def case_complete(case: Case, output_dir: Path, checkpoint_sha256: str | None = None, guide: str | None = None,
                  output_type: str = "nifti") -> bool:
    """Done = every output present AND its report was made from this very input (same fingerprint)
    by this very checkpoint (same sha256) and, for a text-guided model, from the same guide texts
    (``GuideTexts.fingerprint``): a replaced input, another model or another text is redone on --resume."""
    paths = case.outputs(output_dir, output_type)
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
    for path in case.outputs(output_dir, "both").values():  # whatever a case of any output type left
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
    existing = [p for case in cases for p in case.outputs(output_dir, "both").values() if p.exists()]
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


