"""Batch inference over a NIfTI file, a folder of NIfTI files, or a folder of DICOM series.

The model (a bundle's ``predictor``, see :mod:`.predictor`) is loaded once; while it predicts one case,
background threads load and pre-process the next ``workers`` cases (reading, lung mask, zone map).
Each case gets, in OUTPUT_DIR::

    <case>_seg.nii.gz      the mask, with exactly the input's shape and affine
    <case>_report.txt      human-readable report
    <case>_preview.png     axial montage through the lesions (lung window, mask outlined, finding)
    <case>_report.json     finding(s) + per-lesion statistics (written last: it marks the case complete)

and the run gets ``summary.csv``/``summary.json`` (one row per case: status ok/failed/skipped, error,
timings, lesion count, total volume) and ``manifest.json`` (versions, model, device, checkpoint sha256,
arguments, start/end time). Every file is written to a temporary name in OUTPUT_DIR and renamed into
place, so an interrupted run never leaves half files; a case that fails leaves none of its outputs.

A bad input file (corrupt, truncated, 2D/4D, not an image) fails its case with a message naming the
file and the problem, and the run goes on.

Command line (also ``segreport infer ...``)::

    python -m segreport.run.batch --bundle bundles/medsegtext -i INPUT -o OUTPUT_DIR \\
        [--checkpoint PATH] [--device cpu|cuda] [--points points.json] [--overwrite | --resume] \\
        [--workers N] [--pattern GLOB] [--bf16]

Exit codes: 0 every case ok (or skipped by --resume); 1 at least one case failed (the others'
outputs are complete; see summary.csv); 2 the run could not start (bad arguments, no input found,
outputs already present without --overwrite/--resume, bundle or checkpoint problems).
Under ``torchrun`` the cases are sharded over the processes (:mod:`.distributed`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import platform
import sys
import traceback
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import __version__
from ..data import provenance
from ..timing import collect_stages, stage
from ..transforms.postprocess import lesion_instances
from ..transforms.slicing import axial_axis
from ..vocab import MIN_LESION_ML, MIN_LUNG_ML
from ..errors import InputError
from .guide_texts import GuideTexts
from . import distributed
from ..inference.predictor import Prediction, min_lesion_ml_of
from .preview import save_preview
from .cases import (  # noqa: F401  (re-exported: the batch runner's public names)
    OUTPUT_SUFFIXES, Case, LoadedCase, case_points, discover_cases, input_fingerprint, load_case, load_points, prefetch,
    select_series,
)
from .bundles import checkpoint_info
from .outputs import (  # noqa: F401  (OutputExistsError, CannotStartError, check_outputs: re-exported)
    CannotStartError, OutputExistsError, RunPlan, case_complete, check_outputs, plan_run, remove_case_outputs,
    remove_stale_temp_files,
)
from .run_lock import RunLock
from .report import build_report, format_report_text, write_json, write_text
from .report_box import report_on_box

log = logging.getLogger("segreport.batch")

SUMMARY_FIELDS: tuple[str, ...] = (
    "case_id", "input", "status", "error", "n_lesions", "total_volume_ml", "finding",
    "load_s", "wait_s", "predict_s", "write_s",
)


class BatchFailedError(RuntimeError):
    """Raised by :meth:`BatchSummary.raise_if_failed` (the ``monai.bundle run`` route's non-zero exit)."""


@dataclass
class BatchSummary:
    """What a run did: one row per case (``SUMMARY_FIELDS``, plus ``traceback`` for unexpected errors)."""

    output_dir: Path
    cases: list[dict] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(row["status"] for row in self.cases)
        return {status: c.get(status, 0) for status in ("ok", "failed", "skipped")}

    @property
    def n_failed(self) -> int:
        return self.counts["failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.n_failed else 0

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "counts": self.counts, "cases": self.cases}

    def raise_if_failed(self) -> BatchSummary:
        if self.n_failed:
            failed = [f"{r['case_id']}: {r['error']}" for r in self.cases if r["status"] == "failed"]
            raise BatchFailedError(f"{self.n_failed} of {len(self.cases)} cases failed (see "
                                   f"{self.output_dir / 'summary.csv'}):\n  " + "\n  ".join(failed))
        return self


def _check_prediction(prediction, shape: tuple[int, ...], model: str) -> Prediction:
    if not isinstance(prediction, Prediction):
        raise TypeError(f"predictor {model} returned {type(prediction).__name__}, expected a Prediction")
    mask = prediction.mask
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"predictor {model} returned a mask of shape {mask.shape} for an image of shape "
                         f"{tuple(shape)}: masks must be on the input grid")
    prediction.mask = (mask > 0).astype(np.uint8)
    return prediction


