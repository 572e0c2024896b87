"""Binary lesion segmentation metrics: Dice, IoU and HD95 in millimetres, per item and per case.

Inputs
    Spatial arrays only (numpy or torch): ``(H, W)`` for a slice, ``(H, W, D)`` for a volume; no batch
    or channel axis (``SegmentationScores.add_batch`` takes ``(B, 1, ...)``). Ground truth is a 0/1 mask.
    The prediction kind is stated, never guessed (seed 000: "thresholded at 0.5 after sigmoid"):

    - ``"mask"``: 0/1 or bool;
    - ``"probs"``: foreground probabilities in [0, 1], foreground where ``p >= 0.5``;
    - ``"logits"``: raw outputs, foreground where ``sigmoid(x) >= 0.5``.

Empty masks (a lesion-free slice is common, so this is defined, not left to warnings)
    - both empty: Dice 1, IoU 1 (the prediction is exactly right); HD95 nan (no surface to measure),
      and the nan-aware means leave it out;
    - exactly one empty: Dice 0, IoU 0; every surface voxel of the non-empty mask is given the
      field-of-view diagonal in mm as its distance, so HD95 is that diagonal. A finite worst case
      (as BraTS does) keeps a missed or invented lesion in the mean instead of making it inf.

Spacing is per axis in mm, in the array's axis order (e.g. ``pixdim[1:4]`` of a NIfTI, or the
in-plane pair for a slice); HD95 is then in mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_edge_surface_distance, get_mask_edges

from segreport.metrics.stats import mean_std

KINDS = ("mask", "probs", "logits")
SCORES = ("dice", "iou", "hd95_mm")


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        # plain CPU tensor: MetaTensor metadata and CUDA placement play no part in a score
        return x.detach().cpu().as_subclass(torch.Tensor)
    return torch.as_tensor(np.asarray(x))


def binarize(x, kind: str = "mask", threshold: float = 0.5) -> torch.Tensor:
    """Foreground as a bool tensor from a mask, probabilities or logits (see module docstring)."""
    t = _as_tensor(x)
    if kind == "mask":
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("kind='mask' expects 0/1 values; pass kind='probs' for probabilities or kind='logits'")
        return t.bool()
    if kind == "probs":
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > 1):
            raise ValueError("kind='probs' expects values in [0, 1]; these look like logits (kind='logits')")
        return t.float() >= threshold
    if kind == "logits":
        return torch.sigmoid(t.float()) >= threshold
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_shapes(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a 2D slice or a 3D volume without batch/channel axes, got shape {tuple(pred.shape)}")


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    """Per-axis spacing in mm; one number means isotropic."""
    out = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(out) == 1:
        out *= ndim
    if len(out) != ndim or min(out) <= 0:
        raise ValueError(f"spacing must be {ndim} positive values in mm, got {out}")
    return out


def _monai_score(fn, pred: torch.Tensor, gt: torch.Tensor) -> float:
    # ignore_empty=False gives the documented rule: 1 when both are empty, 0 when only gt is
    return float(fn(pred[None, None].float(), gt[None, None].float(), include_background=True, ignore_empty=False))


def dice(pred, gt, kind: str = "mask") -> float:
    """Dice of one slice or volume (MONAI ``compute_dice``); 1.0 when both are empty."""
    p, g = binarize(pred, kind), binarize(gt)
    _check_shapes(p, g)
    return _monai_score(compute_dice, p, g)


def iou(pred, gt, kind: str = "mask") -> float:
    """IoU / Jaccard of one slice or volume (MONAI ``compute_iou``); 1.0 when both are empty."""
    p, g = binarize(pred, kind), binarize(gt)
    _check_shapes(p, g)
    return _monai_score(compute_iou, p, g)


def fov_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view in mm: the distance given to a surface with no counterpart."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def surface_distances(pred: torch.Tensor, gt: torch.Tensor, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm, ``(pred -> gt, gt -> pred)``, one per edge voxel.

    MONAI's ``get_edge_surface_distance`` (what ``compute_hausdorff_distance`` is built on) does
    the geometry; the raw distances are kept, not reduced, so a case's slices can be pooled.
    """
    if pred.any() and gt.any():
        _, (d_pg, d_gp), _ = get_edge_surface_distance(pred, gt, spacing=spacing, symmetric=True, warn_empty=False)
        return d_pg.numpy().astype(np.float32), d_gp.numpy().astype(np.float32)
    none = np.zeros(0, np.float32)
    if not (pred.any() or gt.any()):
        return none, none
    # MONAI returns inf here (and lists the same edge voxels in both directions); give each edge
    # voxel of the non-empty mask the field-of-view diagonal, in its own direction only
    edges_p, edges_g = get_mask_edges(pred, gt, crop=True)
    far = np.float32(fov_diagonal_mm(pred.shape, spacing))
    return np.full(int(edges_p.sum()), far), np.full(int(edges_g.sum()), far)


