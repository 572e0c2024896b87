"""2D slice data shared by the slice models (MedSegText, TMC, LAPFT): datalists, per-slice sentences,
transforms, tokenizer and the validation score.

Volumes are split at CASE level and then sliced in the display orientation inference uses
(:mod:`segreport.transforms.orientation`), so no case has slices in two splits and a slice looks the
same in training and at inference. Each slice gets a sentence in the LViT grammar
(:mod:`segreport.text.findings`), in one of two ways (``text``):

- ``"slice"`` (MedSegText, which writes findings): the slice's own finding, from its mask;
- ``"level"`` (the text-guided models, which read them): the CASE's sentence restricted to the lung
  zones this slice cuts through (:func:`segreport.text.findings.restrict_finding`). That is the
  sentence inference builds from a case-level text, so the model is trained on what it will be given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.transforms import Compose, DeleteItemsd, EnsureChannelFirstd, EnsureTyped, Lambdad, LoadImaged, RandZoomd, Resized

from ..data import readers, splits as splits_mod
from ..data.io import load_pair, load_volume
from ..data.slice_folder import is_slice_folder
from ..errors import InputError
from ..metrics.stats import mean_std
from ..metrics.segtext import SegTextScore  # noqa: F401  (the bundles' key metric)
from ..text.findings import restrict_finding
from ..text.tokenizers import build_word_tokenizer, load_tokenizer
from ..transforms.findings import FindingsFromMask, LungZonesFromTextd
from ..transforms.intensity import HUWindow
from ..transforms.lung_mask import lung_label_from_ct
from ..transforms.lung_regions import lung_zone_map, slice_levels
from ..transforms.orientation import display_to_file_index, to_display
from ..transforms.slicing import VolumeToSlicesd, axial_axis
from ..transforms.text import TokenizeTextd
from ..vocab import ZONES
from .slice_sentences import slice_folder_datalists

log = logging.getLogger("segreport.slices2d")

SPLIT_FOLDERS = {"training": "Train", "validation": "Val", "test": "Test"}


# ----------------------------------------------------------------------------------------- data
def _lvit_root(dataset_dir: Path) -> Path:
    return dataset_dir / "slices2d" if (dataset_dir / "slices2d").is_dir() else dataset_dir


def load_datalists(
    dataset_dir: str | os.PathLike,
    data_format: str = "auto",
    ratios: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    slice_mode: str = "mix",
    text: str = "slice",
    keep_zones: bool = False,
    orientation: str = "radiological",
) -> dict[str, list[dict]]:
    """Training/validation/test items for a 2D model (``mosmeddata``: MosMedData COVID19_1110's studies
    with masks, split by CT-k like ``volumes``; ``slices``: a folder of PNG slices with ``ct/``,
    ``infection/``, ``lungs/`` and ``cases.csv``, split at case level by infection burden, each slice's
    sentence from its masks, :mod:`.slice_sentences`, with ``orientation`` its display convention).

    ``data_format``: ``auto`` (:func:`_detect_format`), ``lvit`` (MosMedData+/QaTa LViT layout, or the phantom's ``slices2d`` export: the
    split is the folders'), ``volumes`` (NIfTI volumes from an MSD ``dataset.json`` or ``imagesTr``/
    ``labelsTr`` folders, split at CASE level and then sliced, so no case has slices in two splits),
    ``slices`` (above). ``text`` and ``keep_zones``: see
    :func:`volume_to_slice_items` (LViT slices keep their own sentences and have no zone map).
    """
    root = Path(dataset_dir)
    if data_format == "auto":
        data_format = _detect_format(root, text)
    if data_format == "slices":  # a slice's own finding is its sentence for every model (text="slice" or "level")
        return _usable(slice_folder_datalists(root, ratios, seed, orientation, keep_zones), root)
    if data_format == "lvit":
        lroot = _lvit_root(root)
        return _usable({key: readers.read_lvit(lroot, split=folder) for key, folder in SPLIT_FOLDERS.items()}, root)
    if data_format not in ("volumes", "mosmeddata"):
        raise InputError(root, f"unknown data_format {data_format!r}: use 'auto', 'slices', 'lvit', 'volumes' or 'mosmeddata'")
    if data_format == "mosmeddata":  # COVID19_1110: the studies with a lesion mask, stratified by CT-k
        cases = readers.read_mosmeddata(root, only_masked=True)
    elif (root / "dataset.json").is_file():
        cases = readers.read_msd(root / "dataset.json")
    else:
        cases = readers.read_nifti_folder(root / "imagesTr", root / "labelsTr")
    case_splits = splits_mod.split_cases(cases, ratios=ratios, seed=seed, stratify_by="severity" if "severity" in cases[0] else None)
    by_id = {c["case_id"]: c for c in cases}
    return _usable({
        key: [s for cid in case_splits.get(key, []) for s in volume_to_slice_items(by_id[cid], mode=slice_mode, seed=seed, text=text,
                                                                          keep_zones=keep_zones)]
        for key in SPLIT_FOLDERS
    }, root)


def _usable(datalists: dict[str, list[dict]], root: Path) -> dict[str, list[dict]]:
    """No training slices is an error naming the dataset and the split sizes; no validation slices (a
    handful of cases) validates on the training slices, with a warning, as the 3D bundle does."""
    sizes = {k: f"{len(v)} slice(s) of {len({it.get('case_id') for it in v})} case(s)" for k, v in datalists.items()}
    if not datalists.get("training"):
        raise InputError(root, f"no training slices after the split ({sizes}): too few cases for split_ratios, "
                               "or add cases")
    if not datalists.get("validation"):
        log.warning("%s: no validation slices (%s): validating on the training slices", root, sizes)
        datalists["validation"] = list(datalists["training"])
    return datalists


def _detect_format(root: Path, text: str) -> str:
    """A slice folder, else LViT folders, else MosMedData, else volumes. A model trained on case sentences
    (``text="level"``) takes a folder's volumes over its LViT export (the phantom holds both)."""
    has_volumes = (root / "dataset.json").is_file() or (root / "imagesTr").is_dir()
    if is_slice_folder(root):
        return "slices"
    if any(_lvit_root(root).glob("*_Folder")) and not (text == "level" and has_volumes):
        return "lvit"
    return "mosmeddata" if (root / "studies").is_dir() else "volumes"