@dataclass
class RunSettings:
    """What every case of one run shares: the model's name and checkpoint hash (recorded in each report,
    checked on --resume), whether the model takes clicks, and the minimum lesion size."""

    model: str
    checkpoint_sha256: str | None = None
    takes_points: bool = True
    min_lesion_ml: float = MIN_LESION_ML
    training: dict | None = None  # the checkpoint spec's provenance: what the model was trained on
    texts: GuideTexts | None = None  # a text-guided model's sentence per case (run.guide_texts)
    output_type: str = "nifti"  # nifti | dicom | both (run.cases.MASK_SUFFIXES)


def case_report(case: Case, loaded: LoadedCase, prediction: Prediction, settings: RunSettings,
                points: dict | None = None) -> tuple[dict, np.ndarray, int]:
    """The one path from a case's prediction to its report, for the batch and the MONAI Label app:
    the run's minimum lesion size (``prediction.mask`` is filtered in place), one labelling of the mask
    (the report's lesion ids), the report with its provenance, the model's training and every warning.
    ``points``: the clicks to record (default: the case's own, from its click file).
    Returns ``(report, lesion instance map, number of lesions)``."""
    instances, n = lesion_instances(prediction.mask, loaded.affine, settings.min_lesion_ml)  # the one labelling
    prediction.mask = (instances > 0).astype(np.uint8)
    if prediction.slice_findings:  # a slice sentence stays only where a lesion the report counts lies
        axis = axial_axis(loaded.affine)
        on = prediction.mask.any(axis=tuple(a for a in range(3) if a != axis))
        prediction.slice_findings = {k: v for k, v in prediction.slice_findings.items() if on[int(k)]}
    if points is None and loaded.points is not None:
        points = {"ijk": loaded.points, "labels": loaded.point_labels}
    if points is not None and not settings.takes_points:
        points["ignored"] = f"{settings.model} takes no clicks: the points did not change this result"
    meta = loaded.meta
    common = dict(case_id=case.case_id, lung=loaded.lung, instances=instances, zone_map=loaded.zones, input_path=case.path,
                  model=settings.model, points=points,
                  lung_source=meta.get("lung_source") and f"user-supplied lung mask {meta['lung_source']}")
    report = None
    if loaded.report_context is not None:  # reported again and again (clicks): the lesion part on its box
        report = report_on_box(prediction, loaded.image, loaded.affine, loaded.report_context, **common)
    if report is None:
        report = build_report(prediction, loaded.image, loaded.affine, **common)
    report["provenance"] = {"input_fingerprint": input_fingerprint(case), "checkpoint_sha256": settings.checkpoint_sha256,
                            "min_lesion_ml": settings.min_lesion_ml,
                            "guide_texts": None if settings.texts is None else settings.texts.fingerprint()}
    report["model_training"] = settings.training
    report["model_training_summary"] = provenance.describe(settings.training)
    report["warnings"] = provenance.warnings_for(settings.training, meta) + report["warnings"]
    return report, instances, n


