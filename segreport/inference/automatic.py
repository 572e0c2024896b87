"""Automatic mode of a promptable 3D model: every lesion in the scan, found and described without a person.

1. **Search.** MONAI's :class:`~monai.inferers.SlidingWindowInferer` runs the model with no click over the
   lungs' bounding box on the model's grid: ROI-sized windows, ``overlap``, Gaussian blending (nnU-Net's),
   ``sw_batch_size`` windows per forward, the blended probability accumulated on the CPU whatever the
   device. The lung mask bounds the search: only windows over the lungs run.
2. **Candidates.** The probability goes back to the input grid; its connected components of at least
   ``min_lesion_ml`` with at least :data:`~segreport.vocab.PULMONARY_FRACTION` of their voxels in the lung
   mask are candidate lesions (what the report would call pulmonary). A pulmonary lesion lies in one
   lung, so the components are cut at the patient's midline plane (:func:`midline_x`: world x of the
   body's centre, from the affine): measured, a diffuse lesion in each lung came out as one component
   across the mediastinum, clicked there.
3. **Refinement.** Each candidate, largest first, goes through the model's own interactive path: one
   simulated positive click at its most interior voxel in a fresh :class:`PromptSession` (ROI centred on
   it, ROI growth for lesions larger than the ROI), as a person's first click would. Its lesion is the
   refined mask's components that overlap the candidate, and beyond the ROIs the click saw, the
   candidate itself: a diffuse lesion larger than ``max_rois`` ROIs stays one lesion (measured: keeping
   only the refined part split 1-L ground-glass lesions into a dozen fragments). If the click loses
   it (an empty mask there), the window's outline is kept, so nothing found is dropped; a candidate
   under ``outline_min_ml`` keeps it too (its click gives the attributes). The lesion stays on its
   candidate's side of the midline, one voxel clear of the plane (ROI growth would follow it into the
   other lung's), and is one connected region (the report's lesions are the mask's components). A candidate mostly covered by lesions already refined (a
   large lesion the windows split in two) is not refined again.
4. **Merge.** On the input grid, an instance map (first lesion first: a voxel belongs to one lesion) and
   its union; each lesion's attributes anchored at its most interior voxel.

Memory on a 512×512×300 CT: the model grid's probability and the input-grid maps are the only
whole-volume arrays (the windows run ``sw_batch_size`` at a time), so it stays near a few volumes of
float32. Progress is logged per case: windows, candidates, lesions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.utils import ensure_tuple_rep
from scipy import ndimage
from torch import nn

from ..data.io import spacing_from_affine
from ..transforms.lung_mask import lung_mask_from_ct
from ..vocab import MIN_LESION_ML, PULMONARY_FRACTION
from ..transforms.labels import bounding_box, label_counts
from .geometry import as_affine, box_affine, interior_voxel, map_points, roi_to_original, voxel_volume_ml
from .predictor import LesionAttributes, Prediction

log = logging.getLogger("segreport.automatic")
_FULL_3D = np.ones((3, 3, 3), bool)


@dataclass
class SearchSettings:
    """How the automatic mode searches. ``overlap``: of neighbouring windows (nnU-Net's 0.5; MONAI's 0.25
    runs about a third of the windows, and the model sees a lesion best near a window's centre: measured
    with two models, recall 0.68 -> 0.79 and 0.74 -> 0.79 at 0.5); ``covered``: a candidate whose voxels
    already belong to refined lesions by this fraction is not refined again; ``outline_min_ml``: a
    smaller candidate keeps the windows' outline, its click gives only its attributes (the click's
    prompt ball and the least the model answers a click with are larger than such a speck: measured on
    the seed-101 phantom, clicks on 0.5-0.7 mL false candidates drew 1.8-3.2 mL masks); ``mirror_axes``:
    each window also run mirrored along these model-grid axes and averaged, nnU-Net's test-time
    mirroring, here left-right only (measured, x: precision 0.84 -> 1.00 and 0.75 -> 0.80 on the seed-101
    and seed-202 phantoms, recall 0.84 -> 0.79 and 0.78 -> 0.78, time per volume x1.3; () = off);
    ``threshold``: of the candidates' probability, None = the model's (measured at 0.4: recall rose on
    one seed of three, and a lesion-free scan got eight specks)."""

    overlap: float = 0.5
    sw_batch_size: int = 4
    min_lesion_ml: float = MIN_LESION_ML
    covered: float = 0.5
    outline_min_ml: float = 1.0
    margin_mm: float = 10.0  # around the lungs' box: juxtapleural lesions and the blending's fall-off
    mirror_axes: tuple[int, ...] = (0,)
    threshold: float | None = None  # of the candidates' probability; None: the model's


def zero_click_probability(network: nn.Module, windows: list[int], mirror_axes: tuple[int, ...] = ()):
    """The network's no-click lesion probability of a batch of ROIs, (B, 1, *roi): what the windows run
    (promptable models and the U-Net baseline both return ``mask_logits``). ``mirror_axes`` (model-grid
    axes, 0 = x): also each mirrored ROI, mirrored back and averaged (nnU-Net's test-time mirroring).
    Appends each batch's size to ``windows``: the count of windows run is the inferer's own."""
    def predict(rois: torch.Tensor) -> torch.Tensor:
        windows.append(len(rois))
        prob = torch.sigmoid(network(rois)["mask_logits"][:, :1].float())
        for axis in mirror_axes:
            dim = 2 + int(axis)
            prob = prob + torch.sigmoid(network(rois.flip(dim))["mask_logits"][:, :1].float()).flip(dim)
        return prob / (1 + len(mirror_axes))
    return predict


def lung_box(lung: np.ndarray, orig_affine: np.ndarray, volume: MetaTensor, margin_mm: float) -> tuple[slice, ...] | None:
    """The lungs' bounding box on the model's grid (``volume``: pre-processed, channel first), widened by
    ``margin_mm``; None without lungs. From the box's corners through world space, so any orientation."""
    idx = np.argwhere(lung)
    if not len(idx):
        return None
    lo, hi = idx.min(0) - 0.5, idx.max(0) + 0.5
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    vol_affine = as_affine(volume.affine)
    pts = map_points(corners, orig_affine, vol_affine)
    spacing = np.asarray(spacing_from_affine(vol_affine))
    pad = np.ceil(margin_mm / spacing)
    shape = np.asarray(volume.shape[1:])
    start = np.clip(np.floor(pts.min(0) - pad).astype(int), 0, shape)
    stop = np.clip(np.ceil(pts.max(0) + pad).astype(int) + 1, 0, shape)
    return None if np.any(stop <= start) else tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def search_probability(network: nn.Module, volume: MetaTensor, box: tuple[slice, ...], roi_size, device,
                       settings: SearchSettings) -> tuple[torch.Tensor, np.ndarray, int]:
    """Sliding-window zero-click probability over ``box`` of ``volume`` (model grid). Returns the box's
    probability (D, H, W) on the CPU, the box's voxel -> RAS affine and the number of windows run."""
    roi_size = ensure_tuple_rep(roi_size, 3)
    crop = volume[(slice(None), *box)]
    affine = box_affine(as_affine(volume.affine), box)
    inferer = SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=settings.sw_batch_size, overlap=settings.overlap,
                                   mode="gaussian", padding_mode="constant", cval=float(crop.min()), sw_device=device,
                                   device=torch.device("cpu"))
    windows: list[int] = []
    prob = inferer(crop.as_tensor()[None].float(), zero_click_probability(network, windows, tuple(settings.mirror_axes)))
    return prob[0, 0], affine, sum(windows)


