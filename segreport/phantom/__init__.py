"""Synthetic chest-CT phantom: the embedded default dataset, seeded, deterministic, with known truth.

Each case is a chest CT in Hounsfield units (air -1000, fat -100, soft tissue ~40, lung ~-860 with
vessels, bone 400-1000, small CT-like noise) on an anisotropic grid stored in a non-RAS orientation
(default LPS voxel axes), with lung label (1 right, 2 left: the PATIENT's sides), lesion mask, lesion
instance map, per-lesion attributes realised in the image and a finding sentence from
:class:`segreport.transforms.findings.FindingsFromMask`, so text and masks always agree.

How the attributes are realised (seed 001, Table 1) and how they are labelled:

* **shape** by geometry: round-like = ellipsoid; irregular = union of 3-5 offset spheres (lobulated),
  or a peripheral band for diffuse disease; wall thickening = ellipsoidal shell around an air cavity
  (the mask is the wall); punctate/nodular = a small sphere. Shape is the generated geometry.
* **density** = mean HU of the lesion core (the mask eroded by one voxel; the whole mask when that
  leaves < 8 voxels) against a soft-tissue reference of :data:`SOFT_TISSUE_HU`: hypodense below it
  by more than :data:`DENSITY_MARGIN`, hyperdense above it by more, isodense in between.
* **heterogeneity** = robust spread (IQR / 1.349) of core HU above :data:`HETEROGENEITY_HU`:
  heterogeneous lesions carry a mottled texture; vessels seen through ground glass do not count.
* **surface** = edge ratio: (median HU of the one-voxel in-plane ring just outside the lesion minus
  the lung background) / (core median minus background). Sharp edges give ~0; ill-defined margins are
  rendered with a sigmoid halo and give ~0.5+; the cut is :data:`ILL_DEFINED_EDGE_RATIO`. The mask
  of an ill-defined lesion ends at 80 % opacity, so an unlabelled haze surrounds it (also on the
  neighbouring slice): that haze is what makes the margin ill-defined.
* **invasion** = the lesion touches non-lung tissue (chest wall, mediastinum, diaphragm, spine).

Density, heterogeneity, surface and invasion are MEASURED on the final image, so the labels describe
what is there even when the generator missed its intention. Which focal lesions are drawn is not left to
chance: each split's come from a lesion plan (:mod:`segreport.phantom.plan`) that gives every class of the
five groups its stated share, with a floor; density is aimed at when painting and measured again. Lesion types: ground-glass opacity
(-600..-300 HU), consolidation (-100..50 HU, also the cavitating wall-thickening lesions), nodule
(solid or calcified); a lesion whose core mean would leave its type's range is placed again.
Diffuse disease (CT-2..CT-4, some CT-1) is peripheral, posterior-weighted ground glass, as in COVID-19. Severity CT-0..CT-4 is the percentage of lung voxels inside the lesion mask
(:func:`segreport.vocab.severity_from_percent`); about 15 % of cases are lesion-free (CT-0).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.special import expit

from ..errors import InputError
from ..transforms.findings import FindingsFromMask
from ..transforms.lung_regions import lung_zone_map
from ..vocab import ATTRIBUTE_GROUPS, LUNG_LABELS, PHANTOM_MARK, SEVERITY_BINS, severity_from_percent
from ..data.io import save_nifti
from .anatomy import TISSUES, _Anatomy, _anatomy, _smooth_noise  # noqa: F401  (TISSUES: public)
from .export import LUNG_WINDOW, _export_slices, _write_json, _write_xlsx, render_preview  # noqa: F401
from .lesions import (  # noqa: F401  (the attribute rules' constants: public here too)
    DENSITY_MARGIN, HETEROGENEITY_HU, ILL_DEFINED_EDGE_RATIO, LESION_TYPES, SEVERITY_SHARE, SOFT_TISSUE_HU, TYPE_HU,
    _CT1_DIFFUSE_CHANCE, _DIFFUSE_PERCENT, _FINDINGS, _Lesion, _paint_diffuse, _place_focal, _rng, density_class,
    lesion_from_recipe, measure_lesion,
)
from .plan import CLASS_FLOOR, FOCAL_SHARE, Recipe, class_counts, lesion_plan
from ..data.splits import split_cases

log = logging.getLogger(__name__)

# Bumped when the generator changes what it draws; models and reports record it (data.provenance).
PHANTOM_VERSION = "2"  # 2: focal lesions drawn from a lesion plan (phantom.plan)


def phantom_description(seed: int) -> str:
    return f"{PHANTOM_MARK} v{PHANTOM_VERSION} seed {seed}"

def _check_orientation(orientation: str) -> tuple[bool, bool, bool]:
    """Which canonical (RAS) axes to flip to store ``orientation``; only axis flips are supported."""
    codes = tuple(orientation.upper())
    allowed = ("RL", "AP", "SI")
    if len(codes) != 3 or any(c not in a for c, a in zip(codes, allowed)):
        raise ValueError(f"orientation must be one of R/L, A/P, S/I per axis (e.g. 'LPS'), got {orientation!r}")
    return tuple(c != "RAS"[d] for d, c in enumerate(codes))


# ------------------------------------------------------------------------------------------ one case


@dataclass
class PhantomCase:
    """One generated case, arrays in the stored voxel order; ``meta`` is its case JSON."""

    case_id: str
    ct: np.ndarray  # int16 HU
    label: np.ndarray  # uint8 0/1
    lesions: np.ndarray  # uint16 instance ids (keys of meta["lesions"])
    lung: np.ndarray  # uint8, 1 right / 2 left
    tissue: np.ndarray  # uint8 TISSUES codes (not written; for checks)
    affine: np.ndarray
    meta: dict


def _severity_plan(n_cases: int, rng: np.random.Generator) -> list[str]:
    """Severities in :data:`SEVERITY_SHARE` proportions (largest remainder), shuffled."""
    names = list(SEVERITY_SHARE)
    quota = np.array([SEVERITY_SHARE[s] * n_cases for s in names])
    counts = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - counts), kind="stable")[: n_cases - counts.sum()]:
        counts[i] += 1
    return [names[i] for i in rng.permutation(np.repeat(np.arange(len(names)), counts))]


def focal_count(severity: str, rng: np.random.Generator) -> int:
    """How many focal lesions a case of ``severity`` is planned with: fewer beside diffuse disease, which
    leaves little free lung to place them in."""
    low, high = {"CT-0": (0, 0), "CT-1": (3, 6), "CT-2": (2, 4)}.get(severity, (1, 3))
    return int(rng.integers(low, high + 1))


def _plan_dataset(n_cases: int, seed: int, ratios) -> tuple[list[str], dict[str, list[str]], dict[str, list[Recipe]]]:
    """Severity per case, case-level splits stratified by it, and each split's lesion plan dealt to its
    cases: every split holds the plan's class proportions, whatever its size."""
    severities = _severity_plan(n_cases, _rng(seed, 10**6))
    ids = [f"case_{i:04d}" for i in range(n_cases)]
    splits = split_cases([{"case_id": c, "severity": s} for c, s in zip(ids, severities)], ratios=ratios, seed=seed)
    n_focal = {c: focal_count(s, _rng(seed, 10**6 + 1, i)) for i, (c, s) in enumerate(zip(ids, severities))}
    recipes: dict[str, list[Recipe]] = {}
    for k, members in enumerate(splits.values()):
        plan = lesion_plan(sum(n_focal[c] for c in members), _rng(seed, 10**6 + 2, k))
        for c in members:
            recipes[c], plan = plan[: n_focal[c]], plan[n_focal[c]:]
    return severities, splits, recipes


