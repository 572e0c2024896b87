"""Interactive 3D lesion report pipeline (seed 001): data, click-simulation training, evaluation, inference.

The bundle YAMLs (``bundles/lesion_report_3d/configs``) only wire these pieces into MONAI's
SupervisedTrainer / SupervisedEvaluator and handlers; everything with logic lives here.

Stages (nnU-Net style, each callable on its own):

* **data**: :func:`prepare_data` (phantom when the folder is empty), :func:`read_attribute_table`
  (user CSV/JSON per lesion), :func:`load_datalists` (lesion-free cases skipped with a logged reason,
  60/20/20 case split as the paper, optional zero-shot hold-out of lesion types);
* **pre-processing**: :func:`load_transforms` + :func:`spatial_transforms` — load CT/label/instance
  map, :class:`SelectLesiond` (the largest lesion becomes the target and its attributes the
  attribute targets), orientation, MONAI ``Spacingd`` to a common spacing, HU window, a fixed ROI
  around the lesion (``CropLargestLesiond``);
* **training**: :class:`SimulatedClicksInferer` plugs the paper's expert-click simulation into the
  stock SupervisedTrainer iteration (AMP, gradient accumulation and events stay MONAI's);
* **evaluation**: :func:`evaluate` (DSC, HD95 in mm, attribute accuracy, Dice per click, NoC,
  zero-shot split) and :func:`write_ablation_table`;
* **inference**: :class:`InteractiveSession` (image embedding cached between clicks; what MONAI Label
  calls) and :class:`LesionReportPredictor` (the batch ``Predictor`` contract).

Geometry: clicks arrive as IJK voxels (or RAS mm) of the ORIGINAL image and are carried into the ROI
through affines only (original -> world -> ROI voxel), so orientation, resampling and cropping never
need to be re-derived by hand; masks go back the same way (see :func:`roi_to_original`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.engines import PrepareBatch
from monai.inferers import Inferer
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandSpatialCropd,
    SelectItemsd,
    SpatialResample,
    Spacingd,
)
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from ..data import phantom, readers, splits as splits_mod
from ..errors import InputError
from ..losses.lesion_report import LesionReportLoss
from ..metrics.attributes import attribute_accuracy
from ..metrics.segmentation import dice as dice_score, hd95
from ..data.io import spacing_from_affine
from ..networks.baselines3d import AttributeCNN, unet_baseline
from ..networks.lesion_prompt import LesionPromptNet
from ..transforms.attributes import IGNORE_INDEX, encode_attribute, encode_attributes
from ..transforms.clicks import PAD_LABEL, interior_distance, sample_click
from ..transforms.crop import CropLargestLesion, CropLargestLesiond
from ..transforms.intensity import HUWindowd
from ..transforms.lung_mask import lung_mask_from_ct
from ..vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES
from ..inference.predictor import LesionAttributes, Prediction
from .loaders import make_dataset, make_loader  # noqa: F401  (re-exported for the bundle YAMLs)

log = logging.getLogger("segreport.lesion_report")

PAPER_RATIOS = (60, 20, 20)  # seed 001, Sec. 3.1: training / validation / test
LESION_DENSITY_HU = -500.0  # zero-click ROI: lesions are denser than aerated lung (-850) but GGO reaches -600..-300
_FULL_3D = ndimage.generate_binary_structure(3, 3)  # same connectivity as CropLargestLesion's default


# ============================================================================================ data
def prepare_data(
    dataset_dir: str | os.PathLike,
    n_cases: int = 40,
    seed: int = 0,
    shape: Sequence[int] = (192, 192, 48),
    spacing: Sequence[float] = (1.6, 1.6, 5.0),
) -> str:
    """Generate the synthetic chest-CT phantom into ``dataset_dir`` unless a dataset (MSD json or imagesTr/) is there."""
    return phantom.ensure_dataset(dataset_dir, ("dataset.json", "imagesTr"), n_cases=n_cases, seed=seed,
                                  shape=tuple(shape), spacing=tuple(spacing))


_ID_COLUMNS = ("lesion_id", "id")


def read_attribute_table(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Per-lesion attributes from a CSV or JSON table -> ``{case_id: [{id, shape, ...}, ...]}``.

    Columns (CSV header or JSON keys): ``case_id``; ``lesion_id`` (or ``id``): the lesion's value in
    the case's instance map (``lesionsTr``), or, without an instance map, the number of its connected
    component in scan order; ``shape``, ``invasion``, ``density``, ``heterogeneity``, ``surface``
    (class names, synonyms or indices; see :mod:`segreport.transforms.attributes`); optional
    ``lesion_type``. An empty ``lesion_id`` makes the row the case-level description of its largest
    lesion (datasets annotated one lesion per scan, as the paper's). An empty attribute cell means
    "not annotated": training ignores that group for that lesion (``IGNORE_INDEX``).

    JSON may be a list of such rows or ``{case_id: [row without case_id, ...]}``. Unknown values, a
    missing column or a duplicated (case, lesion) raise :class:`InputError` naming the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "attribute table not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(path, f"not valid JSON ({exc})") from exc
        if isinstance(data, Mapping):
            rows = [{**r, "case_id": cid} for cid, lesions in data.items() for r in lesions]
        elif isinstance(data, list):
            rows = data
        else:
            raise InputError(path, "expected a list of rows or {case_id: [rows]}")
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = set(reader.fieldnames or ())
    missing = [c for c in ("case_id", *ATTRIBUTE_NAMES) if c not in columns]
    if missing:
        raise InputError(path, f"missing column(s) {missing}; expected case_id, lesion_id, {', '.join(ATTRIBUTE_NAMES)}")

    def blank(v) -> bool:
        return v is None or (isinstance(v, str) and not v.strip())

    table: dict[str, list[dict]] = {}
    seen = set()
    is_json = path.suffix.lower() == ".json"
    for n, row in enumerate(rows, start=1 if is_json else 2):  # CSV: line numbers (header = line 1)
        where = f"entry {n}" if is_json else f"line {n}"
        case_id = "" if blank(row.get("case_id")) else str(row["case_id"]).strip()
        if not case_id:
            raise InputError(path, f"{where}: empty case_id")
        raw_id = next((row[c] for c in _ID_COLUMNS if not blank(row.get(c))), None)
        try:
            lesion_id = None if raw_id is None else int(float(raw_id))
        except ValueError:
            raise InputError(path, f"{where}: lesion id {raw_id!r} is not an integer") from None
        if (case_id, lesion_id) in seen:
            raise InputError(path, f"{where}: case {case_id!r} lesion {lesion_id} appears twice")
        seen.add((case_id, lesion_id))
        entry: dict[str, Any] = {"id": lesion_id}
        if not blank(row.get("lesion_type")):
            entry["lesion_type"] = str(row["lesion_type"]).strip()
        for group in ATTRIBUTE_NAMES:
            value = row.get(group)
            if blank(value):
                entry[group] = None
                continue
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            try:
                encode_attribute(group, value.strip() if isinstance(value, str) else value, path)
            except InputError as exc:
                raise InputError(path, f"{where}: {exc.problem}") from None
            entry[group] = value.strip() if isinstance(value, str) else value
        table.setdefault(case_id, []).append(entry)
    return table


def _has_lesion(item: Mapping) -> bool:
    """Whether the item's label holds any lesion voxel (read lazily with nibabel, no resampling)."""
    import nibabel as nib

    try:
        return bool(np.any(np.asarray(nib.load(item["label"]).dataobj) > 0))
    except Exception as exc:  # nibabel raises many error types for a broken file: name the file
        raise InputError(item["label"], f"cannot read label ({type(exc).__name__}: {exc})") from exc


