"""Validated volume I/O: every image enters and leaves the project through this module.

``load_volume`` reads NIfTI with nibabel and anything else (a DICOM series folder, a single DICOM
file, .mha/.nrrd) with SimpleITK, and always returns the array in voxel order (i, j, k) with the
RAS+ affine nibabel would give for the same data (docs/CONVENTIONS.md). Bad input raises
:class:`segreport.errors.InputError` naming the file and the problem, so a batch run can report it
and go on. ``save_nifti`` writes atomically, so a crash never leaves a half-written mask behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from segreport.errors import InputError

from .dicom_groups import damaged_files, header_tag, uid_series

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# ITK/SimpleITK (DICOM) world coordinates are LPS+; nibabel's are RAS+: x and y change sign.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM/ITK patient coordinates -> nibabel's RAS (its own inverse)
# Slice positions may differ from the nominal step by this fraction before a DICOM series is called
# non-uniform (missing slices); real scanners jitter by well under 1 %.
_SLICE_STEP_RTOL = 0.05
_MAX_TILT_DEG = 0.5  # slices stepping further off their normal than this are a tilted (sheared) series


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000`` (``Path.stem`` would keep ``.nii``)."""
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def spacing_from_affine(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm along i, j, k: the lengths of the affine's columns."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


# ----------------------------------------------------------------------------------------- reading


def load_volume(
    path: str | os.PathLike, expect_ndim: int | None = 3, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a volume and check it. Returns ``(array float32, affine 4x4 RAS+, meta)``.

    ``path`` is a NIfTI file (.nii/.nii.gz), a DICOM series folder (``series_uid`` picks one when the
    folder holds several) or any other file SimpleITK reads. Trailing singleton dimensions beyond
    ``expect_ndim`` are squeezed (a 3D scan saved as X*Y*Z*1 is common); any other dimensionality
    mismatch, NaN/inf voxels, or zero/negative/non-finite spacing raise :class:`InputError`.
    ``meta`` holds ``filename``, ``format``, ``spacing``, ``axcodes``, ``shape``, ``dtype`` (on disk),
    and ``qform_code``/``sform_code`` (NIfTI) or ``series_uid`` (DICOM).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        array, affine, meta = _read_dicom_series(path, series_uid)
    elif is_nifti(path):
        array, affine, meta = _read_nifti(path)
    else:
        array, affine, meta = _read_sitk_file(path)

    if expect_ndim is not None:
        while array.ndim > expect_ndim and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != expect_ndim:
            raise InputError(path, f"expected a {expect_ndim}D image, got {array.ndim}D with shape {array.shape}")
    _check_spacing(path, affine, meta.pop("header_zooms", None))
    unscaled_integers = meta.pop("unscaled", False)  # NIfTI integers without scaling cannot be NaN or infinite
    n_bad = 0 if unscaled_integers else int(array.size - np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise InputError(path, f"{n_bad} voxels are NaN or infinite")

    meta.update(
        filename=os.path.abspath(path),
        shape=tuple(int(s) for s in array.shape),
        spacing=spacing_from_affine(affine),
        axcodes="".join(nib.aff2axcodes(affine)),
    )
    return array, affine, meta


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, zlib errors...
        raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None:  # RGB/RGBA NIfTI (structured voxels)
        raise InputError(path, f"{len(dtype.fields)}-component voxels ({dtype}): a colour image, not a scalar CT")
    if np.issubdtype(dtype, np.complexfloating):  # casting would silently drop the imaginary part
        raise InputError(path, f"complex-valued voxels ({dtype}): not a CT magnitude image")
    unscaled = bool(np.issubdtype(dtype, np.integer) and img.dataobj.slope == 1 and img.dataobj.inter == 0)
    try:
        # dataobj is lazy: a truncated .nii.gz only fails here, when the voxels are decompressed
        if unscaled:
            array = np.asanyarray(img.dataobj).astype(np.float32)  # the same values, half nibabel's float path's time
        else:
            array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    header = img.header
    meta = {
        "format": "nifti",
        "dtype": str(img.get_data_dtype()),
        "description": header["descrip"].item().decode("ascii", "replace").strip("\x00 "),
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
        "unscaled": unscaled,
    }
    if meta["sform_code"] == 0:  # the affine then comes from pixdim (qform or scaling alone)
        meta["header_zooms"] = _raw_pixdim(path, img)
    return array, img.affine.astype(np.float64), meta


def _raw_pixdim(path: Path, img: nib.Nifti1Image) -> tuple[float, ...]:
    """Spatial pixdims as written in the file. nibabel silently replaces zero/negative pixdims by
    1/abs() when it loads a header; re-read it unchecked so such a header is reported, not guessed."""
    with nib.openers.ImageOpener(path) as f:
        raw = type(img.header).from_fileobj(f, check=False)
    return tuple(float(z) for z in raw["pixdim"][1 : 1 + min(3, int(raw["dim"][0]))])


def _sitk_to_ras(image) -> tuple[np.ndarray, np.ndarray, str]:
    """SimpleITK image -> (float32 array in (i, j, k) order, RAS+ affine, on-disk dtype), matching
    what nibabel gives for the NIfTI that ITK would write from the same image."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    lps = np.eye(4)
    lps[:dim, :dim] = direction @ np.diag(image.GetSpacing())
    lps[:dim, 3] = image.GetOrigin()
    # GetArrayFromImage is (k, j, i): reverse to the voxel order nibabel uses.
    array = sitk.GetArrayFromImage(image)
    dtype = str(array.dtype)
    array = np.ascontiguousarray(array.astype(np.float32, copy=False).transpose(*reversed(range(dim))))
    return array, LPS_TO_RAS @ lps, dtype


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    found = dict(uid_series(folder, reader))  # series without a SeriesInstanceUID split apart (data.dicom_groups)
    series = list(found)
    if not series:
        raise InputError(folder, "folder holds no DICOM series")
    if series_uid is None:
        if len(series) > 1:
            raise InputError(folder, f"folder holds {len(series)} DICOM series {series}: pass series_uid (--series)")
        series_uid = series[0]
    elif series_uid not in found:
        raise InputError(folder, f"no DICOM series {series_uid!r} here (found {series})")
    files = found[series_uid]
    damaged = damaged_files(folder, {str(f) for listed in found.values() for f in listed})
    if damaged:
        raise InputError(damaged[0], f"a DICOM file of {folder.name}/ whose header cannot be read (truncated or damaged?): "
                                     f"the series would miss its slice ({len(damaged)} such file(s))")
    _check_slice_positions(folder, files)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:  # e.g. a compressed transfer syntax this GDCM build cannot decode
        raise InputError(folder, f"cannot decode DICOM series ({exc})") from exc
    array, affine, dtype = _sitk_to_ras(image)
    # anonymised series may lack SeriesInstanceUID: GDCM then names the series ""
    meta = {"format": "dicom", "dtype": dtype, "series_uid": series_uid or None, "n_files": len(files),
            "modality": header_tag(files[0], "0008|0060")}
    return array, affine, meta


def _check_slice_positions(folder: Path, files: Sequence[str]) -> None:
    """A series with a missing or duplicated slice, or whose slices step off their normal (gantry
    tilt, shear), has no orthogonal affine: refuse it rather than return a volume whose world
    coordinates are wrong for part of the slices."""
    import SimpleITK as sitk

    if len(files) < 2:
        return
    origins = []
    for name in files:
        info = sitk.ImageFileReader()
        info.SetFileName(name)
        info.ReadImageInformation()
        normal = np.asarray(info.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
        origins.append(np.asarray(info.GetOrigin(), dtype=np.float64))
    positions = [float(np.dot(normal, o)) for o in origins]
    steps = np.diff(positions)
    nominal = float(np.median(steps))
    if abs(nominal) < 1e-6 or np.any(np.abs(steps) < 1e-6):
        raise InputError(folder, "zero slice spacing: several slices share one position (duplicated slices?)")
    if np.any(np.abs(steps - nominal) > _SLICE_STEP_RTOL * abs(nominal)):
        raise InputError(
            folder,
            f"non-uniform slice positions (steps {np.round(np.unique(np.round(steps, 3)), 3).tolist()} mm): "
            "missing slices or several stacks in one series",
        )
    step = (origins[-1] - origins[0]) / (len(origins) - 1)  # the mean step between slice origins, in mm
    tilt = float(np.degrees(np.arccos(min(1.0, abs(np.dot(step, normal)) / np.linalg.norm(step)))))
    if tilt > _MAX_TILT_DEG:
        off = float(np.linalg.norm(origins[-1] - (origins[0] + normal * (positions[-1] - positions[0]))))
        raise InputError(
            folder,
            f"tilted or sheared geometry: the slices step {tilt:.1f} degrees off their normal (gantry tilt?), so the "
            f"last slice lies {off:.1f} mm from where an orthogonal grid puts it; resample the series to an "
            "orthogonal grid first (e.g. dcm2niix, which corrects gantry tilt) and give the NIfTI",
        )


def _read_sitk_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"not an image SimpleITK can read ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        n = image.GetNumberOfComponentsPerPixel()
        raise InputError(path, f"{n}-component pixels (colour?): expected a scalar image")
    array, affine, dtype = _sitk_to_ras(image)
    return array, affine, {"format": "sitk", "dtype": dtype}


def _check_spacing(path: Path, affine: np.ndarray, header_zooms: Sequence[float] | None) -> None:
    # header_zooms: the raw pixdims of a NIfTI whose affine is built from them (see _raw_pixdim)
    spacing = np.asarray(spacing_from_affine(affine))
    if not np.all(np.isfinite(affine)):
        raise InputError(path, "affine contains NaN or infinite values")
    if header_zooms is not None and np.any(np.asarray(header_zooms, dtype=float) <= 0):
        raise InputError(path, f"zero or negative voxel spacing in the header {tuple(float(z) for z in header_zooms)}")
    if np.any(spacing <= 1e-6):
        raise InputError(path, f"zero voxel spacing {tuple(np.round(spacing, 6).tolist())} (degenerate affine)")


def load_pair(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    *,
    allow_empty: bool = False,
    affine_atol: float = 1e-3,
    expect_ndim: int = 3,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Read an image and its label map and check they belong together.

    Returns ``(image float32, label int16, affine, meta)``; ``meta`` is the image's meta plus
    ``label_filename`` and ``label_empty``. Raises :class:`InputError` (naming the label file) when the
    shapes differ, the affines differ by more than ``affine_atol`` (mm), the label has non-integer or
    negative values, or it is empty and ``allow_empty`` is False.
    """
    image, affine, meta = load_volume(image_path, expect_ndim)
    label, label_affine, _ = load_volume(label_path, expect_ndim)
    if label.shape != image.shape:
        raise InputError(label_path, f"label shape {label.shape} differs from image shape {image.shape} ({image_path})")
    if not np.allclose(label_affine, affine, atol=affine_atol, rtol=0):
        raise InputError(
            label_path,
            f"label affine differs from the image's ({image_path}) by up to "
            f"{np.abs(label_affine - affine).max():.4g} mm:\n{np.round(label_affine, 4)}\nvs\n{np.round(affine, 4)}",
        )
    rounded = np.rint(label)
    if not np.array_equal(rounded, label):
        odd = label[rounded != label].flat[0]
        raise InputError(label_path, f"label values are not integers (e.g. {odd:g}): an image passed as a label?")
    if rounded.min() < 0 or rounded.max() > np.iinfo(np.int16).max:
        raise InputError(label_path, f"label values outside 0..32767 (min {rounded.min():g}, max {rounded.max():g})")
    empty = not np.any(rounded)
    if empty and not allow_empty:
        raise InputError(label_path, "label is empty (no foreground voxel); pass allow_empty=True to accept it")
    meta.update(label_filename=os.path.abspath(label_path), label_empty=empty)
    return image, rounded.astype(np.int16), affine, meta


# ----------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    The temp file keeps the destination's suffixes (nibabel picks gzip from ``.nii.gz``) and lives in
    the same folder because ``os.replace`` is only atomic within one filesystem. On error the temp
    file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    # a fresh unique name rather than tempfile.mkstemp, whose 0600 mode would stick to the result
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | str | None = None,
    qform_code: int = 1,
    sform_code: int = 1,
    description: str | None = None,
) -> Path:
    """Write ``array`` (voxel order i, j, k) with ``affine`` to a .nii/.nii.gz file, atomically.
    ``description``: the header's 80-byte ``descrip`` (the phantom marks its volumes there).

    Both qform and sform carry the affine, with the given codes (default 1, "scanner"; pass the
    ``qform_code``/``sform_code`` from :func:`load_volume`'s meta to keep the input's). ITK-based
    viewers prefer the qform, nibabel the sform: setting both makes every reader agree. bool arrays
    are stored as uint8, float64 as float32 and int64 as int32 (many tools reject 64-bit NIfTI)
    unless ``dtype`` says otherwise.
    """
    path = Path(path)
    if not is_nifti(path):
        raise ValueError(f"{path}: save_nifti writes .nii or .nii.gz files only")
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{path}: affine must be a finite 4x4 matrix, got {affine.shape}")
    if dtype is None:
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.float64): np.float32}.get(array.dtype, array.dtype)
        if array.dtype == np.int64:
            dtype = np.int32 if array.size == 0 or np.abs(array).max() <= np.iinfo(np.int32).max else np.int64
    # NIfTI stores Fortran order: nibabel writes a C-order array slice by slice (4x slower for the same bytes)
    img = nib.Nifti1Image(np.asfortranarray(array.astype(dtype, copy=False)), affine)
    img.set_qform(affine, code=int(qform_code))
    img.set_sform(affine, code=int(sform_code))
    img.header.set_xyzt_units("mm")
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