def _stored_affine(shape, spacing, flips, rng) -> tuple[np.ndarray, np.ndarray]:
    """(canonical RAS affine, affine of the stored flipped array); the table position varies a little."""
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-30, 10), rng.uniform(-220, -140)])
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = centre - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    stored = ras.copy()
    for d, f in enumerate(flips):
        if f:
            stored[:3, 3] += ras[:3, d] * (shape[d] - 1)
            stored[:3, d] *= -1
    return ras, stored


def generate_case(
    case_id: str,
    severity: str,
    seed: int,
    index: int,
    shape: Sequence[int] = (192, 192, 48),
    spacing: Sequence[float] = (1.6, 1.6, 5.0),
    orientation: str = "LPS",
    recipes: Sequence[Recipe] | None = None,
) -> PhantomCase:
    """Generate one case (deterministic in ``seed``/``index``) aiming at ``severity`` (CT-0..CT-4), with
    focal lesions painted from ``recipes`` (by default a lesion plan of its own, :func:`focal_count` long).
    A recipe that finds no place after five lesions drawn from it is left out (logged)."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    flips = _check_orientation(orientation)
    rng = _rng(seed, index)
    an = _anatomy(rng, shape, spacing)
    ras_affine, affine = _stored_affine(shape, spacing, flips, rng)
    zone_map = lung_zone_map(an.lung, ras_affine)
    boundary = (an.lung > 0) & ~ndimage.binary_erosion(an.lung > 0)
    ct, gen = an.ct, np.zeros(shape, dtype=np.int32)
    occupied = np.zeros(shape, dtype=bool)
    scale = min(shape[0] * spacing[0], shape[1] * spacing[1]) / 307.0

    planned: list[_Lesion] = []
    diffuse = severity in _DIFFUSE_PERCENT and (severity != "CT-1" or rng.random() < _CT1_DIFFUSE_CHANCE)
    if diffuse:
        planned += _paint_diffuse(rng, an, ct, gen, occupied, rng.uniform(*_DIFFUSE_PERCENT[severity]), 1, zone_map)
    recipes = lesion_plan(focal_count(severity, rng), rng) if recipes is None else recipes
    for recipe in recipes:
        for _ in range(5):
            les = lesion_from_recipe(recipe, rng, scale)
            if _place_focal(rng, an, ct, gen, occupied, les, len(planned) + 1, spacing, zone_map, boundary):
                planned.append(les)
                break
        else:
            log.info("%s: no place found for a %s lesion", case_id, recipe)

    # CT noise: slightly correlated in-plane, as reconstruction makes it
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0.7, 0.7, 0.0))
    ct = ct + noise * (12.0 / max(float(noise.std()), 1e-6))
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    def store(a):
        return a[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]

    ct, lung, tissue, gen, body = (store(a) for a in (ct, an.lung, an.tissue, gen, an.body))
    found = _FINDINGS.describe((gen > 0).astype(np.uint8), lung=lung, affine=affine)
    instances = found.instances.astype(np.uint16)
    label = (instances > 0).astype(np.uint8)  # specks the findings ignore are not labelled either

    lung_mask = lung > 0
    background = float(np.median(ct[lung_mask & (instances == 0)]))
    lesions_meta, volume_by_type = [], {}
    for lf, box in zip(found.lesions, ndimage.find_objects(instances)):
        box = tuple(slice(max(b.start - 2, 0), b.stop + 2) for b in box)
        this = instances[box] == lf.id
        source = planned[int(np.bincount(gen[box][this]).argmax()) - 1]
        m = measure_lesion(ct[box], this, lung_mask[box], body[box], instances[box] > 0, background)
        attrs = {
            "shape": source.shape,
            "invasion": ATTRIBUTE_GROUPS["invasion"][int(m["touches_non_lung"])],
            "density": density_class(m["mean_hu"]),
            "heterogeneity": "heterogeneous" if m["spread_hu"] > HETEROGENEITY_HU else "homogeneous",
            "surface": "ill-defined margin" if m["edge_ratio"] > ILL_DEFINED_EDGE_RATIO else "well-defined",
        }
        volume_by_type[source.lesion_type] = volume_by_type.get(source.lesion_type, 0) + lf.voxels
        lesions_meta.append({
            "id": lf.id, "lesion_type": source.lesion_type, "voxels": lf.voxels,
            "centroid": [round(c, 2) for c in lf.centroid], "zones": lf.zones, **attrs, "measurements": m,
            "aimed": source.recipe.classes() if source.recipe else None,
        })  # fmt: skip

    percent = 100.0 * float(label.sum()) / max(int(lung_mask.sum()), 1)
    meta = {
        "case_id": case_id,
        "shape": list(shape),
        "spacing": list(spacing),
        "orientation": "".join(nib.aff2axcodes(affine)),
        "affine": np.round(affine, 4).tolist(),
        "severity": severity_from_percent(percent),
        "lung_involvement_percent": round(percent, 3),
        "lesion_type": max(volume_by_type, key=volume_by_type.get) if volume_by_type else "none",
        "text": found.text,
        "n_areas": found.n_areas,
        "zones": found.zones,
        "lesions": lesions_meta,
    }
    return PhantomCase(case_id, ct, label, instances, lung.astype(np.uint8), tissue, affine, meta)


def generate_dataset(
    out_dir: str | os.PathLike,
    n_cases: int = 20,
    seed: int = 0,
    shape: Sequence[int] = (192, 192, 48),
    spacing: Sequence[float] = (1.6, 1.6, 5.0),
    orientation: str = "LPS",
    export_2d: bool = True,
    slice_filter: str = "lesion",
    split_ratios: Sequence[float] = (0.7, 0.1, 0.2),
) -> dict:
    """Write the phantom dataset into ``out_dir`` and return a summary. Same seed -> same bytes.

    Layout: ``imagesTr/ labelsTr/ lesionsTr/ lungsTr/`` (``<case>.nii.gz``), ``cases/<case>.json``,
    MSD-style ``dataset.json``, ``splits.json``, and (``export_2d``) ``slices2d/{Train,Val,Test}_Folder/
    {img,labelcol}/<case>_sNNN.png`` + ``<Split>_text.xlsx`` (LViT layout, split by case). NNN is the
    index along the NIfTI's third voxel axis. ``slice_filter="lesion"`` exports the slices with lesion,
    as MosMedData+ does; ``"lung"`` every slice with lung (negatives read "No pulmonary infection.").

    Cases are split (``split_ratios``, by case, stratified by planned severity) before they are drawn, and
    each split's focal lesions come from a lesion plan of its own (:mod:`segreport.phantom.plan`), so every
    split holds every attribute class in the plan's proportions; ``dataset.json``'s ``lesion_counts``
    records the planned and the measured classes per split.
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if slice_filter not in ("lung", "lesion"):
        raise ValueError(f"slice_filter must be 'lung' or 'lesion', got {slice_filter!r}")
    _check_orientation(orientation)
    start = time.perf_counter()
    out = Path(out_dir)
    severities, splits, recipes = _plan_dataset(n_cases, seed, split_ratios)
    cases, training = [], []
    for i, severity in enumerate(severities):
        cid = f"case_{i:04d}"
        case = generate_case(cid, severity, seed, i, shape, spacing, orientation, recipes=recipes[cid])
        cid, meta = case.case_id, case.meta
        folders = {"image": "imagesTr", "label": "labelsTr", "lung": "lungsTr", "lesions": "lesionsTr"}
        paths = {key: f"{folder}/{cid}.nii.gz" for key, folder in folders.items()}
        for key, array in (("image", case.ct), ("label", case.label), ("lung", case.lung), ("lesions", case.lesions)):
            save_nifti(array, case.affine, out / paths[key], description=phantom_description(seed))
        _write_json(out / "cases" / f"{cid}.json", meta)
        attributes = [{k: les[k] for k in ("id", "lesion_type", *ATTRIBUTE_GROUPS)} for les in meta["lesions"]]
        training.append({
            **paths, "case_id": cid, "text": meta["text"], "severity": meta["severity"],
            "lesion_type": meta["lesion_type"], "attributes": attributes, "spacing": meta["spacing"],
            "source": "phantom",
        })  # fmt: skip
        cases.append(case)

    _write_json(out / "splits.json", splits)
    by_id = {c.case_id: c for c in cases}
    lesion_counts = {
        "focal_share": FOCAL_SHARE,
        "class_floor": CLASS_FLOOR,
        # what the painter aimed at (focal lesions), and what was measured on the images (diffuse disease too)
        "planned": {name: class_counts([{**r.classes(), "lesion_type": "focal"} for c in ids for r in recipes[c]])
                    for name, ids in splits.items()},
        "measured": {name: class_counts([les for c in ids for les in by_id[c].meta["lesions"]]) for name, ids in splits.items()},
    }
    _write_json(out / "dataset.json", {
        "name": "segreport-phantom",
        "description": "Synthetic chest CT with lung lesions, lung labels, attributes and LViT-style findings",
        "reference": "segreport.phantom",
        "licence": "CC0 (generated)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "lesion"},
        "lung_labels": {"0": "background", **{str(v): f"{k} lung" for k, v in LUNG_LABELS.items()}},
        "orientation": orientation.upper(),
        "seed": seed,
        "version": PHANTOM_VERSION,
        "split_ratios": list(split_ratios),
        "lesion_counts": lesion_counts,
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    })  # fmt: skip

    n_slices = {}
    if export_2d:
        for split, folder in (("training", "Train"), ("validation", "Val"), ("test", "Test")):
            target = out / "slices2d" / f"{folder}_Folder"
            rows = [row for cid in splits[split] for row in _export_slices(by_id[cid], target, slice_filter)]
            _write_xlsx(out / "slices2d" / f"{folder}_Folder" / f"{folder}_text.xlsx", rows)
            n_slices[folder] = len(rows)
    counts = {s: sum(c.meta["severity"] == s for c in cases) for s, _ in SEVERITY_BINS}
    return {
        "out_dir": str(out),
        "n_cases": n_cases,
        "case_ids": [c.case_id for c in cases],
        "severity_counts": counts,
        "splits": splits,
        "lesion_counts": lesion_counts["measured"],
        "n_slices": n_slices,
        "seconds": round(time.perf_counter() - start, 2),
    }