def eval_items(datalists: dict[str, list[dict]], split: str = "test") -> list[dict]:
    """The items an evaluation scores: one split, or ``"all"`` (every slice of the folder, e.g. another
    hospital's folder scored with a checkpoint trained elsewhere)."""
    if split == "all":  # each slice once: a split may reuse another's items (validation on training, _usable)
        return list({id(it): it for name in SPLIT_FOLDERS for it in datalists.get(name, [])}.values())
    if split not in datalists:
        raise InputError(None, f"unknown eval_split {split!r}: use 'all' or one of {sorted(datalists)}")
    return datalists[split]


def volume_to_slice_items(case: dict, mode: str = "mix", seed: int = 0, neg_ratio: float = 0.25, text: str = "slice",
                          keep_zones: bool = False) -> list[dict]:
    """Axial 2D items (lung-windowed, in [0, 1]) from one NIfTI case, each with its own finding.

    A slice's sentence comes from its mask and the slice of the volume's six-zone map (from the
    case's lung label, or a lung mask thresholded from the CT), with patient sides from the affine,
    exactly like the LViT annotations. "mix" keeps every lesion slice plus ``neg_ratio`` times as
    many lesion-free ones (seeded), so the model also learns "no infection".

    ``text="level"`` gives each slice the case's sentence restricted to the zones the slice cuts through
    (module docstring). ``keep_zones`` adds ``lesion_zones`` (1×H×W zone codes of the lesion pixels, 0
    elsewhere), which the zone-subset and mirroring augmentations of the text-guided models need.
    """
    if text not in ("slice", "level"):
        raise ValueError(f"text must be 'slice' or 'level', got {text!r}")
    if case.get("label"):  # checked to belong to its image: same grid, integer values
        image, label, affine, _ = load_pair(case["image"], case["label"], allow_empty=True)
        label = (label > 0).astype(np.uint8)
    else:
        image, affine, _ = load_volume(case["image"])
        label = np.zeros(image.shape, np.uint8)
    lung = load_volume(case["lung"])[0].astype(np.uint8) if case.get("lung") else lung_label_from_ct(image, affine)
    windowed = np.asarray(HUWindow(preset="lung")(image[None]))[0]
    if not lung.any():  # FindingsFromMask's documented fallback: sides about the body, levels from its extent
        log.warning("%s: no lung found in the CT and no lung label: slice findings place lesions by the body's extent",
                    case.get("image"))
    # every lesion voxel's zone from the 3D geometry (voxels outside the lung mask: the nearest lung zone),
    # the rule the report's consistency check uses; a slice then always has zones for its lesions
    described = FindingsFromMask().describe(label, lung=lung if lung.any() else None, affine=affine, image=image)
    zones = described.voxel_zones
    # the zones each axial slice cuts through (all six when there is no lung to cut)
    lung_zones = lung_zone_map(lung, affine) if lung.any() else np.full(lung.shape, 1, np.uint8)
    # the display orientation (radiological, transforms.orientation) inference shows the model too
    shown = to_display(np.stack([windowed, label, zones, lung_zones]).astype(np.float32), affine)
    file_index = display_to_file_index(shown, affine, axial_axis(affine))
    arrays = np.asarray(shown.as_tensor())
    volume = {"image": arrays[0:1], "label": arrays[1:2].round(), "zones": arrays[2:3].round(),
              "lung_zones": arrays[3:4].round(), "image_meta_dict": {"affine": np.asarray(shown.affine)},
              "case_id": case["case_id"]}
    case_text = described.text
    findings = FindingsFromMask()
    in_plane = np.eye(3)  # the zone map already carries sides and levels; centroids are not needed here

    def finding(item: dict) -> str:
        if text == "level":
            present = {ZONES[c - 1] for c in np.unique(item["lung_zones"]).astype(int) if c > 0} if lung.any() else set(ZONES)
            return restrict_finding(case_text, present)
        return findings(item["label"][0], affine=in_plane, zone_map=item["zones"][0].astype(np.uint8))

    slicer = VolumeToSlicesd(keys=("image", "label", "zones", "lung_zones"), mode=mode, neg_ratio=neg_ratio, seed=seed,
                             finding_fn=finding, axis=2)
    levels = slice_levels(lung, affine)  # NaN outside the lungs or without them: the "unknown" level
    items = []
    for it in slicer(volume):
        k = int(file_index[it["slice_index"]])
        item = {"image": it["image"].astype(np.float32), "label": it["label"].astype(np.float32), "text": it["text"],
                "case_id": it["case_id"], "slice_index": k, "level": float(levels[k])}
        if keep_zones:
            item["lesion_zones"] = it["zones"].astype(np.uint8)
        items.append(item)
    return items