def midline_x(ct: np.ndarray, affine: np.ndarray) -> float | None:
    """World x (RAS, mm) of the patient's midline plane: the centre of the body's box (voxels above
    -500 HU), not of the lungs' (a scan with one lung would be cut through it). None without a body."""
    body = ct > -500
    extent = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        if not len(hit):
            return None
        extent.append((hit[0], hit[-1]))
    corners = np.array([[a, b, c] for a in extent[0] for b in extent[1] for c in extent[2]], dtype=np.float64)
    return float((corners @ affine[0, :3] + affine[0, 3]).mean())


def right_of_midline(mask: np.ndarray, affine: np.ndarray, midline: float, offset: float = 0.0) -> np.ndarray:
    """The voxels of ``mask`` on the patient's right of the plane world x = ``midline`` + ``offset`` (only
    the mask's voxels are mapped: no whole-volume coordinate array)."""
    idx = np.nonzero(mask)
    right = np.zeros(mask.shape, bool)
    x = np.stack(idx, 1) @ affine[0, :3] + affine[0, 3]
    right[tuple(i[x > midline + offset] for i in idx)] = True
    return right


def candidate_lesions(prob: np.ndarray, lung: np.ndarray, affine: np.ndarray, threshold: float,
                      min_lesion_ml: float, midline: float | None = None) -> tuple[np.ndarray, list[int], list[tuple[slice, ...]]]:
    """The candidates on the input grid: components of ``prob > threshold`` (cut at the plane world x =
    ``midline``) of at least ``min_lesion_ml`` and at least PULMONARY_FRACTION in the lung. Returns the
    component map, the candidates' ids (largest first) and their bounding boxes (one map, not a mask
    per candidate: memory)."""
    fg = prob > threshold
    components = np.zeros(fg.shape, np.int32)
    box = bounding_box(fg)  # labelled on the foreground's box only (a raster order's subsequence: the same ids)
    if midline is None:
        components[box], n = ndimage.label(fg[box], structure=_FULL_3D)
    else:  # one side, then the other: no component crosses the plane (two label maps at most: memory)
        right = right_of_midline(fg, affine, midline)[box]
        inside, n_right = ndimage.label(right, structure=_FULL_3D)
        left, n_left = ndimage.label(fg[box] & ~right, structure=_FULL_3D)
        del right
        left[left > 0] += n_right
        inside += left  # disjoint: the left ids land on zeros
        components[box] = inside
        del left, inside
        n = n_right + n_left
    if not n:
        return components, [], []
    sizes = label_counts(components, n)
    in_lung = label_counts(components[lung], n)
    voxel_ml = voxel_volume_ml(affine)
    keep = (sizes * voxel_ml >= min_lesion_ml) & (in_lung >= PULMONARY_FRACTION * sizes)
    keep[0] = False
    ids = sorted((int(i) for i in np.flatnonzero(keep)), key=lambda i: -sizes[i])
    boxes = ndimage.find_objects(components)
    return components, ids, [boxes[i - 1] for i in ids]