def ensure_dataset(out_dir: str | os.PathLike, present: Sequence[str] = ("dataset.json",), n_cases: int = 20, **kwargs) -> str:
    """``out_dir``, generated with :func:`generate_dataset` (``n_cases``, ``kwargs``) unless a dataset
    is already there: any entry matching one of the ``present`` glob patterns. What a bundle's
    ``prepare`` step calls, so it runs with no argument on a fresh machine and never overwrites data."""
    root = Path(out_dir)
    if not any(next(root.glob(pattern), None) for pattern in present):
        log.info("no dataset in %s: generating the synthetic chest-CT phantom (%d cases)", root, n_cases)
        generate_dataset(root, n_cases=n_cases, **kwargs)
    return str(root)


# any of these in a folder means "a dataset is here": it is never generated over (a user's data)
# studies: MosMedData; cases.csv: a folder of PNG slices (data.slice_folder)
DATASET_MARKERS = ("dataset.json", "*_Folder", "slices2d", "imagesTr", "labelsTr", "studies", "cases.csv")


DEFAULT_DATASET_DIR = "outputs/phantom"  # relative to the repository root, where bundles run from


def ensure_default(out_dir: str | os.PathLike, n_cases: int = 40, seed: int = 0) -> str:
    """The dataset folder a bundle trains on. The one default phantom (``DEFAULT_DATASET_DIR``) is
    generated there when absent, whichever bundle runs first: 192x192x48 at the default spacing, every
    lung slice in the 2D export (lesion-free ones too: a model run over whole volumes must have seen
    them). Any other folder is the user's: it must already hold a dataset (:data:`DATASET_MARKERS`) and
    nothing is ever written into it; without one it is a clear error (generate a phantom there with
    ``segreport synth --out DIR``)."""
    root = Path(out_dir)
    if any(next(root.glob(pattern), None) for pattern in DATASET_MARKERS):
        return str(root)
    if root.absolute() != Path(DEFAULT_DATASET_DIR).absolute():
        raise InputError(root, "no dataset found (looked for dataset.json, imagesTr/ + labelsTr/, the LViT "
                               "Train_Folder/Val_Folder/Test_Folder layout, or ct/ + infection/ + lungs/ + cases.csv); nothing is generated into a folder you "
                               "name: use `segreport synth --out DIR` to make a phantom there")
    return ensure_dataset(out_dir, DATASET_MARKERS, n_cases=n_cases, seed=seed, slice_filter="lung")
