"""The cases of a batch run: finding them (NIfTI files, DICOM series), their clicks, and loading them
ahead of the model in background threads (read + checks, lung label, zone map)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..data.io import is_nifti, load_volume, save_nifti, strip_nifti_suffix
from ..data.dicom_groups import read_dicom_folder
from ..data.plausibility import check_ct
from ..errors import InputError
from ..timing import collect_stages, stage
from ..inference.clicks import parse_clicks
from ..inference.geometry import voxel_volume_ml
from .report import lung_regions

log = logging.getLogger("segreport.batch")

# the masks of each --output-type, then what every case gets; the JSON report last in this order:
# written last, so its presence means "complete"
MASK_SUFFIXES: dict[str, dict[str, str]] = {
    "nifti": {"seg": "_seg.nii.gz",
              "lesions": "_lesions.nii.gz"},  # instance map: voxel value = the report's lesion id
    "dicom": {"dicom_seg": "_seg.dcm",  # DICOM SEG, one segment per lesion id (run.dicom_outputs)
              "dicom_sr": "_sr.dcm"},  # DICOM SR, TID 1500 measurement report
}
MASK_SUFFIXES["both"] = {**MASK_SUFFIXES["nifti"], **MASK_SUFFIXES["dicom"]}
OUTPUT_TYPES = tuple(MASK_SUFFIXES)
CASE_SUFFIXES: dict[str, str] = {"report_txt": "_report.txt", "preview": "_preview.png", "report": "_report.json"}
OUTPUT_SUFFIXES: dict[str, str] = {**MASK_SUFFIXES["nifti"], **CASE_SUFFIXES}  # the default (NIfTI) run's

@dataclass(frozen=True)
class Case:
    """One scan to run: ``path`` is a file or, for DICOM, a series folder (``series_uid`` picks one)."""

    case_id: str
    path: str
    series_uid: str | None = None

    def outputs(self, output_dir: str | os.PathLike, output_type: str = "nifti") -> dict[str, Path]:
        """This case's output files for ``--output-type`` (``both``: every file a case can have)."""
        suffixes = {**MASK_SUFFIXES[output_type], **CASE_SUFFIXES}
        return {kind: Path(output_dir) / f"{self.case_id}{suffix}" for kind, suffix in suffixes.items()}

    @property
    def is_dicom(self) -> bool:
        return Path(self.path).is_dir()  # a DICOM case is a series folder; a NIfTI case a file




def _id_from_relative(rel: Path) -> str:
    # subfolders become part of the id so same-named files in different folders stay apart
    return "__".join(rel.parent.parts + (strip_nifti_suffix(rel.name),))