def _interior(mask_box: np.ndarray, box: tuple[slice, ...]) -> tuple[int, int, int]:
    """The most interior voxel of a candidate (given as its box crop), in input-grid IJK."""
    local = interior_voxel(mask_box)
    return tuple(int(s.start + i) for s, i in zip(box, local))


@dataclass
class Search:
    """What the search found on one image: the candidates' component map (input grid), their ids
    (largest first) and boxes, the windows run, the model-grid box searched (None: no lungs) and the
    world x of the patient's midline plane (None: not cut)."""

    components: np.ndarray
    ids: list[int]
    boxes: list[tuple[slice, ...]]
    windows: int = 0
    box: tuple[slice, ...] | None = None
    midline: float | None = None

    def mask(self) -> np.ndarray:
        return np.isin(self.components, self.ids).astype(np.uint8)


def search(network: nn.Module, volume: MetaTensor, orig_affine: np.ndarray, shape, lung: np.ndarray, roi_size, device,
           threshold: float, settings: SearchSettings, midline: float | None = None) -> Search:
    """Steps 1-2 of the module docstring for any network with a zero-click ``mask_logits`` (the 3D
    U-Net baseline runs the same windows). ``volume``: the image pre-processed for the model;
    ``midline``: :func:`midline_x` of the image (None: components are not cut); ``threshold``: the
    model's, unless ``settings.threshold`` is set."""
    threshold = threshold if settings.threshold is None else settings.threshold
    box = lung_box(lung, orig_affine, volume, settings.margin_mm)
    if box is None:
        return Search(np.zeros(shape, np.int32), [], [])
    with torch.inference_mode():
        box_prob, box_affine, windows = search_probability(network, volume, box, roi_size, device, settings)
    prob = roi_to_original(box_prob, box_affine, orig_affine, shape)
    components, ids, boxes = candidate_lesions(prob, lung, orig_affine, threshold, settings.min_lesion_ml, midline)
    return Search(components, ids, boxes, windows, box, midline)