def drop_lesion_free(items: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Keep items whose label has a lesion; the others come back as ``{case_id, reason}`` rows.

    An interactive lesion model has nothing to click on, no target mask and no attributes in a
    lesion-free scan, so such cases are skipped — each with a logged warning, never silently.
    """
    kept, skipped = [], []
    for item in items:
        if not item.get("label"):
            reason = "no lesion label"
        elif not _has_lesion(item):
            reason = "label has no lesion voxels (nothing to click on, no attributes)"
        else:
            kept.append(item)
            continue
        log.warning("skipping case %s: %s", item.get("case_id"), reason)
        skipped.append({"case_id": item.get("case_id"), "reason": reason})
    return kept, skipped


LESION_TARGETS = ("largest", "all")


def expand_lesions(items: Sequence[dict], min_voxels: int = 20) -> list[dict]:
    """One item per lesion (``lesion_id`` set) instead of one per case; lesions under ``min_voxels``
    voxels (on the original grid) are left out, with one logged line per case saying how many."""
    import nibabel as nib

    out = []
    for item in items:
        label = np.asarray(nib.load(item["label"]).dataobj)
        inst = np.asarray(nib.load(item["lesions"]).dataobj) if item.get("lesions") else None
        try:
            _, counts = lesion_ids(label, inst)
        except ValueError as exc:
            raise InputError(item.get("lesions"), str(exc)) from None
        keep = [int(i) for i in np.flatnonzero(counts >= min_voxels)]
        small = int(np.count_nonzero((counts > 0) & (counts < min_voxels)))
        if small:
            log.warning("case %s: %d lesion(s) under %d voxels not used as targets", item.get("case_id"), small, min_voxels)
        out += [{**item, "lesion_id": i} for i in keep]
    return out


def load_datalists(
    dataset_dir: str | os.PathLike,
    attribute_table: str | os.PathLike | None = None,
    ratios: Sequence[float] = PAPER_RATIOS,
    seed: int = 0,
    holdout_lesion_types: Sequence[str] = (),
    lesions: str = "largest",
    min_lesion_voxels: int = 20,
) -> dict[str, list]:
    """Case-level splits of a 3D dataset: ``training``, ``validation``, ``test`` (+ ``zeroshot``) and
    ``skipped`` (``{case_id, reason}`` of lesion-free cases).

    ``dataset_dir``: an MSD-style ``dataset.json`` (the phantom writes one, with per-lesion attributes
    and ``lesionsTr`` instance maps) or ``imagesTr/`` + ``labelsTr/`` (+ optional ``lesionsTr/``).
    ``attribute_table``: CSV/JSON per lesion (:func:`read_attribute_table`), overriding attributes in
    the dataset. ``holdout_lesion_types``: the zero-shot protocol (Sec. 3.1): cases whose
    ``lesion_type`` is listed never enter training/validation and form the ``zeroshot`` split.
    ``lesions``: ``largest`` (the paper: one item per case, its largest lesion) or ``all`` (one item per
    lesion of at least ``min_lesion_voxels`` voxels, split still by case; more and more varied
    attribute targets from multi-lesion scans). With no validation case left (tiny data sets)
    validation reuses the training cases, with a warning.
    """
    if lesions not in LESION_TARGETS:
        raise ValueError(f"lesions must be one of {LESION_TARGETS}, got {lesions!r}")
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        items = readers.read_msd(root / "dataset.json")
    else:
        images = sorted((root / "imagesTr").glob("*.nii*"))
        # identical image/label names (MSD style, e.g. case_0000.nii.gz in both): no nnU-Net channel suffix
        same_names = bool(images) and all((root / "labelsTr" / p.name).is_file() for p in images)
        items = readers.read_nifti_folder(root / "imagesTr", root / "labelsTr", channel_suffix="" if same_names else "_0000")
        lesions_dir = root / "lesionsTr"
        for item in items:
            found = sorted(lesions_dir.glob(f"{item['case_id']}.nii*")) if lesions_dir.is_dir() else []
            if found:
                item["lesions"] = str(found[0])
    if attribute_table:
        table = read_attribute_table(attribute_table)
        ids = {it["case_id"] for it in items}
        unknown = sorted(set(table) - ids)
        if unknown:
            log.warning("%s: attributes for %d case(s) not in the dataset ignored, e.g. %s", attribute_table, len(unknown), unknown[:5])
        for item in items:
            if item["case_id"] in table:
                item["attributes"] = table[item["case_id"]]
                types = [a["lesion_type"] for a in table[item["case_id"]] if a.get("lesion_type")]
                if types and not item.get("lesion_type"):
                    item["lesion_type"] = types[0]
    items, skipped = drop_lesion_free(items)
    if not items:
        raise InputError(root, "no case with a lesion label: nothing to train or evaluate on")
    holdout = {"key": "lesion_type", "values": list(holdout_lesion_types)} if holdout_lesion_types else None
    stratify = "lesion_type" if all(it.get("lesion_type") for it in items) else None
    case_splits = splits_mod.split_cases(items, ratios=ratios, seed=seed, stratify_by=stratify, holdout=holdout)
    by_id = {it["case_id"]: it for it in items}
    out: dict[str, list] = {name: [by_id[c] for c in ids] for name, ids in case_splits.items()}
    if not out.get("training"):
        raise InputError(root, f"no training case after the split {case_splits}")
    if not out.get("validation"):
        log.warning("no validation case (only %d usable cases): validating on the training cases", len(items))
        out["validation"] = list(out["training"])
    if lesions == "all":
        out = {name: expand_lesions(split, min_lesion_voxels) for name, split in out.items()}
    out["skipped"] = skipped
    return out


# ================================================================================ pre-processing
def lesion_ids(label: np.ndarray, instances: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(id map, voxels per id)`` of the lesions in ``label``: the instance map restricted to the label,
    or, without one, its connected components (full 3D connectivity) numbered in scan order."""
    fg = np.asarray(label) > 0
    if instances is not None:
        ids = np.asarray(instances).astype(np.int64) * fg
        if fg.any() and not ids.any():
            raise ValueError("the lesion instance map does not overlap the label")
    else:
        ids = ndimage.label(fg, structure=_FULL_3D)[0]
    counts = np.bincount(ids.ravel())
    counts[0] = 0
    return ids, counts


def attribute_targets(attributes: Sequence[Mapping] | None, lesion_id: int, case_id: str | None = None,
                      largest: bool = True) -> torch.Tensor:
    """(5,) class indices of lesion ``lesion_id`` in ``ATTRIBUTE_NAMES`` order; unknown -> IGNORE_INDEX.

    The row whose ``id`` matches wins; else, for the case's ``largest`` lesion, a case-level row
    (``id`` None). Missing rows or groups are ignored by the loss and logged, so a half-annotated
    dataset still trains.
    """
    rows = list(attributes or [])
    row = next((r for r in rows if r.get("id") is not None and int(r["id"]) == lesion_id), None)
    if row is None and largest:
        row = next((r for r in rows if r.get("id") is None), None)
    if row is None:
        log.warning("case %s lesion %s: no attributes; its attribute loss is ignored", case_id, lesion_id)
        return torch.full((len(ATTRIBUTE_NAMES),), IGNORE_INDEX, dtype=torch.long)
    codes = encode_attributes(row, missing="ignore", path=case_id)
    missing = [g for g, v in codes.items() if v == IGNORE_INDEX]
    if missing:
        log.warning("case %s lesion %s: attribute(s) %s missing; ignored in the loss", case_id, lesion_id, missing)
    return torch.tensor([codes[g] for g in ATTRIBUTE_NAMES], dtype=torch.long)


class SelectLesiond(MapTransform):
    """Make one lesion THE lesion of the item: label := its mask, plus its attribute targets.

    The lesion is the item's ``id_key`` when set (:func:`expand_lesions`), else the largest one.

    Runs on the original grid (before resampling), so the instance map is never interpolated.
    Writes ``label`` (that lesion only: other lesions are background, as an annotator clicking this
    lesion expects), ``lesion_id`` and ``attr_target`` (LongTensor (5,), IGNORE_INDEX where unknown,
    see :func:`attribute_targets`); removes ``instance_key``. An empty label raises
    :class:`InputError` naming the file (:func:`drop_lesion_free` skips those cases beforehand).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        instance_key: str = "lesions",
        attributes_key: str = "attributes",
        id_key: str = "lesion_id",
        attr_key: str = "attr_target",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.instance_key, self.attributes_key = instance_key, attributes_key
        self.id_key, self.attr_key = id_key, attr_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            inst = d.pop(self.instance_key, None)
            inst_np = None if inst is None else np.asarray(inst)[0]
            wanted = d.get(self.id_key)
            try:
                ids, counts = lesion_ids(np.asarray(label)[0], inst_np)
            except ValueError as exc:
                raise InputError(_filename(label), str(exc)) from None
            largest = int(np.argmax(counts)) if counts.max(initial=0) > 0 else None
            lesion_id = largest if wanted is None else int(wanted)
            if lesion_id is None or lesion_id >= len(counts) or counts[lesion_id] == 0:
                problem = "label has no lesion voxels" if wanted is None else f"label has no lesion {wanted}"
                raise InputError(_filename(label), f"{problem}: no lesion to centre the ROI on")
            d[key] = _like(label, (ids == lesion_id)[None].astype(np.float32))
            d[self.id_key] = lesion_id
            d[self.attr_key] = attribute_targets(d.get(self.attributes_key), lesion_id, d.get("case_id"), lesion_id == largest)
        return d


def _filename(x) -> str | None:
    return x.meta.get("filename_or_obj") if isinstance(x, MetaTensor) else None


def _like(ref, array: np.ndarray):
    """``array`` as a MetaTensor carrying ``ref``'s meta (affine, file name), or a plain tensor."""
    if isinstance(ref, MetaTensor):
        return MetaTensor(torch.as_tensor(array), meta=dict(ref.meta))
    return torch.as_tensor(array)


def _window_kwargs(window: str | Sequence[float]) -> dict:
    """HU window: a preset name ("lung", "abdomen", "mediastinum") or ``[a_min, a_max]``."""
    if isinstance(window, str):
        return {"preset": window}
    a_min, a_max = window
    return {"preset": None, "a_min": float(a_min), "a_max": float(a_max)}


def load_transforms(select: bool = True) -> Compose:
    """Load CT, label and instance map channel-first in their file voxel order (+ :class:`SelectLesiond`)."""
    steps = [LoadImaged(keys=["image", "label", "lesions"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)]
    if select:
        steps.append(SelectLesiond("label"))
    return Compose(steps)


def volume_transforms(spacing: Sequence[float], window: str | Sequence[float] = "lung", axcodes: str = "RAS",
                      keys: Sequence[str] = ("image", "label")) -> Compose:
    """Reorient, resample to ``spacing`` (mm; MONAI ``Spacingd``, bilinear image / nearest label), HU window."""
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    return Compose([
        Orientationd(keys=keys, axcodes=axcodes, labels=None, allow_missing_keys=True),
        Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes, allow_missing_keys=True),
        HUWindowd(keys="image", **_window_kwargs(window)),
    ])


def spatial_transforms(roi_size: int | Sequence[int], spacing: Sequence[float], window: str | Sequence[float] = "lung",
                       axcodes: str = "RAS", margin: int = 0) -> Compose:
    """:func:`volume_transforms`, then the fixed ROI centred on the (selected) lesion.

    ``margin`` > 0 crops ``roi_size + 2 * margin`` so that a random ``roi_size`` crop after the cache
    shifts the lesion by up to ``margin`` voxels (training: at inference the ROI is centred on a
    click, not on the lesion's bounding box). Parts of the ROI outside the image (small images,
    lesions at the border) are padded: image with 0, i.e. the window minimum (air in the lung
    window), label with background.
    """
    roi = np.broadcast_to(np.asarray(roi_size, dtype=int), (3,)) + 2 * int(margin)
    return Compose([
        volume_transforms(spacing, window, axcodes),
        CropLargestLesiond(keys=["image", "label"], roi_size=tuple(int(r) for r in roi), label_key="label", on_empty="raise"),
    ])


def training_transforms(roi_size: int | Sequence[int], spacing: Sequence[float], window: str | Sequence[float] = "lung",
                        axcodes: str = "RAS", margin: int = 0) -> Compose:
    """Items -> ``image`` (1, *roi) in [0, 1], ``label`` (1, *roi) target lesion, ``attr_target`` (5,).

    Deterministic up to the crop (so ``CacheDataset`` caches it); with ``margin`` a random
    ``roi_size`` crop follows.
    """
    roi = tuple(int(r) for r in np.broadcast_to(np.asarray(roi_size, dtype=int), (3,)))
    steps = [load_transforms(), spatial_transforms(roi, spacing, window, axcodes, margin)]
    if margin:
        steps.append(RandSpatialCropd(keys=["image", "label"], roi_size=roi, random_size=False))
    steps += [EnsureTyped(keys=["image", "label"], track_meta=False),
              SelectItemsd(keys=["image", "label", "attr_target", "lesion_id", "case_id"])]
    return Compose(steps).flatten()  # flat: CacheDataset caches up to the first random (or nested) transform


# ===================================================================================== networks
class DictOutput(nn.Module):
    """Names a baseline's output like ``LesionPromptNet``'s (``mask_logits`` / ``attr_logits``), so the
    loss, the click inferer (which just calls a network without ``decode``) and evaluation take any model."""

    def __init__(self, net: nn.Module, key: str):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, image: torch.Tensor) -> dict:
        return {self.key: self.net(image)}


