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
import ignite.distributed as idist
from ignite.metrics import Metric
from monai.transforms import Compose, DeleteItemsd, EnsureChannelFirstd, EnsureTyped, Lambdad, LoadImaged, RandZoomd, Resized

from ..data import readers, splits as splits_mod
from ..data.io import load_volume
from ..errors import InputError
from ..metrics.text import text_metrics
from ..text.findings import restrict_finding
from ..text.tokenizers import build_word_tokenizer, load_tokenizer
from ..transforms.findings import FindingsFromMask, LungZonesFromTextd
from ..transforms.intensity import HUWindow
from ..transforms.lung_mask import lung_mask_from_ct, split_left_right
from ..transforms.lung_regions import lung_zone_map
from ..transforms.orientation import display_to_file_index, to_display
from ..transforms.slicing import VolumeToSlicesd, axial_axis
from ..transforms.text import TokenizeTextd, decode_tokens
from ..vocab import ZONES

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
) -> dict[str, list[dict]]:
    """Training/validation/test items for a 2D model (``mosmeddata``: MosMedData COVID19_1110's studies
    with masks, split by CT-k like ``volumes``).

    ``data_format``: ``lvit`` (MosMedData+/QaTa LViT layout, or the phantom's ``slices2d`` export: the
    split is the folders'), ``volumes`` (NIfTI volumes from an MSD ``dataset.json`` or ``imagesTr``/
    ``labelsTr`` folders, split at CASE level and then sliced, so no case has slices in two splits),
    or ``auto`` (LViT folders when present, else volumes). ``text`` and ``keep_zones``: see
    :func:`volume_to_slice_items` (LViT slices keep their own sentences and have no zone map).
    """
    root = Path(dataset_dir)
    if data_format == "auto":
        data_format = "lvit" if any(_lvit_root(root).glob("*_Folder")) else (
            "mosmeddata" if (root / "studies").is_dir() else "volumes")
    if data_format == "lvit":
        lroot = _lvit_root(root)
        return {key: readers.read_lvit(lroot, split=folder) for key, folder in SPLIT_FOLDERS.items()}
    if data_format not in ("volumes", "mosmeddata"):
        raise InputError(root, f"unknown data_format {data_format!r}: use 'auto', 'lvit', 'volumes' or 'mosmeddata'")
    if data_format == "mosmeddata":  # COVID19_1110: the studies with a lesion mask, stratified by CT-k
        cases = readers.read_mosmeddata(root, only_masked=True)
    elif (root / "dataset.json").is_file():
        cases = readers.read_msd(root / "dataset.json")
    else:
        cases = readers.read_nifti_folder(root / "imagesTr", root / "labelsTr")
    case_splits = splits_mod.split_cases(cases, ratios=ratios, seed=seed, stratify_by="severity" if "severity" in cases[0] else None)
    by_id = {c["case_id"]: c for c in cases}
    return {
        key: [s for cid in case_splits.get(key, []) for s in volume_to_slice_items(by_id[cid], mode=slice_mode, seed=seed, text=text,
                                                                          keep_zones=keep_zones)]
        for key in SPLIT_FOLDERS
    }


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
    image, affine, _ = load_volume(case["image"])
    label = (load_volume(case["label"])[0] > 0).astype(np.uint8) if case.get("label") else np.zeros(image.shape, np.uint8)
    lung = load_volume(case["lung"])[0].astype(np.uint8) if case.get("lung") else split_left_right(lung_mask_from_ct(image), affine)
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
    items = []
    for it in slicer(volume):
        item = {"image": it["image"].astype(np.float32), "label": it["label"].astype(np.float32), "text": it["text"],
                "case_id": it["case_id"], "slice_index": int(file_index[it["slice_index"]])}
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
        Resized(keys=["image", "label", "lesion_zones"], spatial_size=(image_size, image_size),
                mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True),
    ]
    if train:
        tail.append(RandZoomd(keys=["image", "label", "lesion_zones"], prob=0.1, min_zoom=0.9, max_zoom=1.1,
                              mode=("bilinear", "nearest", "nearest"), allow_missing_keys=True))
        tail += list(augment or [])
    if zone_labels:
        tail.append(LungZonesFromTextd(keys="text", output_keys="zones"))
    tail += [TokenizeTextd(keys="text", tokenizer=tokenizer, max_length=max_length),
             DeleteItemsd(keys="lesion_zones"),  # used by the augmentations only; batches do not carry it
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


# ------------------------------------------------------------------------------- validation score
class SegTextScore(Metric):
    """Validation score for checkpoint selection: the mean of Dice and corpus BLEU-4.

    Selecting on Dice alone would happily keep a model whose text has collapsed (the seed's Exp1:
    Dice 0.75 with BLEU-4 0.0035); the mean rewards neither task being sacrificed. Missing tasks
    (seg-only or text-only baselines) are left out of the mean.
    """

    def __init__(self, tokenizer, output_transform=lambda x: x):
        self.tokenizer = tokenizer
        super().__init__(output_transform=output_transform)

    def reset(self):
        self.inter = self.total = 0.0
        self.refs: list[str] = []
        self.hyps: list[str] = []

    def update(self, output):
        pred, targets = output
        if "seg_logits" in pred:
            p = (torch.sigmoid(pred["seg_logits"]) > 0.5).float()
            g = targets["label"]
            self.inter += float((p * g).sum())
            self.total += float(p.sum() + g.sum())
        if "tokens" in pred and "tokens" in targets:
            self.hyps += decode_tokens(self.tokenizer, pred["tokens"])
            self.refs += decode_tokens(self.tokenizer, targets["tokens"])

    def compute(self):
        inter, total, refs, hyps = self.inter, self.total, self.refs, self.hyps
        if idist.get_world_size() > 1:  # every rank scores its own shard: reduce, so rank 0 selects on all
            inter, total = (float(v) for v in idist.all_reduce(torch.tensor([inter, total], dtype=torch.float64)))
            refs, hyps = _gather_texts(refs), _gather_texts(hyps)
        parts = []
        if total > 0 or inter > 0:
            parts.append(2 * inter / max(total, 1e-8))
        if hyps:
            parts.append(text_metrics(refs, hyps)["bleu4"])
        return float(np.mean(parts)) if parts else 0.0


def _gather_texts(texts: list[str]) -> list[str]:
    """Every rank's sentences, rank order (one newline-joined string per rank: ignite gathers strings)."""
    return [t for joined in idist.all_gather("\n".join(texts)) for t in (joined.split("\n") if joined else [])]


def engine_output(output):
    """Evaluator output (batch dict, not decollated) -> (pred dict, targets dict) for SegTextScore."""
    return output["pred"], output["label"]