def build_tokenizer(train_items: list[dict], tokenizer_path: str | None = None):
    """A word-level tokenizer built from the training findings (deterministic: the same texts give the
    same ids), or a local Hugging Face tokenizer folder. It is saved inside every checkpoint's spec."""
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    texts = [it["text"] for it in train_items if it.get("text")]
    if not texts:
        raise InputError(None, "no training texts to build a vocabulary from")
    return build_word_tokenizer(texts)


def intensity_augmentations(prob: float = 0.25) -> list:
    """What another scanner or site changes in a slice, as training transforms on the image in [0, 1]:
    the contrast curve (gamma, a random piecewise-linear histogram curve), window level and width (scale
    and shift), noise, sharpness, and the field of view (zoom 0.8-1.25, the masks with it). Each is drawn
    with ``prob``; the image is clipped back to [0, 1]."""
    from monai.transforms import (RandAdjustContrastd, RandGaussianNoised, RandGaussianSmoothd, RandHistogramShiftd,
                                  RandScaleIntensityd, RandShiftIntensityd)

    return [
        RandZoomd(keys=["image", "label", "lesion_zones"], prob=prob, min_zoom=0.8, max_zoom=1.25, padding_mode="constant",
                  mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True),
        RandAdjustContrastd(keys="image", prob=prob, gamma=(0.6, 1.6)),
        RandHistogramShiftd(keys="image", prob=prob, num_control_points=(5, 10)),
        RandScaleIntensityd(keys="image", prob=prob, factors=0.2),
        RandShiftIntensityd(keys="image", prob=prob, offsets=0.1),
        RandGaussianSmoothd(keys="image", prob=prob / 2, sigma_x=(0.4, 1.0), sigma_y=(0.4, 1.0)),
        RandGaussianNoised(keys="image", prob=prob, std=0.03),
        Lambdad(keys="image", func=lambda x: x.clamp(0.0, 1.0) if isinstance(x, torch.Tensor) else np.clip(x, 0.0, 1.0)),
    ]