# baseline sizes: "tiny" for CPU runs beside the tiny LesionPromptNet, "paper" = the modules' defaults
BASELINE_CONFIGS = {
    "unet": {"tiny": dict(features=(8, 8, 16, 32, 64, 8)), "paper": {}},
    "cnn_attr": {"tiny": dict(block_inplanes=(8, 16, 32, 64)), "paper": {}},
}


MODELS = ("lesion_prompt", "unet", "cnn_attr")


def build_network(
    model: str = "lesion_prompt",
    config: str = "tiny",
    roi_size: int = 32,
    point_refinement: bool = True,
    synergy: bool = True,
    high_res_features: bool = False,
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    window: str | Sequence[float] = "lung",
    axcodes: str = "RAS",
    **overrides: Any,
) -> nn.Module:
    """The bundle's network: ``lesion_prompt`` (seed 001's model) or a baseline of its comparison tables,
    ``unet`` (Table 2, seg-only, no clicks) or ``cnn_attr`` (Table 3, attributes only), both from
    :mod:`segreport.networks.baselines3d`.

    The full description (model, sizes, switches AND the pre-processing: spacing, window, axcodes)
    is kept on ``network.spec`` and saved inside every checkpoint (:class:`NetworkSpec`), so
    evaluation and inference rebuild the same model and pre-process exactly as in training.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    if model == "lesion_prompt":
        net = LesionPromptNet.from_config(config, img_size=int(roi_size), point_refinement=bool(point_refinement),
                                          synergy=bool(synergy), high_res_features=bool(high_res_features), **overrides)
    elif model == "unet":
        net = DictOutput(unet_baseline(**{**BASELINE_CONFIGS[model][config], **overrides}), "mask_logits")
    else:
        net = DictOutput(AttributeCNN(**{**BASELINE_CONFIGS[model][config], **overrides}), "attr_logits")
    net.spec = {
        "model": model, "config": config, "roi_size": int(roi_size), "point_refinement": bool(point_refinement),
        "synergy": bool(synergy), "high_res_features": bool(high_res_features), "spacing": [float(s) for s in spacing],
        "window": window if isinstance(window, str) else [float(w) for w in window], "axcodes": axcodes,
        **overrides,
    }  # fmt: skip
    return net


def _unwrap(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel / DataParallel


def _spacing(net: nn.Module) -> list[float] | None:
    """The model's voxel size (mm) from its ``spec``, i.e. the ROI's; None for a bare network."""
    return (getattr(net, "spec", None) or {}).get("spacing")


def is_interactive(network: nn.Module) -> bool:
    """Whether the network takes clicks (``encode_image`` + ``decode``), i.e. is not a baseline."""
    net = _unwrap(network)
    return hasattr(net, "encode_image") and hasattr(net, "decode")


class NetworkSpec:
    """Puts ``network.spec`` into a checkpoint beside the weights (CheckpointSaver ``save_dict`` entry)."""

    def __init__(self, spec: Mapping):
        self.spec = dict(spec)

    @classmethod
    def of(cls, network: nn.Module) -> NetworkSpec:
        return cls(_unwrap(network).spec)

    def state_dict(self) -> dict:
        return dict(self.spec)

    def load_state_dict(self, state: Mapping) -> None:
        self.spec = dict(state)


def load_trained(checkpoint: str | os.PathLike, network: nn.Module | None = None, map_location="cpu") -> nn.Module:
    """A trained network from a bundle checkpoint (``{"model": weights, "spec": build args}``).

    With ``network`` given, its weights are replaced (a plain state-dict file is accepted then).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(path, "checkpoint not found: train first (python -m monai.bundle run training ...) or pass --checkpoint")
    state = torch.load(path, map_location=map_location, weights_only=True)
    weights = state.get("model", state) if isinstance(state, Mapping) else state
    if network is None:
        if not isinstance(state, Mapping) or "spec" not in state:
            raise InputError(path, "checkpoint has no 'spec' (network description): pass the network to load it into")
        network = build_network(**state["spec"])
    _unwrap(network).load_state_dict(weights)
    return network


