"""The prompt session: one person, one image, clicks one after another, for any promptable 3D model.

A promptable model has ``encode_image(roi) -> embedding`` and ``decode(embedding, points, labels,
mask_prompt) -> {"mask_logits", "low_res_logits", "iou_pred", "attr_logits"}``, and a ``spec`` with its
pre-processing (``spacing``, ``window``, ``axcodes``; ROI size from ``img_size``). This is what the batch
runner and a MONAI Label app call: ``set_image`` once, then ``click`` as often as wanted; the embedding
is cached, so a click only reruns the prompt side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from ..errors import InputError
from ..timing import stage
from ..transforms.crop import CropLargestLesion, roi_box
from ..transforms.volume import volume_transforms
from ..vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES
from .automatic import SearchSettings, find_lesions
from .clicks import parse_clicks
from .geometry import as_affine, auto_roi_center, interior_voxel, map_points, roi_to_original_box
from .predictor import LesionAttributes, Prediction
from .roi_tiles import Tile, covers, growth_starts, overlap_mask

log = logging.getLogger("segreport.session")


def is_promptable(network: nn.Module) -> bool:
    """Whether the network takes clicks (``encode_image`` + ``decode``)."""
    net = getattr(network, "module", network)
    return hasattr(net, "encode_image") and hasattr(net, "decode")


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


# a click with lung parenchyma this close is "in the lungs": the centre of a 4 cm lesion, juxtapleural ones
# included; a chest wall thinner than this passes too (the check flags the clearly wrong, it proves nothing)
LUNG_SEARCH_MM = 20.0
LUNG_HU = (-980.0, -500.0)  # parenchyma; below: air (outside the body, airways), above: lesion, vessel, tissue


def click_site(ct_hu: np.ndarray, affine: np.ndarray, ijk: Sequence[float]) -> dict:
    """Where a click landed, from the HU around it: ``{"hu", "site"}`` with site ``"in air"`` (the voxel
    itself at or below the parenchyma range: outside the body, an airway, a bulla; never a lesion),
    ``"lung"`` (lung parenchyma within :data:`LUNG_SEARCH_MM`) or ``"outside the lungs"`` (dense tissue
    with no parenchyma near: chest wall, mediastinum, abdomen). Local (a box of twice the search
    radius), so it costs nothing per click."""
    ct = np.asarray(ct_hu)
    idx = np.clip(np.rint(np.asarray(ijk, dtype=float)).astype(int), 0, np.asarray(ct.shape) - 1)
    hu = float(ct[tuple(idx)])
    if hu <= LUNG_HU[0]:
        return {"hu": round(hu, 1), "site": "in air"}
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    r = np.maximum(np.ceil(LUNG_SEARCH_MM / spacing).astype(int), 1)
    lo, hi = np.maximum(idx - r, 0), np.minimum(idx + r + 1, ct.shape)
    box = ct[tuple(slice(a, b) for a, b in zip(lo, hi))]
    grids = np.meshgrid(*[(np.arange(a, b) - i) * s for a, b, i, s in zip(lo, hi, idx, spacing)], indexing="ij")
    near = sum(g**2 for g in grids) <= LUNG_SEARCH_MM**2
    parenchyma = (box > LUNG_HU[0]) & (box < LUNG_HU[1]) & near
    # a few voxels of lung-range HU also occur in noise or partial volume: ask for a real patch of lung
    site = "lung" if parenchyma.sum() >= max(4, 0.02 * near.sum()) else "outside the lungs"
    return {"hu": round(hu, 1), "site": site}


class PromptSession:
    """One radiologist and one image: ``set_image`` once, then ``click`` as often as wanted.

    This is what MONAI Label (or any viewer) calls. The first click must be positive (it says "this
    lesion") and places the ROI, centred on it; the ROI is encoded once and its embedding cached, so
    every later click only reruns the prompt side (``decode``) with all clicks so far and the previous
    mask as the dense prompt. :meth:`auto` runs with no click (ROI from :func:`auto_roi_center`); a
    later first click re-centres. ``reset()`` starts over on the same image.

    Lesions larger than the ROI (``max_rois`` > 1): when the mask reaches a face of the ROI with image
    beyond it, neighbouring ROIs are added, each encoded once, up to ``max_rois`` (:mod:`.roi_tiles`);
    a positive click outside every ROI adds one centred on it. With ``max_rois=1`` (or once the bound is
    reached) a click outside the ROIs cannot change them: it is ignored with a warning (listed in
    ``extras["ignored_clicks"]``), and ``extras["roi_growth"]`` says when the mask still reaches a border.

    Clicks are IJK voxel indices of the image given to ``set_image`` (what 3D Slicer/OHIF send), or
    world RAS mm with ``world=True``. A click outside the image raises :class:`InputError` naming the
    point and the image shape; a negative first click raises it too.

    Where a positive click lands is checked (:func:`click_site`, from the HU around it): one with no
    lung parenchyma within ``LUNG_SEARCH_MM`` (on the chest wall, in the mediastinum) or on air still runs, the person may know better, but is listed in ``extras["click_warnings"]``
    and logged. A click on a vessel inside the lung is a lung click: the mask is what the model
    segments there (``iou_pred`` and the attribute probabilities say how sure it is; an empty mask gives
    "No lesion segmented." and no lesion entry), and ROI growth may follow a vessel up to ``max_rois``.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", threshold: float = 0.5, max_rois: int = 1):
        net = getattr(network, "module", network)
        if not is_promptable(net):
            raise TypeError(f"{type(net).__name__} takes no clicks (no encode_image/decode): run it without a session")
        spec = getattr(net, "spec", {})
        self.network = net.to(device).eval()
        self.device = torch.device(device)
        self.threshold = threshold
        self.max_rois = max(1, int(max_rois))
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
        self.orig_affine, self.shape = as_affine(affine), tuple(ct.shape)
        with stage("preprocess"):
            self._volume = self.volume_tf({"image": MetaTensor(torch.from_numpy(ct[None]), affine=torch.as_tensor(self.orig_affine))})["image"]
        self.reset()

    def reset(self) -> None:
        """Forget clicks, ROIs and cached embeddings (keeps the pre-processed image)."""
        self.clicks: list[tuple[np.ndarray, int]] = []  # (original IJK, label)
        self.ignored: list[dict] = []
        self.warnings: list[dict] = []  # positive clicks that did not land in the lungs
        self._tiles: list[Tile] = []
        self._last: Prediction | None = None
        self._last_prob: np.ndarray | None = None
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
        elif not any(self._inside(tile, ijk) for tile in self._tiles):
            if positive and len(self._tiles) < self.max_rois:  # more of the lesion, beyond the ROIs so far
                self._tiles.append(self._new_tile(map_points(ijk, self.orig_affine, self._volume.affine)[0]))
            else:
                log.warning("click %s lies outside the current ROI: ignored (reset() to start a new ROI)", ijk.tolist())
                self.ignored.append({"ijk": ijk.tolist(), "label": int(positive), "reason": "outside the ROI"})
                self._last.extras["ignored_clicks"] = list(self.ignored)
                return self._last  # nothing changed
        self.clicks.append((ijk, int(positive)))
        if positive:
            site = click_site(self._ct, self.orig_affine, ijk)
            if site["site"] != "lung":
                log.warning("click %s (%s HU) lies %s: a lung-lesion model, the mask may be empty or wrong",
                            ijk.round(1).tolist(), site["hu"], site["site"])
                self.warnings.append({"ijk": [round(float(v), 2) for v in ijk], **site})
        return self._predict()

    def auto(self, lung: np.ndarray | None = None) -> Prediction:
        """Zero clicks: ROI from :func:`auto_roi_center` (``lung``: the image's lung mask, if made
        already), the model alone (trained with prompt dropout)."""
        self._require_image()
        self.reset()
        center, source = auto_roi_center(self._ct, lung)
        self._place_roi(map_points(center, self.orig_affine, self._volume.affine)[0], f"auto: {source}")
        return self._predict()

    def find_all(self, lung: np.ndarray | None = None, settings: SearchSettings | None = None) -> Prediction:
        """Zero clicks, every lesion (:mod:`.automatic`): a sliding-window search with no click, then one
        simulated click per candidate through this session. Ends reset (no clicks kept)."""
        self._require_image()
        return find_lesions(self, lung, settings)

    def roi_footprint(self) -> np.ndarray:
        """Where the current ROIs lie on the input grid (bool): what a prediction could see."""
        out = np.zeros(self.shape, bool)
        ones = torch.ones(self.roi_size)
        for tile in self._tiles:
            box, values = roi_to_original_box(ones, tile.affine, self.orig_affine, self.shape)
            if box is not None:
                out[box] |= values > 0.5
        return out

    @property
    def ct(self) -> np.ndarray | None:
        """The image as given (HU, input voxel order)."""
        return self._ct

    @property
    def volume(self) -> MetaTensor:
        """The image pre-processed for the model (reoriented, resampled, windowed; channel first)."""
        self._require_image()
        return self._volume

    @property
    def last(self) -> Prediction | None:
        """The last prediction (None before the first click or ``auto``)."""
        return self._last

    def probability(self) -> np.ndarray:
        """The last prediction's lesion probability on the input grid (0 outside the ROIs): soft output
        for viewers, and what the threshold is applied to."""
        if self._last_prob is None:
            raise RuntimeError("no prediction yet: click() or auto() first")
        return self._last_prob

    def _require_image(self) -> None:
        if self._ct is None:
            raise RuntimeError("call set_image(ct, affine) first")

    def _check_point(self, point: Sequence[float], world: bool) -> np.ndarray:
        ijk, _ = parse_clicks([point], world=world, affine=self.orig_affine, shape=self.shape, source=self.source, what="click")
        return ijk[0]

    # -------------------------------------------------------------------------------- ROIs
    def _inside(self, tile: Tile, ijk: np.ndarray) -> bool:
        roi_pt = map_points(ijk, self.orig_affine, tile.affine)[0]
        return bool(np.all(roi_pt >= -0.5) and np.all(roi_pt <= np.asarray(self.roi_size) - 0.5))

    def _new_tile(self, center_vox: np.ndarray) -> Tile:
        """Crop and encode the ROI centred on ``center_vox`` (voxels of the pre-processed volume)."""
        center = np.rint(center_vox)
        roi = CropLargestLesion(self.roi_size)(self._volume, center=center)
        with torch.inference_mode():
            embedding = self.network.encode_image(roi.as_tensor()[None].float().to(self.device))
        self.n_encodes += 1
        start = np.asarray(roi_box(center, self.roi_size, self._volume.shape[1:])["box_start"])
        return Tile(start=start, affine=as_affine(roi.affine), embedding=embedding)

    def _place_roi(self, center_vox: np.ndarray, source: str) -> None:
        self._tiles = [self._new_tile(center_vox)]
        self.roi_center_source = source

    def _clicks_inside(self, tile: Tile) -> tuple:
        return tuple((tuple(float(v) for v in ijk), lab) for ijk, lab in self.clicks if self._inside(tile, ijk))

    def _decode(self, tile: Tile) -> dict:
        """Decode one ROI with the clicks inside it (and its seed clicks), its previous mask as prompt."""
        tile.prompts = self._clicks_inside(tile)
        points = [map_points(np.asarray(ijk), self.orig_affine, tile.affine)[0] for ijk, _ in tile.prompts]
        labels = [lab for _, lab in tile.prompts]
        points += tile.seed_points
        labels += [1] * len(tile.seed_points)
        tile.anchors = [p for p, lab in zip(points, labels) if lab == 1]
        pts = lab_t = None
        if points:
            pts = torch.tensor(np.stack(points), dtype=torch.float32, device=self.device)[None]
            lab_t = torch.tensor(labels, dtype=torch.long, device=self.device)[None]
        out = self.network.decode(tile.embedding, pts, lab_t, mask_prompt=tile.prev_logits)
        tile.prev_logits = out["low_res_logits"]
        tile.prob = torch.sigmoid(out["mask_logits"][0, 0].float())
        tile.out, tile.on_input_grid = out, None
        return out

    def _grow(self) -> str:
        """Add ROIs while a mask reaches a face with image beyond it, up to ``max_rois``; says why it stopped."""
        volume_shape = self._volume.shape[1:]
        queue = [s for t in self._tiles for s in growth_starts(t, self.roi_size, volume_shape, self.threshold)]
        while queue:
            start = queue.pop(0)
            if any(covers(t, start, self.roi_size) for t in self._tiles):
                continue
            if len(self._tiles) >= self.max_rois:
                return f"the mask reaches an ROI border: more of the lesion may lie beyond (max_rois {self.max_rois})"
            seed = interior_voxel(overlap_mask(self._tiles, start, self.roi_size, self.threshold))
            if seed is None:
                continue
            tile = self._new_tile(start + np.asarray(self.roi_size) // 2)
            tile.seed_points = [np.asarray(seed, dtype=np.float64)]
            self._decode(tile)
            self._tiles.append(tile)
            queue += growth_starts(tile, self.roi_size, volume_shape, self.threshold)
        return "inside the ROIs"

    @torch.inference_mode()
    def _predict(self) -> Prediction:
        for tile in self._tiles:  # a click changes the ROIs it lies in; the others keep their last answer
            if tile.out is None or tile.prompts != self._clicks_inside(tile):
                self._decode(tile)
        out = self._tiles[0].out  # attributes: the ROI of the first click
        growth = self._grow()
        prob = np.zeros(self.shape, dtype=np.float32)
        boxes = []
        for tile in self._tiles:  # merged box by box: no whole-volume temporary per ROI
            if tile.on_input_grid is None:
                tile.on_input_grid = roi_to_original_box(tile.prob, tile.affine, self.orig_affine, self.shape)
            box, values = tile.on_input_grid
            if box is not None:
                np.maximum(prob[box], values, out=prob[box])
                boxes.append(box)
        self._last_prob = prob
        # thresholded on the ROIs' box only: the rest of a 512x512x300 scan is zero, and a click is interactive
        seen = tuple(slice(min(b[d].start for b in boxes), max(b[d].stop for b in boxes)) for d in range(3)) if boxes \
            else (slice(0, 0),) * 3
        mask = np.zeros(self.shape, dtype=np.uint8)
        mask[seen] = prob[seen] > self.threshold
        attrs = attribute_probabilities(out["attr_logits"])
        first = self._tiles[0]
        near = self.clicks[0][0] if self.clicks else map_points((np.asarray(self.roi_size) - 1) / 2, first.affine, self.orig_affine)[0]
        local = interior_voxel(mask[seen] > 0, [round(float(v)) - b.start for v, b in zip(near, seen)])  # rounded as before the shift
        anchor = None if local is None else tuple(int(b.start + i) for b, i in zip(seen, local))
        lesions = [] if anchor is None else [LesionAttributes(voxel=anchor, attributes=attrs)]
        self._last = Prediction(
            mask=mask,
            case_finding=attributes_sentence(attrs if anchor is not None else None),
            lesion_attributes=lesions,
            extras={
                "clicks": [{"ijk": [round(float(v), 2) for v in p], "label": lab} for p, lab in self.clicks],
                "ignored_clicks": list(self.ignored),
                "click_warnings": list(self.warnings),
                "roi_center_source": self.roi_center_source,
                "rois": len(self._tiles),
                "roi_growth": growth,
                "iou_pred": round(float(out["iou_pred"][0, 0]), 4),
                "attributes": attrs,
            },
        )
        return self._last