def find_lesions(session, lung: np.ndarray | None = None, settings: SearchSettings | None = None) -> Prediction:
    """The automatic mode on the image of ``session`` (a :class:`PromptSession` after ``set_image``):
    module docstring. ``lung``: the image's lung mask or label (input grid), thresholded from the CT
    when not given."""
    settings = settings or SearchSettings()
    t0 = time.perf_counter()
    affine, shape, name = session.orig_affine, session.shape, session.source or "image"
    lung = lung_mask_from_ct(session.ct, affine) if lung is None else np.asarray(lung) > 0
    found = search(session.network, session.volume, affine, shape, lung, session.roi_size, session.device,
                   session.threshold, settings, midline_x(session.ct, affine))
    log.info("%s: %d windows, %d candidate lesions", name, found.windows, len(found.ids))
    instances = np.zeros(shape, dtype=np.int32)
    lesions: list[LesionAttributes] = []
    details: list[dict] = []
    for cid, cbox in zip(found.ids, found.boxes):
        in_box = found.components[cbox] == cid
        if (in_box & (instances[cbox] == 0)).sum() < (1 - settings.covered) * in_box.sum():
            continue  # an earlier lesion's refinement covers it already
        candidate = found.components == cid
        small = in_box.sum() * voxel_volume_ml(affine) < settings.outline_min_ml
        lesion, info, attrs = _refine(session, candidate, _interior(in_box, cbox), keep_outline=small)
        right = None if found.midline is None else right_of_midline(in_box, box_affine(affine, cbox), found.midline).any()
        one = _one_lesion(lesion, instances, right, affine, found.midline)
        if one is None:
            continue
        lbox, piece = one
        instances[lbox][piece] = len(lesions) + 1
        lesions.append(LesionAttributes(voxel=_interior(piece, lbox), attributes=attrs))
        details.append({"id": len(lesions), **info, "voxels": int(piece.sum())})
        log.info("%s: lesion %d of at most %d (%d voxels)", name, len(lesions), len(found.ids), details[-1]["voxels"])
    session.reset()
    log.info("%s: %d lesions in %.1f s", name, len(lesions), time.perf_counter() - t0)
    return Prediction(
        mask=(instances > 0).astype(np.uint8),
        case_finding=None,  # the report writes the case sentence from every lesion's geometry
        lesion_attributes=lesions,
        extras={"mode": "automatic", "windows": found.windows, "candidates": len(found.ids), "lesions": details,
                "search": {"overlap": settings.overlap, "min_lesion_ml": settings.min_lesion_ml,
                           "box": None if found.box is None else [[s.start, s.stop] for s in found.box]}},
    )


def _one_lesion(lesion: np.ndarray, instances: np.ndarray, right: bool | None, affine: np.ndarray,
                midline: float | None) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """A refined lesion as the report will count it, one connected region (the report's lesions are the
    mask's components): the voxels no earlier lesion holds, on its candidate's side of the midline
    (``right``) and one voxel clear of the plane (else it would join the other side's lesion again),
    then its largest piece (measured: the click's mask reached into the mediastinum, and the cut left
    that part as a 170 mL false lesion). Returns (box, piece in the box), None when nothing is left.
    Works in the lesion's box: no whole-volume copies (512×512×300 scans)."""
    boxes = ndimage.find_objects(lesion.view(np.uint8))  # a bool mask: the same bytes
    if not boxes:
        return None
    box = boxes[0]
    crop = lesion[box] & (instances[box] == 0)
    if midline is not None:
        width = float(np.abs(affine[0, :3]).max())  # one voxel along x
        a = box_affine(affine, box)
        crop &= right_of_midline(crop, a, midline, width) if right else ~right_of_midline(crop, a, midline, -width)
    pieces, n = ndimage.label(crop, structure=_FULL_3D)
    if not n:
        return None
    return box, pieces == int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1


def _refine(session, candidate: np.ndarray, click: tuple[int, int, int], keep_outline: bool = False) -> tuple[np.ndarray, dict, dict | None]:
    """One candidate through the interactive path: click ``click`` (its most interior voxel); keep the
    refined components that overlap it (else, or with ``keep_outline``, the candidate itself). Returns
    (mask, info, attributes)."""
    session.reset()
    pred = session.click(click)
    box = bounding_box(pred.mask)  # the click's mask is a small part of the scan: labelled on its box
    components, _ = ndimage.label(pred.mask[box] > 0, structure=_FULL_3D)
    ids = np.unique(components[candidate[box]])
    ids = ids[ids > 0]
    if len(ids) and not keep_outline:  # the click's outline where its ROIs see; beyond them (a lesion larger than the ROIs) the window's
        refined = candidate & ~session.roi_footprint()
        refined[box] |= np.isin(components, ids)
        source = "click refinement"
    else:
        refined = candidate
        source = "sliding window (under outline_min_ml: the click gave its attributes)" if keep_outline else \
            "sliding window (the click's mask missed it)"
    extras = {"source": source, "iou_pred": pred.extras.get("iou_pred"), "rois": pred.extras.get("rois"),
              "roi_growth": pred.extras.get("roi_growth")}
    attrs = pred.lesion_attributes[0].attributes if pred.lesion_attributes else pred.extras.get("attributes")
    return refined, {"click_ijk": [int(v) for v in click], **extras}, attrs