# ------------------------------------------------------------------------------------- fingerprint


def volume_fingerprint(
    items: Sequence[dict],
    image_key: str = "image",
    label_key: str = "label",
    *,
    max_voxels_per_case: int = 10_000,
    seed: int = 0,
) -> dict:
    """nnU-Net style data fingerprint of a datalist: spacing, shape, orientation, foreground intensity.

    Intensity percentiles are over up to ``max_voxels_per_case`` voxels sampled inside each label's
    foreground (as nnU-Net does), so the HU window and normalisation can be chosen from the data.
    Spacing/shape statistics are per axis in voxel order (i, j, k).
    """
    if not items:
        raise ValueError("volume_fingerprint: empty datalist")
    rng = np.random.default_rng(seed)
    spacings, shapes, axcodes, samples = [], [], {}, []
    for item in items:
        if item.get(label_key):
            image, label, affine, meta = load_pair(item[image_key], item[label_key], allow_empty=True)
            foreground = image[label > 0]
            if foreground.size:
                samples.append(rng.choice(foreground, size=min(max_voxels_per_case, foreground.size), replace=False))
        else:
            image, affine, meta = load_volume(item[image_key])
        spacings.append(meta["spacing"])
        shapes.append(meta["shape"])
        axcodes[meta["axcodes"]] = axcodes.get(meta["axcodes"], 0) + 1
    spacings, shapes = np.asarray(spacings), np.asarray(shapes)
    median_spacing = np.median(spacings, axis=0)
    fingerprint = {
        "n_cases": len(items),
        "median_spacing": median_spacing.tolist(),
        "min_spacing": spacings.min(axis=0).tolist(),
        "max_spacing": spacings.max(axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "min_shape": shapes.min(axis=0).tolist(),
        "max_shape": shapes.max(axis=0).tolist(),
        "axcodes": axcodes,
        # nnU-Net's rule: treat a dataset as anisotropic when one axis is 3x coarser than the finest
        "anisotropic": bool(median_spacing.max() > 3 * median_spacing.min()),
        "foreground_intensity": None,
    }
    if samples:
        values = np.concatenate(samples)
        pct = np.percentile(values, [0.5, 50.0, 99.5])
        fingerprint["foreground_intensity"] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "percentile_00_5": float(pct[0]),
            "median": float(pct[1]),
            "percentile_99_5": float(pct[2]),
        }
    return fingerprint