def write_case_outputs(case: Case, loaded: LoadedCase, prediction: Prediction, output_dir: Path,
                       settings: RunSettings) -> dict:
    """Mask and lesion map (NIfTI and/or DICOM SEG + SR), text report, preview, JSON report (last), each
    atomically. Returns the report."""
    paths = case.outputs(output_dir, settings.output_type)
    with stage("report"):
        report, instances, n = case_report(case, loaded, prediction, settings)
    with stage("write"):
        if "seg" in paths:
            loaded.save_mask(prediction.mask, paths["seg"])
            loaded.save_mask(instances, paths["lesions"], dtype=np.uint8 if n < 256 else np.uint16)
        if "dicom_seg" in paths:
            from .dicom_outputs import write_dicom_outputs  # highdicom only where DICOM is asked for

            write_dicom_outputs(case.path, case.series_uid, instances, loaded.affine, report, settings.model, paths)
        write_text(format_report_text(report), paths["report_txt"])
    with stage("preview"):
        save_preview(paths["preview"], loaded.image, prediction.mask, loaded.affine, report=report,
                     title=f"{case.case_id}  ({settings.model})", lung=loaded.lung, instances=instances)
    with stage("write"):
        write_json(report, paths["report"])
    return report


def _error_message(exc: Exception, case: Case, step: str) -> str:
    if isinstance(exc, InputError):
        return str(exc)  # already "<file>: <problem>"
    return f"{case.path}: {step} failed ({type(exc).__name__}: {exc})"


def _row(case: Case, status: str, **values) -> dict:
    row = {k: None for k in SUMMARY_FIELDS}
    row.update(case_id=case.case_id, input=case.path, status=status, error="")
    row.update(values)
    return row


def _skipped_row(case: Case, output_dir: Path) -> dict:
    try:
        report = json.loads(case.outputs(output_dir)["report"].read_text())
    except (OSError, ValueError):
        report = {}
    return _row(case, "skipped", n_lesions=report.get("n_lesions"), total_volume_ml=report.get("total_volume_ml"),
                finding=report.get("finding"))


def run_case(case: Case, loading: Future, predictor, output_dir: Path, settings: RunSettings, autocast) -> dict:
    """Predict one loaded case and write its outputs; any error becomes a failed row, never a crash."""
    start = perf_counter()
    timings: dict[str, float] = {}
    stages: dict[str, float] = {}  # segreport.timing: where the case's time went (summary.json's stage_s)
    step = "load"
    try:
        loaded: LoadedCase = loading.result()
        timings.update(load_s=loaded.load_s, wait_s=perf_counter() - start)
        stages.update(loaded.stage_s)
        with collect_stages(stages):
            step, t = "predict", perf_counter()
            kwargs = {} if loaded.points is None else {"points": loaded.points, "point_labels": loaded.point_labels}
            text_source = None
            if settings.texts is not None:  # a text-guided model: this case's sentence
                step = "guide text"
                with stage("guide text"), torch.inference_mode(), autocast():
                    kwargs["text"], text_source = settings.texts.for_case(case, loaded)
                step = "predict"
            with torch.inference_mode(), autocast():
                prediction = predictor.predict(loaded.image, loaded.affine, lung=loaded.lung, **kwargs)
            prediction = _check_prediction(prediction, loaded.image.shape, settings.model)
            if text_source is not None:
                prediction.extras["guide_text_source"] = text_source
            timings["predict_s"] = perf_counter() - t
            step, t = "writing outputs", perf_counter()
            report = write_case_outputs(case, loaded, prediction, output_dir, settings)
            timings["write_s"] = perf_counter() - t
    except Exception as exc:
        remove_case_outputs(case, output_dir)  # all or nothing: no seg without its report
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error the next case still gets the GPU
        row = _row(case, "failed", error=_error_message(exc, case, step), **_rounded(timings))
        if not isinstance(exc, InputError):
            row["traceback"] = traceback.format_exc()
        log.warning("failed: %s", row["error"])
        return row
    return _row(case, "ok", n_lesions=report["n_lesions"], total_volume_ml=report["total_volume_ml"],
                finding=report["finding"], stage_s=_rounded(stages), **_rounded(timings))


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in timings.items()}


def write_summary(summary: BatchSummary) -> None:
    """``summary.json`` (all fields) and ``summary.csv`` (``SUMMARY_FIELDS``), atomically."""
    write_json(summary.to_dict(), summary.output_dir / "summary.json")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary.cases)
    write_text(buffer.getvalue(), summary.output_dir / "summary.csv")


# --------------------------------------------------------------------------------------- manifest