def _is_under(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _listed(f: Path, root: Path, exclude: Path | None) -> bool:
    # hidden names are skipped (temp files, .DS_Store); OUTPUT_DIR is never input
    return not any(part.startswith(".") for part in f.relative_to(root).parts) and not _is_under(f.absolute(), exclude)


def _visible(f: Path, root: Path, exclude: Path | None) -> bool:
    return f.is_file() and _listed(f, root, exclude)


def _folder_cases(root: Path, pattern: str, exclude: Path | None, skipped: list[dict] | None = None) -> list[Case]:
    """NIfTI files matching ``pattern`` anywhere under ``root``, and every DICOM series anywhere under it
    (beside NIfTI files too). Other visible files are listed in ``skipped`` with the reason."""
    found = sorted(root.rglob("*"))  # one walk of the folder for everything below
    matched = {f for f in root.rglob(pattern) if _visible(f, root, exclude)}
    files = sorted(f.relative_to(root) for f in matched)
    ids = [_id_from_relative(rel) for rel in files]
    repeated = {i for i, n in Counter(ids).items() if n > 1}
    # case.nii beside case.nii.gz: keep the full file name for those
    ids = ["__".join(rel.parts) if i in repeated else i for i, rel in zip(ids, files)]
    cases = [Case(i, str(root / rel)) for i, rel in zip(ids, files)]
    others = [f for f in found if f not in matched and _visible(f, root, exclude)]
    dicom_folders = set()
    if others:  # only folders holding something else can hold a DICOM series: GDCM reads just those
        try:
            items = read_dicom_folder(root, only={f.parent for f in others})
        except InputError:
            items = []
        taken = {c.case_id for c in cases}
        for it in items:
            case_id = it["case_id"] if it["case_id"] not in taken else f"{it['case_id']}__dicom"
            cases.append(Case(case_id, it["image"], it.get("series_uid")))
            dicom_folders.add(Path(it["image"]))
    for f in others:
        if f.parent not in dicom_folders and skipped is not None:
            reason = ("a NIfTI file not matching --pattern " + repr(pattern)) if is_nifti(f) else "not a NIfTI file nor part of a DICOM series"
            skipped.append({"path": str(f), "reason": reason})
    if skipped is not None:  # a link to nothing is not a file: say so rather than pass over it
        skipped += [{"path": str(f), "reason": "a broken symbolic link (its target is missing, or the links loop)"}
                    for f in found if f.is_symlink() and not f.exists() and _listed(f, root, exclude)]
    if not cases:
        raise InputError(root, f"no file matches {pattern!r} and no DICOM series was found")
    return cases


def discover_cases(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], pattern: str = "*.nii*", exclude: str | os.PathLike | None = None,
    skipped: list[dict] | None = None,
) -> list[Case]:
    """Cases from a file, or a folder: its NIfTI files matching ``pattern`` and its DICOM series, anywhere
    under it; or a list of those. Case ids: the path relative to the folder without ``.nii[.gz]``,
    subfolders joined with ``__`` (``a/ct.nii.gz`` -> ``a__ct``); a DICOM series is named by its folder.
    ``exclude``: a folder (OUTPUT_DIR) whose files are never inputs. ``skipped``: a list that receives
    ``{"path", "reason"}`` for every other file found (nothing is dropped silently)."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    exclude = Path(exclude).absolute() if exclude is not None else None
    cases: list[Case] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(p, "input not found")
        if p.is_file():
            cases.append(Case(strip_nifti_suffix(p.name) if is_nifti(p) else p.stem, str(p.absolute())))
        else:
            cases += _folder_cases(p.absolute(), pattern, exclude, skipped)
    seen: dict[str, Case] = {}
    for case in cases:
        other = seen.setdefault(case.case_id, case)
        if other is not case:
            raise InputError(case.path, f"case id {case.case_id!r} is also the id of {other.path}: rename one")
    if not cases:
        raise InputError(paths[0] if paths else None, "no input cases")
    return cases


def select_series(cases: list[Case], series_uid: str, source) -> list[Case]:
    """Only the DICOM series ``series_uid`` of the discovered cases (a clear error when absent)."""
    chosen = [c for c in cases if c.series_uid == series_uid]
    if not chosen:
        found = sorted({c.series_uid for c in cases if c.series_uid})
        raise InputError(source, f"no DICOM series {series_uid!r} here (found {found or 'none with a SeriesInstanceUID'})")
    return chosen



# ----------------------------------------------------------------------------------------- points


def load_points(points: str | os.PathLike | dict | None) -> tuple[dict, str | None]:
    """``points.json`` -> ``({case id or file name: entry}, source path)``; a dict passes through."""
    if points is None:
        return {}, None
    if isinstance(points, dict):
        return points, "points argument"
    try:
        data = json.loads(Path(points).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(points, f"cannot read points JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(points, 'expected {"<case id or file name>": {"points": [[i, j, k], ...], "labels": [1, ...]}}')
    return data, str(points)


def case_points(
    case: Case, spec: dict, affine: np.ndarray, shape: Sequence[int], source: str | None
) -> tuple[list[list[int]] | None, list[int] | None]:
    """The case's clicks as IJK voxel indices and labels (1 lesion, 0 background; default all 1).

    Entries give ``points`` (IJK) or ``points_world`` (RAS mm, mapped through the inverse affine)."""
    entry = spec.get(case.case_id, spec.get(Path(case.path).name))
    if entry is None:
        return None, None
    world = "points" not in entry and "points_world" in entry
    if "points" not in entry and not world:
        raise InputError(source, f"case {case.case_id}: entry needs 'points' (IJK voxels) or 'points_world' (RAS mm)")
    key = "points_world" if world else "points"
    ijk, labels = parse_clicks(entry[key], entry.get("labels"), world=world, affine=affine, shape=shape, source=source,
                               what=f"case {case.case_id}: {key}")
    return np.rint(ijk).astype(int).tolist(), labels


# ---------------------------------------------------------------------------------------- loading


@dataclass
class LoadedCase:
    """A case read and pre-processed by a loader thread, ready for the predictor and the report."""

    image: np.ndarray
    affine: np.ndarray
    meta: dict
    lung: np.ndarray
    zones: np.ndarray
    points: list[list[int]] | None
    point_labels: list[int] | None
    load_s: float = 0.0
    stage_s: dict = field(default_factory=dict)  # segreport.timing: read, plausibility, lung mask
    # run.report_box.ImageContext, when the case is reported again and again (the MONAI Label app's clicks)
    report_context: Any = None

    def save_mask(self, mask: np.ndarray, path: str | os.PathLike, dtype=np.uint8) -> Path:
        """A mask (or label map: ``dtype``) on this case's grid as NIfTI, keeping the input's NIfTI codes
        (0 -> 1: the affine nibabel gave us is then stated explicitly)."""
        return save_nifti(mask, self.affine, path, dtype=dtype, qform_code=self.meta.get("qform_code") or 1,
                          sform_code=self.meta.get("sform_code") or 1)


def input_fingerprint(case: Case) -> dict:
    """What identifies the input's content cheaply: size and modification time of its file (or of every
    file of its DICOM folder). A resumed run redoes a case whose input changed since its report."""
    path = Path(case.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    stats = [f.stat() for f in files]
    return {"bytes": int(sum(st.st_size for st in stats)), "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
            "files": len(files), "series_uid": case.series_uid}


def _check_lung_label_sides(path: Path, label: np.ndarray, affine: np.ndarray) -> None:
    """Label 1 must lie to the patient's right of label 2 (RAS+: at larger world x): swapped labels would
    swap every side in the report."""
    from nibabel.affines import apply_affine

    if not (label == 1).any():
        return
    right_x, left_x = (float(apply_affine(affine, np.argwhere(label == v).mean(0))[0]) for v in (1, 2))
    if right_x < left_x:
        raise InputError(path, f"lung labels look swapped: label 1 (right lung) lies at x = {right_x:.0f} mm, to the patient's "
                               f"left of label 2 (left lung, x = {left_x:.0f} mm) in RAS+ world; expected 1 right / 2 left")


def user_lung_label(path: Path, image_shape, affine: np.ndarray) -> np.ndarray:
    """A lung mask the user supplied, on the scan's own grid: 1 right / 2 left, a binary mask (sides
    from the affine), or TotalSegmentator's multi-label output (lobes 10-14)."""
    from ..transforms.lung_mask import split_left_right
    from ..transforms.lung_regions import lung_label_from_lobes

    label, label_affine, _ = load_volume(path)
    if label.shape != tuple(image_shape) or not np.allclose(label_affine, affine, atol=1e-3):
        raise InputError(path, f"lung mask grid {label.shape} does not match the scan's {tuple(image_shape)} (same shape and affine needed)")
    values = set(np.unique(label).astype(int).tolist())
    if values <= {0, 1, 2} and 2 in values:
        _check_lung_label_sides(path, label, affine)
        return label.astype(np.uint8)
    if values <= {0, 1}:
        return split_left_right(label > 0, affine)
    if values & {10, 11, 12, 13, 14}:
        return lung_label_from_lobes(label)
    raise InputError(path, f"lung mask values {sorted(values)[:8]}: expected 1 right / 2 left, a binary mask, or TotalSegmentator lobes 10-14")