def slice_transforms(tokenizer, image_size: int = 224, max_length: int = 50, train: bool = False,
                     augment: Sequence | None = None, zone_labels: bool = False) -> Compose:
    """Loading (PNG paths or in-memory arrays) -> 1×S×S image in [0, 1], binary label, token ids.

    The paper resizes to 224×224, scales to [0, 1] and applies random zoom (10 %, p=0.1) in training.
    ``augment``: further training transforms, run after resizing and before tokenisation (so they may
    rewrite the text: :mod:`segreport.transforms.guided_text`). A ``lesion_zones`` map, when the items
    have one, is resized with the label (nearest). ``zone_labels``: ``zones``, the six-zone multi-hot of
    the final sentence (:class:`~segreport.transforms.findings.LungZonesFromTextd`).
    """
    def to_gray01(x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        if x.shape[0] in (3, 4):  # RGB(A) PNG of a grey CT: average the colour channels
            x = x[:3].mean(0, keepdim=True)
        return x / 255.0 if x.max() > 1.0 else x

    def to_binary(x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return (x[:1] > (127 if x.max() > 1 else 0.5)).float()

    steps = [
        LoadImaged(keys=["image", "label"], image_only=True, allow_missing_keys=True, dtype=np.float32),
        EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel", allow_missing_keys=True),
    ]
    tail = [
        Lambdad(keys="image", func=to_gray01),
        Lambdad(keys="label", func=to_binary),
        Resized(keys=["image", "label", "lesion_zones", "lung_zones"], spatial_size=(image_size, image_size),
                mode=("bilinear", "nearest", "nearest", "nearest"), allow_missing_keys=True),
    ]
    if train:
        tail.append(RandZoomd(keys=["image", "label", "lesion_zones"], prob=0.1, min_zoom=0.9, max_zoom=1.1,
                              mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True))
        tail += list(augment or [])
    if zone_labels:
        tail.append(LungZonesFromTextd(keys="text", output_keys="zones"))
    # lesion_zones: for the augmentations only; lung_zones (slice folders): for the evaluation's checks
    tail += [TokenizeTextd(keys="text", tokenizer=tokenizer, max_length=max_length),
             DeleteItemsd(keys=["lesion_zones", "lung_zones"] if train else "lesion_zones"),
             EnsureTyped(keys=["image", "label"], track_meta=False)]
    return _PathOrArray(Compose(steps), Compose(tail))


class _PathOrArray:
    """Run the loading steps only for items that hold file paths (LViT PNGs), not in-memory slices."""

    def __init__(self, load: Compose, rest: Compose):
        self.load, self.rest = load, rest

    def __call__(self, item: dict) -> dict:
        if isinstance(item.get("image"), (str, os.PathLike)):
            item = self.load(item)
        return self.rest(dict(item))


# ------------------------------------------------------------------------------- evaluation summary
def summarize_slices(rows: list[dict], pooled: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """The ``test`` block every 2D evaluation writes, and one row per case.

    Per slice as the LViT papers compute it (Dice and IoU of each slice, averaged: ``dice_slice_mean``,
    ``miou_slice_mean``); per case as the TMC paper reports it (a case's slices averaged, then the cases:
    ``dice_case_mean``, ``miou_case_mean``), and, with ``pooled`` (SegmentationScores.case_rows by case
    id), Dice over a case's slices pooled into one volume (``dice_pooled_case_mean``).
    """
    by_case: dict[str, list[dict]] = {}
    for row in rows:
        by_case.setdefault(str(row["case_id"]), []).append(row)
    case_rows = []
    for cid, rs in by_case.items():
        case = {"case_id": cid, "n_slices": len(rs), "dice": float(np.mean([r["dice"] for r in rs])),
                "iou": float(np.mean([r["iou"] for r in rs]))}
        if pooled is not None:
            case.update(dice_pooled=pooled[cid]["dice"], iou_pooled=pooled[cid]["iou"])
        case_rows.append(case)

    metrics: dict = {"n_slices": len(rows), "n_cases": len(case_rows)}
    for name, values in (("dice_slice", [r["dice"] for r in rows]), ("miou_slice", [r["iou"] for r in rows]),
                         ("dice_case", [r["dice"] for r in case_rows]), ("miou_case", [r["iou"] for r in case_rows]),
                         ("dice_pooled_case", [r["dice_pooled"] for r in case_rows if "dice_pooled" in r])):
        if values or not name.startswith("dice_pooled"):
            summary = mean_std(values)
            metrics[f"{name}_mean"], metrics[f"{name}_std"] = summary["mean"], summary["std"]
    return metrics, case_rows


# ------------------------------------------------------------------------------- validation score
def engine_output(output):
    """Evaluator output (batch dict, not decollated) -> (pred dict, targets dict) for SegTextScore."""
    return output["pred"], output["label"]