def _versions() -> dict:
    import monai
    import nibabel

    info = {"segreport": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "nibabel": nibabel.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _previous_runs(path: Path) -> list[dict]:
    """The manifests of the runs a resumed run continues (oldest first), so their history is kept."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or unreadable: nothing to keep
        return []
    return previous.pop("previous_runs", []) + [previous]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -------------------------------------------------------------------------------------------- run


def run_batch(
    predictor,
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    pattern: str = "*.nii*",
    points: str | os.PathLike | dict | None = None,
    device: str | torch.device | None = None,
    bf16: bool = False,
    manifest_extra: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    allow_non_ct: bool = False,
    min_lesion_ml: float | None = None,
    series_uid: str | None = None,
    allow_no_lungs: bool = False,
    lung_masks: str | os.PathLike | None = None,
    texts: GuideTexts | None = None,
    plan: RunPlan | None = None,
    output_type: str = "nifti",
) -> BatchSummary:
    """Run ``predictor`` over every case of ``inputs`` and write outputs to ``output_dir`` (module doc).

    ``workers``: cases loaded ahead in background threads (0: load in this thread). ``points``: a
    points.json path or dict (see :func:`case_points`). ``device``: for autocast and the manifest
    (default: the predictor's ``device``). ``bf16``: run the predictor under bfloat16 autocast.
    ``rank``/``world_size``: this process's shard (torchrun; the process group, when initialised, gives
    the barriers; rank 0 writes the merged summary and the manifest). ``allow_non_ct``: skip the CT
    plausibility checks (data.plausibility). ``min_lesion_ml``: components below it are removed from every
    mask before its report (default: the checkpoint spec's, :func:`min_lesion_ml_of`). ``series_uid``: run only that DICOM series. A predictor with ``needs_lungs``
    (the lung-lesion models) gets no scan with under ``MIN_LUNG_ML`` of lung unless ``allow_no_lungs``.
    ``lung_masks``: a folder of the user's lung masks, ``<case id>.nii.gz``, used instead of the HU mask.
    ``texts``: where a text-guided model (``predictor.takes_text``) gets each case's sentence
    (:class:`~segreport.run.guide_texts.GuideTexts`); required for such a model, ignored otherwise.
    ``output_type``: ``nifti`` (masks as NIfTI), ``dicom`` (DICOM SEG + SR, DICOM inputs only) or ``both``.
    ``plan``: the checks before the model loads, already made by :func:`plan_run` for these arguments
    (the CLI makes them first, so a wrong path fails fast); made here when not given.
    Raises :class:`InputError` when no input is found, :class:`CannotStartError` when the output folder is
    not writable or lies in an input folder, :class:`OutputExistsError` when outputs exist without
    ``overwrite``/``resume`` and :class:`RunLockedError` when another run is writing to ``output_dir``;
    per-case errors are recorded in the summary instead.
    """
    started = _now()
    min_lesion_ml = min_lesion_ml_of(predictor, min_lesion_ml)
    output_dir = Path(output_dir).absolute()
    model = str(getattr(predictor, "name", type(predictor).__name__))
    device = str(device or getattr(predictor, "device", None) or "cpu")
    if plan is None:
        plan = plan_run(inputs, output_dir, pattern, overwrite, resume, points, series_uid, output_type)
    cases, skipped_inputs, points_spec, points_source = plan.cases, plan.skipped_inputs, plan.points_spec, plan.points_source
    takes_text = bool(getattr(predictor, "takes_text", False))
    if takes_text and texts is None:
        raise InputError(None, f"{model} is guided by a finding sentence: give --text, --texts CSV or --text-from BUNDLE")
    if texts is not None and not takes_text:
        log.warning("%s reads no text: the guide texts are ignored", model)
        texts = None
    if texts is not None:
        texts.check_cases(cases)
    ctx = distributed.context(rank, world_size)
    if world_size > 1 and not ctx.active:
        raise ValueError(f"world_size={world_size} needs an initialised torch.distributed process group (run under "
                         "torchrun; see segreport.run.distributed): rank 0 must wait for the others to merge")
    output_dir.mkdir(parents=True, exist_ok=True)
    # one run per folder: rank 0 holds the lock for the whole (sharded) run
    with RunLock(output_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            remove_stale_temp_files(output_dir)
        # every rank has checked the folder before any rank writes to it
        distributed.barrier(ctx)

        checkpoint = checkpoint_info(getattr(predictor, "checkpoint_path", None))
        settings = RunSettings(model, (checkpoint or {}).get("sha256"), bool(getattr(predictor, "takes_points", True)),
                               float(min_lesion_ml), (getattr(predictor, "spec", None) or {}).get("training"), texts,
                               output_type)
        manifest = {
            "status": "running", "start_time": started, "end_time": None, "versions": _versions(),
            "model": {"name": model, "class": f"{type(predictor).__module__}.{type(predictor).__qualname__}",
                      "checkpoint": checkpoint},
            "device": device, "bf16": bf16, "world_size": world_size,
            "arguments": {"inputs": [str(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)],
                          "output_dir": str(output_dir), "overwrite": overwrite, "resume": resume, "workers": workers,
                          "pattern": pattern, "points": points_source, "allow_non_ct": allow_non_ct,
                          "allow_no_lungs": allow_no_lungs, "lung_masks": None if lung_masks is None else str(lung_masks),
                          "min_lesion_ml": min_lesion_ml, "texts": None if texts is None else texts.describe(),
                          "output_type": output_type},
            "n_cases": len(cases),
            "skipped_inputs": skipped_inputs,
            **(manifest_extra or {}),
        }
        if rank == 0:
            if resume:
                manifest["previous_runs"] = _previous_runs(output_dir / "manifest.json")
            write_json(manifest, output_dir / "manifest.json")

        mine = distributed.shard(cases, rank, world_size)
        rows: dict[str, dict] = {}
        todo = []
        for case in mine:
            if resume and case_complete(case, output_dir, settings.checkpoint_sha256,
                                        None if texts is None else texts.fingerprint(), output_type):
                rows[case.case_id] = _skipped_row(case, output_dir)
            else:
                todo.append(case)
        summary = BatchSummary(output_dir)

        def save_progress() -> None:
            summary.cases = [rows[c.case_id] for c in mine if c.case_id in rows]
            if world_size > 1:
                write_json({"rank": rank, **summary.to_dict()}, distributed.rank_summary_path(output_dir, rank))
            else:
                write_summary(summary)

        def autocast():
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

        min_lung = None if allow_no_lungs or not getattr(predictor, "needs_lungs", False) else MIN_LUNG_ML

        def load(c: Case) -> LoadedCase:
            return load_case(c, points_spec, points_source, allow_non_ct, min_lung, lung_masks)

        status = "interrupted"
        try:
            save_progress()
            bar = tqdm(total=len(todo), unit="case", desc=f"segreport rank {rank}" if world_size > 1 else "segreport",
                       position=rank if world_size > 1 else None, dynamic_ncols=True, disable=not progress)
            if len(todo) < len(mine):
                log.info("resume: %d finished case(s) skipped", len(mine) - len(todo))
            with logging_redirect_tqdm(), bar:
                for case, loading in prefetch(todo, load, workers):
                    bar.set_postfix_str(case.case_id)  # the case being worked on
                    rows[case.case_id] = run_case(case, loading, predictor, output_dir, settings, autocast)
                    save_progress()
                    bar.update()
            status = "finished"
        finally:
            if world_size > 1 and status == "finished":
                distributed.barrier(ctx)  # every shard done before rank 0 merges
                if rank == 0:
                    summary = BatchSummary(output_dir, distributed.merge_rank_summaries(
                        output_dir, world_size, [c.case_id for c in cases]))
                    write_summary(summary)
            if rank == 0:
                manifest.update(status=status, end_time=_now(), counts=summary.counts)
                write_json(manifest, output_dir / "manifest.json")
        if world_size > 1:
            distributed.barrier(ctx)  # no rank exits (and gets torchrun to tear the group down) before the merge
        return summary


if __name__ == "__main__":  # python -m segreport.run.batch ... (the CLI lives in infer_cli)
    from .infer_cli import main

    sys.exit(main())