def hd95_from_distances(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
    """Symmetric HD95 as MONAI defines it: the larger of the two directed 95th percentiles."""
    parts = [np.percentile(d, 95) for d in (d_pred_to_gt, d_gt_to_pred) if d.size]
    return float(max(parts)) if parts else float("nan")


def hd95(pred, gt, spacing: Sequence[float] | float, kind: str = "mask") -> float:
    """95th-percentile Hausdorff distance in mm between the mask surfaces (empty rules above).

    Equal to ``monai.metrics.compute_hausdorff_distance(..., percentile=95, spacing=spacing)``
    when both masks are non-empty (a test pins this).
    """
    p, g = binarize(pred, kind), binarize(gt)
    _check_shapes(p, g)
    return hd95_from_distances(*surface_distances(p, g, _spacing(spacing, p.ndim)))


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0  # 0/0: both masks empty, counted as a perfect match


class SegmentationScores:
    """Accumulates Dice, IoU and HD95 (mm) per item and pools them per case.

    ``add`` one slice or one volume at a time. The per-case table pools all items of a case into
    one volume: Dice = 2·TP / (2·TP + FP + FN) summed over its slices, which is the Dice of the
    stacked 3D mask. A mean of slice Dices is not used because it weights a 5-voxel slice like a
    5000-voxel one and lets every lesion-free slice (Dice 1 when both are empty) pull the case up,
    so it depends on how many empty slices were sampled and cannot be compared with a 3D model's
    Dice. Case HD95 pools the items' directed surface distances before the 95th percentile; for a
    case added slice by slice these are in-plane distances (add the whole volume for a 3D HD95).

    Per-item Dice/IoU come from MONAI's ``compute_dice``/``compute_iou``; the pooled ones are
    computed here from voxel counts, because MONAI's metrics reduce per item and cannot pool.
    """

    def __init__(self, kind: str = "mask", threshold: float = 0.5):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.threshold = kind, threshold
        self._items: list[dict] = []
        # case_id -> counts and the pooled directed distances of all its items
        self._cases: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, pred, gt, case_id: str, spacing: Sequence[float] | float | None = None, slice_index: int | None = None) -> dict:
        """Score one slice or volume, file it under ``case_id``, and return its row.

        Without ``spacing`` (e.g. resized PNG slices) distances have no millimetres: HD95 is nan
        for the item and its case rather than a number in unknown units.
        """
        p, g = binarize(pred, self.kind, self.threshold), binarize(gt)
        _check_shapes(p, g)
        none = np.zeros(0, np.float32)
        d_pg, d_gp = (none, none) if spacing is None else surface_distances(p, g, _spacing(spacing, p.ndim))
        tp = int((p & g).sum())
        row = {
            "case_id": str(case_id),
            "slice_index": slice_index,
            "dice": _monai_score(compute_dice, p, g),
            "iou": _monai_score(compute_iou, p, g),
            "hd95_mm": float("nan") if spacing is None else hd95_from_distances(d_pg, d_gp),
            "gt_voxels": int(g.sum()),
            "pred_voxels": int(p.sum()),
            "tp": tp,
        }
        self._items.append(row)
        case = self._cases.setdefault(row["case_id"], {"n_items": 0, "gt": 0, "pred": 0, "tp": 0, "d_pg": [], "d_gp": [], "mm": True})
        case["n_items"] += 1
        case["gt"] += row["gt_voxels"]
        case["pred"] += row["pred_voxels"]
        case["tp"] += tp
        case["d_pg"].append(d_pg)
        case["d_gp"].append(d_gp)
        case["mm"] &= spacing is not None
        return row

    def add_batch(self, pred, gt, case_ids: Sequence[str], spacings=None, slice_indices: Sequence[int] | None = None) -> list[dict]:
        """``add`` each item of a ``(B, 1, *spatial)`` batch.

        ``spacings``: one spacing per item (``(B, ndim)``), one shared by the batch, or None.
        """
        pred, gt = _as_tensor(pred), _as_tensor(gt)
        if pred.ndim < 4 or pred.shape[1] != 1:
            raise ValueError(f"add_batch expects (B, 1, *spatial) predictions, got shape {tuple(pred.shape)}")
        if spacings is None or np.ndim(spacings) <= 1:  # one spacing (or none) for the whole batch
            spacings = [spacings] * pred.shape[0]
        slice_indices = [None] * pred.shape[0] if slice_indices is None else list(slice_indices)
        if not (len(case_ids) == len(spacings) == len(slice_indices) == pred.shape[0]):
            raise ValueError("add_batch needs one case_id, spacing and slice_index per batch item")
        return [
            self.add(pred[i, 0], gt[i, 0], case_ids[i], spacings[i], None if slice_indices[i] is None else int(slice_indices[i]))
            for i in range(pred.shape[0])
        ]

    def item_rows(self) -> list[dict]:
        """One row per added slice/volume: case_id, slice_index, dice, iou, hd95_mm, voxel counts."""
        return [dict(r) for r in self._items]

    def case_rows(self) -> list[dict]:
        """One row per case (in order of first appearance), its items pooled into one volume."""
        rows = []
        for case_id, c in self._cases.items():
            fp, fn = c["pred"] - c["tp"], c["gt"] - c["tp"]
            rows.append({
                "case_id": case_id,
                "n_items": c["n_items"],
                "dice": _ratio(2 * c["tp"], 2 * c["tp"] + fp + fn),
                "iou": _ratio(c["tp"], c["tp"] + fp + fn),
                "hd95_mm": hd95_from_distances(np.concatenate(c["d_pg"]), np.concatenate(c["d_gp"])) if c["mm"] else float("nan"),
                "gt_voxels": c["gt"],
                "pred_voxels": c["pred"],
                "tp": c["tp"],
            })
        return rows

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{"item"|"case": {score: {"mean", "std", "n"}}}``, nan-aware, sample std."""
        return {
            level: {s: mean_std([r[s] for r in rows]) for s in SCORES}
            for level, rows in (("item", self._items), ("case", self.case_rows()))
        }