def load_case(case: Case, points_spec: dict | None = None, points_source: str | None = None,
              allow_non_ct: bool = False, min_lung_ml: float | None = None, lung_masks: str | os.PathLike | None = None) -> LoadedCase:
    """Read + check a scan (a plausible CT in HU unless ``allow_non_ct``: data.plausibility), compute its
    lung label and zone map (or read ``lung_masks/<case>.nii.gz`` when the user has one; with
    ``min_lung_ml``, refuse a scan with less lung: not a chest CT), resolve its clicks."""
    start = perf_counter()
    with collect_stages() as stages:
        loaded = _load_case(case, points_spec, points_source, allow_non_ct, min_lung_ml, lung_masks)
    loaded.stage_s, loaded.load_s = stages, perf_counter() - start
    return loaded


def _load_case(case: Case, points_spec, points_source, allow_non_ct, min_lung_ml, lung_masks) -> LoadedCase:
    with stage("read"):
        image, affine, meta = load_volume(case.path, expect_ndim=3, series_uid=case.series_uid)
    if min(image.shape) < 2:
        raise InputError(case.path, f"shape {image.shape}: a single slice, not a 3D volume")
    with stage("plausibility"):
        check_ct(image, affine, case.path, meta.get("dtype"), allow_non_ct, meta.get("modality"))
    supplied = next((p for p in (Path(lung_masks) / f"{case.case_id}{sfx}" for sfx in (".nii.gz", ".nii")) if p.is_file()),
                    None) if lung_masks else None
    if supplied is not None:  # the user's own lung mask (e.g. TotalSegmentator's) instead of the HU threshold
        from ..transforms.lung_regions import lung_zone_map

        with stage("lung mask"):
            lung = user_lung_label(supplied, image.shape, affine)
            zones = lung_zone_map(lung, affine) if lung.any() else np.zeros(lung.shape, np.uint8)
        meta["lung_source"] = str(supplied)
    else:
        with stage("lung mask"):
            lung, zones = lung_regions(image, affine)
    if min_lung_ml is not None:
        lung_ml = np.count_nonzero(lung) * voxel_volume_ml(affine)
        if lung_ml < min_lung_ml:
            raise InputError(case.path, f"no lungs found ({lung_ml:.0f} mL of lung in the lung mask, under "
                                        f"{min_lung_ml:g} mL): not a chest CT? Pass --allow-no-lungs to run anyway")
    points, labels = case_points(case, points_spec or {}, affine, image.shape, points_source)
    return LoadedCase(image, affine, meta, lung, zones, points, labels)


def prefetch(items: Iterable, load: Callable, workers: int) -> Iterator[tuple[Any, Future]]:
    """Yield ``(item, future of load(item))`` in order while up to ``workers`` later items load in
    background threads (file reading and zlib release the GIL). ``workers=0`` loads in the caller."""
    items = iter(items)
    if workers <= 0:
        for item in items:
            future: Future = Future()
            try:
                future.set_result(load(item))
            except Exception as exc:  # delivered through the future, like a thread's error
                future.set_exception(exc)
            yield item, future
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="segreport-load")
    try:
        pending = deque((item, pool.submit(load, item)) for item in islice(items, workers))
        while pending:
            item, future = pending.popleft()
            for nxt in islice(items, 1):
                pending.append((nxt, pool.submit(load, nxt)))
            yield item, future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