# ===================================================================================== training
class LesionBatch(PrepareBatch):
    """Batch -> ``(image, {"label", "attributes"}, (label,), {})``.

    The label also travels as an inferer argument: the click simulator needs the ground truth.
    """

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking)
        targets = {"label": label, "attributes": batchdata["attr_target"].to(device=device, non_blocking=non_blocking)}
        return image, targets, (label,), {}


class ClickSet:
    """The clicks of each sample of a batch, in ROI voxel coordinates, grown round by round.

    ``spacing``: the ROI's voxel size (mm), so "most interior" is measured in mm on anisotropic grids.
    """

    def __init__(self, batch_size: int, spacing: Sequence[float] | None = None):
        self.points: list[list[tuple[int, ...]]] = [[] for _ in range(batch_size)]
        self.labels: list[list[int]] = [[] for _ in range(batch_size)]
        self.spacing = spacing

    def add(self, b: int, click: tuple[tuple[int, ...], int] | None) -> None:
        if click is not None:
            self.points[b].append(click[0])
            self.labels[b].append(int(click[1]))

    def add_next(self, gt: np.ndarray, pred: np.ndarray | None, rng, jitter: float) -> None:
        """One click per sample: the first positive one inside the lesion for samples with no click yet,
        else a correction in the larger error region (FN -> positive, FP -> negative, eq. 4)."""
        for b in range(len(self.points)):
            first = not self.labels[b] or pred is None
            self.add(b, sample_click(gt[b], None if first else pred[b], rng=rng, jitter=jitter, spacing=self.spacing))

    def counts(self) -> list[int]:
        return [len(lab) for lab in self.labels]

    def tensors(self, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Padded ``(B, N, 3)`` points and ``(B, N)`` labels (padding -1), or (None, None) for no click."""
        n = max(self.counts(), default=0)
        if n == 0:
            return None, None
        pts = torch.zeros((len(self.points), n, 3), dtype=torch.float32)
        labels = torch.full((len(self.points), n), PAD_LABEL, dtype=torch.long)
        for b, (p, lab) in enumerate(zip(self.points, self.labels)):
            if p:
                pts[b, : len(p)] = torch.tensor(p, dtype=torch.float32)
                labels[b, : len(lab)] = torch.tensor(lab)
        return pts.to(device), labels.to(device)


class SimulatedClicksInferer(Inferer):
    """Expert-click simulation (seed 001, Sec. 2.3) as a MONAI inferer, for trainer and evaluator.

    Training (``train=True``), per batch: each sample gets its first click inside the lesion, except
    with probability ``prompt_dropout`` (no click: the model must also work without a person).
    Then ``r ~ U{0..max_rounds}`` correction rounds run WITHOUT gradient, the image encoded once:
    decode, compare the prediction with the ground truth, add a click from the larger error region
    (false negatives -> positive, false positives -> negative; ``jitter`` randomises where inside it),
    and feed the prediction back as the dense mask prompt. A no-click sample receives its first
    (positive) click in the first round, so a first click is never negative. The last state (clicks
    + previous mask) goes through ``network(...)`` WITH gradient; the trainer takes the loss there.
    Sampling the number of rounds (as RITM's iterative training) trains every click count, keeps one
    backward graph per step, and keeps the forward a real ``network(...)`` call, so
    DistributedDataParallel synchronises gradients.

    Evaluation (``train=False``): deterministic ``n_clicks`` (first click at the lesion's most interior
    voxel, then corrections), no dropout. Baselines (no ``decode``) are simply called on the image.
    """

    def __init__(self, train: bool = True, max_rounds: int = 4, prompt_dropout: float = 0.2, jitter: float = 0.5,
                 n_clicks: int = 3, seed: int = 0):
        super().__init__()
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.train, self.max_rounds, self.prompt_dropout = train, int(max_rounds), float(prompt_dropout)
        self.jitter = float(jitter) if train else 0.0
        self.n_clicks = int(n_clicks)
        self.rng = np.random.default_rng(seed)

    def __call__(self, inputs: torch.Tensor, network, label: torch.Tensor | None = None, *args, **kwargs) -> dict:
        if not is_interactive(network):
            return network(inputs)
        if label is None:
            raise ValueError("the click simulator needs the ground-truth label (pass it as the inferer's argument)")
        net = _unwrap(network)
        gt = (label[:, 0] > 0.5).cpu().numpy()
        b = inputs.shape[0]
        clicks = ClickSet(b, _spacing(net))
        if self.train:
            keep = self.rng.random(b) >= self.prompt_dropout
            rounds = int(self.rng.integers(0, self.max_rounds + 1))
        else:
            keep, rounds = np.ones(b, dtype=bool), max(self.n_clicks - 1, 0)
        for i in np.flatnonzero(keep):
            clicks.add(i, sample_click(gt[i], rng=self.rng, jitter=self.jitter, spacing=clicks.spacing))
        prev = None
        if rounds:
            with torch.no_grad():
                embedding = net.encode_image(inputs)
                for _ in range(rounds):
                    out = net.decode(embedding, *clicks.tensors(inputs.device), mask_prompt=prev)
                    prev = out["low_res_logits"]
                    clicks.add_next(gt, (out["mask_logits"][:, 0] > 0).cpu().numpy(), self.rng, self.jitter)
        outputs = network(inputs, *clicks.tensors(inputs.device), mask_prompt=prev)
        outputs["n_clicks"] = torch.tensor(clicks.counts())
        return outputs


class LesionReportObjective(nn.Module):
    """The engine's ``loss(pred, targets)``: seed 001's L_seg + λ·L_attr (:class:`LesionReportLoss`) for
    the interactive model and the U-Net; attribute cross-entropy alone for the CNN attribute baseline.

    The last loss components are kept on ``self.last`` (floats) for logging.
    """

    def __init__(self, loss: LesionReportLoss | None = None, **loss_kwargs: Any):
        super().__init__()
        self.loss = loss if loss is not None else LesionReportLoss(ignore_index=IGNORE_INDEX, **loss_kwargs)
        self.last: dict[str, float] = {}

    def forward(self, pred: Mapping, targets: Mapping) -> torch.Tensor:
        attrs = targets.get("attributes")
        if "mask_logits" in pred:
            total, parts = self.loss(pred, targets["label"], attrs)
        else:
            total, parts = _attribute_ce(pred["attr_logits"], attrs)
        self.last = {k: float(v) for k, v in parts.items()}
        return total


def _attribute_ce(logits: Mapping[str, torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Sum over groups of categorical CE (eq. 6); groups with no annotated sample are skipped."""
    total = next(iter(logits.values())).new_zeros(())
    parts = {}
    for i, group in enumerate(ATTRIBUTE_NAMES):
        y = targets[:, i].long()
        if bool((y != IGNORE_INDEX).any()):
            ce = F.cross_entropy(logits[group], y, ignore_index=IGNORE_INDEX)
            parts[f"attr/{group}"] = ce.detach()
            total = total + ce
    parts["attr"] = total.detach()
    return total, parts


def engine_loss(output: Mapping) -> float:
    """The trainer's loss for StatsHandler/TensorBoard (``from_engine`` yields a tuple for a dict output)."""
    return float(output["loss"])


def engine_output(output: Mapping) -> tuple[dict, dict]:
    """Engine output (not decollated) -> ``(pred, targets)`` for :class:`LesionReportScore`."""
    return output["pred"], output["label"]


class LesionReportScore(Metric):
    """Validation score for checkpoint selection: mean of lesion Dice and average attribute accuracy.

    Selecting on Dice alone would keep a model whose attribute head has collapsed (and vice versa);
    a task a model does not have (U-Net: attributes; CNN: masks) is left out of the mean. Kept as
    sums, so ignite all-reduces them across ranks in distributed validation.
    """

    @reinit__is_reduced
    def reset(self):
        self._dice_sum = torch.zeros((), dtype=torch.float64)
        self._n_dice = torch.zeros((), dtype=torch.float64)
        self._correct = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)
        self._labelled = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)

    @reinit__is_reduced
    def update(self, output):
        pred, targets = output
        if "mask_logits" in pred:
            p = (pred["mask_logits"][:, :1] > 0).cpu().numpy()
            g = (targets["label"] > 0.5).cpu().numpy()
            self._dice_sum += sum(dice_score(p[i, 0], g[i, 0]) for i in range(len(p)))
            self._n_dice += len(p)
        if "attr_logits" in pred:
            true = targets["attributes"].cpu()
            for i, group in enumerate(ATTRIBUTE_NAMES):
                known = true[:, i] != IGNORE_INDEX
                hit = pred["attr_logits"][group].argmax(-1).cpu() == true[:, i]
                self._correct[i] += float((hit & known).sum())
                self._labelled[i] += float(known.sum())

    @sync_all_reduce("_dice_sum", "_n_dice", "_correct", "_labelled")
    def compute(self):
        parts = []
        if self._n_dice > 0:
            parts.append(float(self._dice_sum / self._n_dice))
        labelled = self._labelled > 0
        if labelled.any():  # mean over the groups that have labels, as attribute_accuracy's average
            parts.append(float((self._correct[labelled] / self._labelled[labelled]).mean()))
        return float(np.mean(parts)) if parts else 0.0


# ======================================================================================= geometry
def _as_affine(affine) -> np.ndarray:
    return np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)


def map_points(points: np.ndarray, src_affine, dst_affine) -> np.ndarray:
    """(N, 3) voxel coordinates of one grid -> voxel coordinates of another, through world (RAS mm)."""
    pts = np.c_[np.asarray(points, dtype=np.float64).reshape(-1, 3), np.ones(len(np.asarray(points).reshape(-1, 3)))]
    return (np.linalg.inv(_as_affine(dst_affine)) @ _as_affine(src_affine) @ pts.T).T[:, :3]


def roi_to_original(roi_prob: torch.Tensor | np.ndarray, roi_affine, orig_affine, orig_shape: Sequence[int]) -> np.ndarray:
    """A ROI map (D, H, W) back on the original grid (zeros outside the ROI), float32.

    Equivalent to ``paste_back`` into the resampled volume followed by inverting the orientation
    and resampling (checked against MONAI's ``Compose.inverse`` in the tests), but restricted to the
    ROI's footprint on the original grid: a click then costs O(ROI) instead of resampling the whole
    volume, which is what keeps a new click fast on a 512×512×300 scan. Bilinear, so threshold the
    result (probabilities) rather than a hard mask.
    """
    roi = torch.as_tensor(np.asarray(roi_prob, dtype=np.float32) if not isinstance(roi_prob, torch.Tensor) else roi_prob)
    roi = roi.detach().float().cpu()
    orig_affine, roi_affine = _as_affine(orig_affine), _as_affine(roi_affine)
    shape = np.asarray(orig_shape, dtype=int)
    r = np.asarray(roi.shape)
    corners = np.array([[a, b, c] for a in (-0.5, r[0] - 0.5) for b in (-0.5, r[1] - 0.5) for c in (-0.5, r[2] - 0.5)])
    ijk = map_points(corners, roi_affine, orig_affine)
    lo = np.clip(np.floor(ijk.min(0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, 0, shape)
    out = np.zeros(tuple(shape), dtype=np.float32)
    if np.any(hi <= lo):
        return out
    sub_affine = orig_affine.copy()
    sub_affine[:3, 3] = (orig_affine @ np.r_[lo, 1.0])[:3]
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros")(
        MetaTensor(roi[None], affine=torch.as_tensor(roi_affine)),
        dst_affine=torch.as_tensor(sub_affine),
        spatial_size=tuple(int(n) for n in hi - lo),
    )
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = np.asarray(resampled[0].detach().cpu(), dtype=np.float32)
    return out


def auto_roi_center(ct_hu: np.ndarray, lung: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Where to put the ROI when nobody clicked: ``(IJK centre on the input grid, how it was found)``.

    A coarse chest heuristic: inside the (hole-filled) lung mask less a 2-voxel rim (partial volume
    with the chest wall), voxels denser than ``LESION_DENSITY_HU`` (-500 HU) after a morphological
    opening (drops vessels and fissures) are lesion candidates; the ROI goes to the centre of the
    largest candidate component. Without one, to the centre of the lungs' bounding box; without
    lungs (not a chest scan), to the image centre. ``lung``: a lung mask or label of ``ct_hu`` already
    made (any non-zero is lung); by default thresholded from the CT.
    """
    ct = np.asarray(ct_hu)
    lung = lung_mask_from_ct(ct) if lung is None else np.asarray(lung) > 0
    if lung.any():
        core = ndimage.binary_erosion(lung, iterations=2)
        candidates = ndimage.binary_opening(core & (ct > LESION_DENSITY_HU), iterations=1)
        components, n = ndimage.label(candidates, structure=_FULL_3D)
        if n:
            largest = components == int(np.argmax(np.bincount(components.ravel())[1:])) + 1
            idx = np.argwhere(largest)
            return (idx.min(0) + idx.max(0)) / 2.0, "largest lesion-density component in the lungs"
        idx = np.argwhere(lung)
        return (idx.min(0) + idx.max(0)) / 2.0, "centre of the lungs (no lesion-density component)"
    return (np.asarray(ct.shape) - 1) / 2.0, "image centre (no lungs found)"


def interior_voxel(mask: np.ndarray, near: Sequence[float] | None = None) -> tuple[int, int, int] | None:
    """A voxel well inside the predicted lesion: the most interior voxel of the component containing
    ``near`` (or, when ``near`` is in none, of the largest component); None for an empty mask."""
    components, n = ndimage.label(mask, structure=_FULL_3D)
    if n == 0:
        return None
    comp = 0
    if near is not None:
        idx = tuple(int(round(float(v))) for v in near)
        if all(0 <= i < s for i, s in zip(idx, mask.shape)):
            comp = int(components[idx])
    if comp == 0:
        comp = int(np.argmax(np.bincount(components.ravel())[1:])) + 1
    region = components == comp
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    dist = interior_distance(region[box])
    local = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return tuple(int(s.start + i) for s, i in zip(box, local))


# ====================================================================================== inference
def attribute_probabilities(attr_logits: Mapping[str, torch.Tensor], index: int = 0) -> dict[str, dict]:
    """``{group: {"label", "prob", "probs": {class: p}}}`` of one batch item (softmax per group)."""
    out = {}
    for group in ATTRIBUTE_NAMES:
        p = torch.softmax(attr_logits[group][index].float(), -1).cpu().numpy()
        names = ATTRIBUTE_GROUPS[group]
        best = int(np.argmax(p))
        out[group] = {"label": names[best], "prob": round(float(p[best]), 4),
                      "probs": {n: round(float(v), 4) for n, v in zip(names, p)}}
    return out


def attributes_sentence(attributes: Mapping[str, Mapping] | None) -> str:
    """The structured report (Table 1 template) as one line: "Shape: irregular. Invasion: ..."."""
    if not attributes:
        return "No lesion segmented."
    return " ".join(f"{g.capitalize()}: {attributes[g]['label']}." for g in ATTRIBUTE_NAMES if g in attributes)


class InteractiveSession:
    """One radiologist and one image: ``set_image`` once, then ``click`` as often as wanted.

    This is what MONAI Label (or any viewer) calls. The first click must be positive (it says "this
    lesion") and places the ROI, centred on it; the ROI is encoded once and its embedding cached, so
    every later click only reruns the prompt side (``decode``) with all clicks so far and the previous
    mask as the dense prompt. Later clicks outside the ROI cannot change it: they are ignored with a
    warning (listed in ``extras["ignored_clicks"]``); ``reset()`` starts over on the same image.
    :meth:`auto` runs with no click (ROI from :func:`auto_roi_center`); a later first click re-centres.

    Clicks are IJK voxel indices of the image given to ``set_image`` (what 3D Slicer/OHIF send), or
    world RAS mm with ``world=True``. A click outside the image raises :class:`InputError` naming the
    point and the image shape; a negative first click raises it too.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", threshold: float = 0.5):
        net = _unwrap(network)
        if not is_interactive(net):
            raise TypeError(f"{type(net).__name__} takes no clicks; use LesionReportPredictor for baselines")
        spec = getattr(net, "spec", {})
        self.network = net.to(device).eval()
        self.device = torch.device(device)
        self.threshold = threshold
        self.roi_size = tuple(int(s) for s in net.img_size)
        self.volume_tf = volume_transforms(spec.get("spacing", (1.5, 1.5, 2.5)), spec.get("window", "lung"), spec.get("axcodes", "RAS"), keys=("image",))
        self.n_encodes = 0  # how often the image encoder ran (the cache is what makes clicks cheap)
        self._ct: np.ndarray | None = None

    # ------------------------------------------------------------------------------- image
    def set_image(self, ct: np.ndarray, affine: np.ndarray, source: str | None = None) -> None:
        """A 3D CT in HU (input voxel order) and its voxel -> RAS affine; resampled and windowed once."""
        ct = np.asarray(ct, dtype=np.float32)
        if ct.ndim != 3:
            raise InputError(source, f"expected a 3D CT, got shape {ct.shape}")
        self._ct, self.source = ct, source
        self.orig_affine, self.shape = _as_affine(affine), tuple(ct.shape)
        self._volume = self.volume_tf({"image": MetaTensor(torch.from_numpy(ct[None]), affine=torch.as_tensor(self.orig_affine))})["image"]
        self.reset()

    def reset(self) -> None:
        """Forget clicks, ROI and cached embedding (keeps the pre-processed image)."""
        self.clicks: list[tuple[np.ndarray, int]] = []  # (original IJK, label)
        self.ignored: list[dict] = []
        self._roi_points: list[np.ndarray] = []
        self._embedding = self._prev_logits = None
        self._roi_affine = None
        self._last: Prediction | None = None
        self.roi_center_source: str | None = None

    # ------------------------------------------------------------------------------ clicks
    def click(self, point: Sequence[float], positive: bool = True, world: bool = False) -> Prediction:
        """Add one click and return the updated mask (input grid) and attributes."""
        self._require_image()
        ijk = self._check_point(point, world)
        if not self.clicks and not positive:
            raise InputError(self.source, f"the first click must be positive (on the lesion); got a negative click at {ijk.tolist()}")
        if not self.clicks:  # the first click (re)places the ROI, centred on it
            self._place_roi(map_points(ijk, self.orig_affine, self._volume.affine)[0], "first click")
        roi_pt = map_points(ijk, self.orig_affine, self._roi_affine)[0]
        if np.any(roi_pt < -0.5) or np.any(roi_pt > np.asarray(self.roi_size) - 0.5):
            log.warning("click %s lies outside the current ROI: ignored (reset() to start a new ROI)", ijk.tolist())
            self.ignored.append({"ijk": ijk.tolist(), "label": int(positive), "reason": "outside the ROI"})
            self._last.extras["ignored_clicks"] = list(self.ignored)
            return self._last  # nothing changed
        self.clicks.append((ijk, int(positive)))
        self._roi_points.append(roi_pt)
        return self._predict()

    def auto(self, lung: np.ndarray | None = None) -> Prediction:
        """Zero clicks: ROI from :func:`auto_roi_center` (``lung``: the image's lung mask, if made
        already), the model alone (trained with prompt dropout)."""
        self._require_image()
        self.reset()
        center, source = auto_roi_center(self._ct, lung)
        self._place_roi(map_points(center, self.orig_affine, self._volume.affine)[0], f"auto: {source}")
        return self._predict()

    def _require_image(self) -> None:
        if self._ct is None:
            raise RuntimeError("call set_image(ct, affine) first")

    def _check_point(self, point: Sequence[float], world: bool) -> np.ndarray:
        p = np.asarray(point, dtype=np.float64).reshape(-1)
        if p.size != 3 or not np.all(np.isfinite(p)):
            raise InputError(self.source, f"a click is 3 finite coordinates, got {list(np.asarray(point).reshape(-1))}")
        ijk = map_points(p, np.eye(4), self.orig_affine)[0] if world else p
        idx = np.rint(ijk)
        if np.any(idx < 0) or np.any(idx >= np.asarray(self.shape)):
            what = f"world point {p.tolist()} (voxel {np.round(ijk, 1).tolist()})" if world else f"point {p.tolist()}"
            raise InputError(self.source, f"click {what} lies outside the image of shape {self.shape}")
        return ijk

    def _place_roi(self, center_vox: np.ndarray, source: str) -> None:
        cropper = CropLargestLesion(self.roi_size)
        roi = cropper(self._volume, center=np.rint(center_vox))
        self._roi_affine = _as_affine(roi.affine)
        with torch.inference_mode():
            self._embedding = self.network.encode_image(roi.as_tensor()[None].float().to(self.device))
        self.n_encodes += 1
        self._prev_logits = None
        self.roi_center_source = source

    @torch.inference_mode()
    def _predict(self) -> Prediction:
        pts = labels = None
        if self._roi_points:
            pts = torch.tensor(np.stack(self._roi_points), dtype=torch.float32, device=self.device)[None]
            labels = torch.tensor([lab for _, lab in self.clicks], dtype=torch.long, device=self.device)[None]
        out = self.network.decode(self._embedding, pts, labels, mask_prompt=self._prev_logits)
        self._prev_logits = out["low_res_logits"]
        prob = torch.sigmoid(out["mask_logits"][0, 0].float())
        mask = (roi_to_original(prob, self._roi_affine, self.orig_affine, self.shape) > self.threshold).astype(np.uint8)
        attrs = attribute_probabilities(out["attr_logits"])
        near = self.clicks[0][0] if self.clicks else map_points((np.asarray(self.roi_size) - 1) / 2, self._roi_affine, self.orig_affine)[0]
        anchor = interior_voxel(mask > 0, near)
        lesions = [] if anchor is None else [LesionAttributes(voxel=anchor, attributes=attrs)]
        self._last = Prediction(
            mask=mask,
            case_finding=attributes_sentence(attrs if anchor is not None else None),
            lesion_attributes=lesions,
            extras={
                "clicks": [{"ijk": [round(float(v), 2) for v in p], "label": lab} for p, lab in self.clicks],
                "ignored_clicks": list(self.ignored),
                "roi_center_source": self.roi_center_source,
                "iou_pred": round(float(out["iou_pred"][0, 0]), 4),
                "attributes": attrs,
            },
        )
        return self._last


class LesionReportPredictor:
    """The batch ``Predictor`` (segreport.inference.predictor) for the 3D lesion-report bundle.

    With clicks, they are replayed in order through an :class:`InteractiveSession` (each decode sees
    the previous mask, as in training); without, the zero-click ROI is used (:meth:`InteractiveSession.auto`).
    Baseline networks (U-Net / CNN) run once on the automatically placed ROI.
    """

    name = "lesion_report_3d"

    def __init__(self, network: nn.Module | None = None, checkpoint: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", threshold: float = 0.5):
        if network is None and checkpoint is None:
            raise ValueError("give a network or a checkpoint")
        self.device = torch.device(device)
        net = load_trained(checkpoint, network, map_location="cpu") if checkpoint else network
        self.network = _unwrap(net).to(self.device).eval()
        self.threshold = threshold

    def session(self) -> InteractiveSession:
        return InteractiveSession(self.network, self.device, self.threshold)

    def predict(self, image: np.ndarray, affine: np.ndarray, points=None, point_labels=None, lung=None) -> Prediction:
        if not is_interactive(self.network):
            return self._predict_baseline(image, affine, lung)
        session = self.session()
        session.set_image(image, affine)
        if points is None or len(points) == 0:
            return session.auto(lung)
        labels = [1] * len(points) if point_labels is None else list(point_labels)
        if len(labels) != len(points):
            raise InputError(None, f"{len(points)} points but {len(labels)} point labels")
        prediction = None
        for point, lab in zip(points, labels):
            prediction = session.click(point, positive=bool(lab))
        return prediction

    @torch.inference_mode()
    def _predict_baseline(self, image: np.ndarray, affine: np.ndarray, lung: np.ndarray | None = None) -> Prediction:
        spec = self.network.spec
        ct = np.asarray(image, dtype=np.float32)
        volume = volume_transforms(spec["spacing"], spec["window"], spec["axcodes"], keys=("image",))(
            {"image": MetaTensor(torch.from_numpy(ct[None]), affine=torch.as_tensor(_as_affine(affine)))})["image"]
        center, source = auto_roi_center(ct, lung)
        roi = CropLargestLesion(spec["roi_size"])(volume, center=np.rint(map_points(center, affine, volume.affine)[0]))
        out = self.network(roi.as_tensor()[None].float().to(self.device))
        mask = np.zeros(ct.shape, dtype=np.uint8)
        if "mask_logits" in out:
            prob = torch.sigmoid(out["mask_logits"][0, 0].float())
            mask = (roi_to_original(prob, roi.affine, affine, ct.shape) > self.threshold).astype(np.uint8)
        lesions, finding = [], "No lesion segmented."
        if "attr_logits" in out:  # the CNN has no mask: anchor its attributes at the ROI centre
            attrs = attribute_probabilities(out["attr_logits"])
            lesions, finding = [LesionAttributes(voxel=tuple(int(round(v)) for v in center), attributes=attrs)], attributes_sentence(attrs)
        return Prediction(mask=mask, case_finding=finding, lesion_attributes=lesions,
                          extras={"roi_center_source": f"auto: {source}", "model": spec["model"]})


# ===================================================================================== evaluation
@torch.inference_mode()
def evaluate(
    network: nn.Module | None,
    datalists: Mapping[str, list],
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    splits: Sequence[str] = ("test", "zeroshot"),
    max_clicks: int = 10,
    report_clicks: int = 1,
    noc_thresholds: Sequence[float] = (0.80, 0.85, 0.90),
    device: str | torch.device = "cpu",
    n_panels: int = 4,
) -> dict:
    """Seed 001's evaluation -> ``metrics.json``, ``per_case.csv``, ``dice_vs_clicks.png``, ``panels/``.

    Protocol per case (the paper's pre-processing: ROI around the largest lesion of the label):
    clicks are simulated as in training but deterministically (first at the lesion's most interior
    voxel, then corrections at the most interior voxel of the larger error region), up to
    ``max_clicks``; Dice in the ROI after 0..``max_clicks`` clicks gives the curve and the number of
    clicks to reach each threshold (NoC; ``max_clicks`` when never reached, the usual convention).
    DSC and HD95 (mm) are measured on the ORIGINAL grid against the whole target lesion, after
    ``report_clicks`` clicks (default 1: the minimal interaction; baselines have no clicks), so a
    lesion larger than the ROI costs Dice; ``dice_roi`` is the same prediction scored inside the ROI.
    The attribute accuracy per group and its average come from the same prediction. ``splits`` absent from
    ``datalists`` (no ``zeroshot`` without a hold-out) are skipped.
    """
    if checkpoint:
        network = load_trained(checkpoint, network, map_location="cpu")
    net = _unwrap(network).to(device).eval()
    spec = net.spec
    interactive = is_interactive(net)
    out = Path(output_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    loader = load_transforms()
    spatial = spatial_transforms(spec["roi_size"], spec["spacing"], spec["window"], spec["axcodes"])
    metrics: dict[str, Any] = {
        "model": spec["model"], "report_clicks": report_clicks if interactive else 0, "max_clicks": max_clicks,
        "spec": spec, "skipped_cases": list(datalists.get("skipped", [])),
    }  # fmt: skip
    rows, curves, panels_left = [], {}, n_panels
    for split in splits:
        items = datalists.get(split) or []
        if not items:
            continue
        seg_rows, attr_pred, attr_true, per_click = [], {g: [] for g in ATTRIBUTE_NAMES}, [], []
        attr_acc_click: list[list[np.ndarray]] = []
        for item in tqdm(items, desc=f"evaluate {split}", leave=False):
            loaded = loader(dict(item))
            orig_affine = _as_affine(loaded["image"].affine)
            orig_shape = tuple(loaded["image"].shape[1:])
            target_orig = np.asarray(loaded["label"][0]) > 0.5
            d = spatial(loaded)
            image = d["image"].as_tensor()[None].float().to(device)
            gt_roi = np.asarray(d["label"][0]) > 0.5
            row = {"split": split, "case_id": item.get("case_id"), "lesion_id": d["lesion_id"],
                   "lesion_type": item.get("lesion_type"), "lesion_voxels": int(target_orig.sum())}
            if interactive:
                traj = _click_trajectory(net, image, gt_roi, max_clicks)
                dices = [t["dice"] for t in traj]
                per_click.append(dices)
                attr_acc_click.append(np.array([[int(t["attr"][g]) for g in ATTRIBUTE_NAMES] for t in traj]))
                chosen = traj[min(report_clicks, len(traj) - 1)]
                row.update({f"dice_roi_{k}": round(v, 4) for k, v in enumerate(dices)})
                for thr in noc_thresholds:
                    row[f"noc_{round(thr * 100)}"] = next((k for k in range(1, len(dices)) if dices[k] >= thr), max_clicks)
            else:
                chosen = _single_prediction(net, image, gt_roi)
            if chosen.get("prob") is not None:
                pred_orig = roi_to_original(chosen["prob"], d["image"].affine, orig_affine, orig_shape) > 0.5
                row["dice"] = round(dice_score(pred_orig, target_orig), 4)
                row["hd95_mm"] = round(hd95(pred_orig, target_orig, spacing_from_affine(orig_affine)), 3)
                row["dice_roi"] = round(chosen["dice"], 4)  # inside the ROI: what any ROI model can reach
                seg_rows.append(row)
                if panels_left > 0:
                    _save_panel(out / "panels" / f"{split}_{row['case_id']}_lesion{row['lesion_id']}.png", d["image"][0], gt_roi,
                                traj if interactive else [chosen], row)
                    panels_left -= 1
            if chosen.get("attr") is not None:
                true = d["attr_target"].numpy()
                attr_true.append(true)
                for i, g in enumerate(ATTRIBUTE_NAMES):
                    attr_pred[g].append(int(chosen["attr"][g]))
                    row[f"{g}_true"] = ATTRIBUTE_GROUPS[g][true[i]] if true[i] != IGNORE_INDEX else ""
                    row[f"{g}_pred"] = ATTRIBUTE_GROUPS[g][int(chosen["attr"][g])]
            rows.append(row)
        metrics[split] = {"n_items": len(items), "n_cases": len({it.get("case_id") for it in items}),  # items = lesions
                          **_split_metrics(seg_rows, attr_pred, attr_true, per_click, attr_acc_click, noc_thresholds, max_clicks)}
        if per_click:
            curves[split] = metrics[split]["dice_per_click"]
    if not any(s in metrics for s in splits):
        raise InputError(None, f"nothing to evaluate: no case in splits {list(splits)}")
    if curves:
        _plot_curve(curves, out / "dice_vs_clicks.png", spec)
    _write_csv(out / "per_case.csv", rows)
    _write_json(out / "metrics.json", metrics)
    log.info("evaluation: %s", {s: {k: v for k, v in metrics[s].items() if isinstance(v, float)} for s in splits if s in metrics})
    return metrics


def _click_trajectory(net: nn.Module, image: torch.Tensor, gt: np.ndarray, max_clicks: int) -> list[dict]:
    """Prediction after 0..max_clicks deterministic simulated clicks (one encode, decode per click)."""
    embedding = net.encode_image(image)
    clicks = ClickSet(1, _spacing(net))
    prev, traj = None, []
    for k in range(max_clicks + 1):
        if k == 1:
            clicks.add(0, sample_click(gt, spacing=clicks.spacing))  # jitter 0: deterministic, the most central
        elif k > 1:
            clicks.add_next(gt[None], (traj[-1]["prob"].numpy() > 0.5)[None], 0, 0.0)
        out = net.decode(embedding, *clicks.tensors(image.device), mask_prompt=prev)
        prev = out["low_res_logits"]
        prob = torch.sigmoid(out["mask_logits"][0, 0].float()).cpu()
        traj.append({"prob": prob, "dice": dice_score(prob.numpy() > 0.5, gt),
                     "attr": {g: int(out["attr_logits"][g][0].argmax()) for g in ATTRIBUTE_NAMES},
                     "clicks": [(p, lab) for p, lab in zip(clicks.points[0], clicks.labels[0])]})
    return traj


def _single_prediction(net: nn.Module, image: torch.Tensor, gt: np.ndarray) -> dict:
    out = net(image)
    res: dict[str, Any] = {"prob": None, "attr": None, "clicks": []}
    if "mask_logits" in out:
        res["prob"] = torch.sigmoid(out["mask_logits"][0, 0].float()).cpu()
        res["dice"] = dice_score(res["prob"].numpy() > 0.5, gt)
    if "attr_logits" in out:
        res["attr"] = {g: int(out["attr_logits"][g][0].argmax()) for g in ATTRIBUTE_NAMES}
    return res


def _split_metrics(seg_rows, attr_pred, attr_true, per_click, attr_acc_click, noc_thresholds, max_clicks) -> dict:
    m: dict[str, Any] = {}
    if seg_rows:
        d = np.array([r["dice"] for r in seg_rows])
        h = np.array([r["hd95_mm"] for r in seg_rows], dtype=float)
        m.update(dice=float(d.mean()), dice_std=float(d.std()), hd95_mm=float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                 dice_roi=float(np.mean([r["dice_roi"] for r in seg_rows])))
    if per_click:
        curve = np.array(per_click).mean(0)
        m["dice_per_click"] = [round(float(v), 4) for v in curve]  # index = number of clicks (0 = none)
        for thr in noc_thresholds:
            key = f"noc_{round(thr * 100)}"
            nocs = [next((k for k in range(1, len(c)) if c[k] >= thr), max_clicks) for c in per_click]
            m[key] = float(np.mean(nocs))
            m[f"reached_{round(thr * 100)}"] = float(np.mean([any(v >= thr for v in c[1:]) for c in per_click]))
    if attr_true:
        true = np.stack(attr_true)
        targets = {g: true[:, i] for i, g in enumerate(ATTRIBUTE_NAMES)}
        acc = attribute_accuracy({g: np.asarray(v) for g, v in attr_pred.items()}, targets)
        m["attribute_accuracy"] = acc["accuracy"]
        m["attribute_accuracy_average"] = acc["average"]
        m["attribute_n"] = acc["n"]
        if attr_acc_click:
            preds = np.stack(attr_acc_click)  # (cases, clicks, groups)
            m["attribute_accuracy_per_click"] = [
                round(attribute_accuracy({g: preds[:, k, i] for i, g in enumerate(ATTRIBUTE_NAMES)}, targets)["average"], 4)
                for k in range(preds.shape[1])
            ]
    return m


def _plot_curve(curves: Mapping[str, Sequence[float]], path: Path, spec: Mapping) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for split, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker="o", label=split)
    ax.set_xlabel("simulated clicks")
    ax.set_ylabel("mean Dice (ROI)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(next(iter(curves.values())))))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Dice vs clicks ({spec['config']}, refinement={spec['point_refinement']}, synergy={spec['synergy']})", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_panel(path: Path, image: torch.Tensor, gt: np.ndarray, traj: list[dict], row: Mapping) -> None:
    """ROI slice through the lesion centre: ground truth (green) and predictions (red) after some clicks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image)
    z = int(np.argmax(gt.sum((0, 1)))) if gt.any() else img.shape[2] // 2
    steps = sorted({1, 3, len(traj) - 1} & set(range(len(traj)))) if len(traj) > 1 else [0]
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.4), squeeze=False)
    for ax, k in zip(axes[0], steps):
        ax.imshow(img[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if gt[:, :, z].any():
            ax.contour(gt[:, :, z].T, levels=[0.5], colors="lime", linewidths=1)
        pred = traj[k]["prob"].numpy()[:, :, z] > 0.5
        if pred.any():
            ax.contour(pred.T, levels=[0.5], colors="red", linewidths=1)
        for p, lab in traj[k]["clicks"]:
            if abs(p[2] - z) <= 1:
                ax.plot(p[0], p[1], "+" if lab else "x", color="yellow" if lab else "cyan", ms=9, mew=2)
        title = f"{k} click(s): Dice {traj[k]['dice']:.2f}" if "dice" in traj[k] else "prediction"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{row['case_id']} lesion {row['lesion_id']} ({row.get('lesion_type')})", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_ablation_table(runs: Mapping[str, str | os.PathLike], output_dir: str | os.PathLike) -> list[dict]:
    """Tables 2 and 3 of the paper from several evaluation outputs -> ``ablation.{json,csv,md}``.

    ``runs``: ``{name: folder}`` where the folder holds ``metrics.json`` (or ``eval/metrics.json``),
    e.g. vanilla / +point refinement / +feature synergy / full, and baselines. One row per (split,
    run): DSC, HD95, attribute accuracy per group and average, Dice at 1 and 5 clicks, NoC@85.
    """
    rows = []
    for name, folder in runs.items():
        folder = Path(folder)
        path = folder / "metrics.json" if (folder / "metrics.json").is_file() else folder / "eval" / "metrics.json"
        if not path.is_file():
            raise InputError(path, f"no metrics.json for ablation run {name!r}: evaluate it first")
        metrics = json.loads(path.read_text())
        for split in ("test", "zeroshot"):
            m = metrics.get(split)
            if not m:
                continue
            curve = m.get("dice_per_click") or []
            row = {"split": split, "method": name, "dsc": m.get("dice"), "hd95_mm": m.get("hd95_mm")}
            row.update({g: (m.get("attribute_accuracy") or {}).get(g) for g in ATTRIBUTE_NAMES})
            row.update(attr_average=m.get("attribute_accuracy_average"),
                       dice_1_click=curve[1] if len(curve) > 1 else None,
                       dice_5_clicks=curve[5] if len(curve) > 5 else None, noc_85=m.get("noc_85"))
            rows.append(row)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "ablation.json", rows)
    _write_csv(out / "ablation.csv", rows)
    cols = list(rows[0]) if rows else []

    def cell(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    tmp = out / "ablation.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "ablation.md")
    return rows


def _write_json(path: Path, obj) -> None:
    def default(x):
        if isinstance(x, np.ndarray):
            return x.tolist()
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        return str(x)

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=default))
    os.replace(tmp, path)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
