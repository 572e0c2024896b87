"""Lesion mask <-> LViT finding sentence, as MONAI transforms.

Mask -> text rules (:class:`FindingsFromMask`):

* **Areas** are connected components of the mask (full connectivity: 26 in 3D, 8 in 2D), components
  smaller than ``min_size`` voxels ignored as specks; ids 1..N go by size, largest first.
* **Zones** of a lesion: every zone holding at least ``zone_fraction`` (default 10 %) of its voxels,
  and always the zone holding most. Any-overlap would name zones a lesion merely grazes by a voxel;
  a strict majority would drop zones a large lesion clearly spans. Lesion voxels outside the lungs
  take the zone of the nearest lung voxel (predicted masks leak over the pleura).
* **Zone source**, first available: a zone map passed in (``zone_map``, e.g. a slice of the volume's
  map, which is how 2D axial slices get their level); a lung label (1 right, 2 left) with its affine
  (``z_extent`` from the volume for axial slices, see :mod:`.lung_regions`); else the **fallback** —
  patient side by world x against the body's centre (``image`` in HU thresholded at ``body_threshold``,
  largest component; the whole field of view when there is no image) and levels as world-z thirds of
  the body's extent. The fallback is coarse (the body is longer than the lungs) and is meant for
  masks that come without lungs, such as the MosMedData masks.
* **Sides** are always the patient's, from the affine, never from an image half.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep
from scipy import ndimage

from ..text.findings import format_finding, parse_finding
from ..vocab import LUNG_LABELS, ZONES
from .labels import bounding_box, label_counts, label_in_memory_order
from .lung_regions import affine_of, lung_zone_map, spatial_array, zone_codes


@dataclass
class LesionFinding:
    """One connected lesion: id in :attr:`Findings.instances`, size, zones (those named by the rules),
    world centroid (RAS+ mm) and how many of its voxels fall in each zone (all zones, for reports)."""

    id: int
    voxels: int
    zones: list[str]
    centroid: tuple[float, float, float]
    zone_voxels: dict[str, int]


@dataclass
class Findings:
    """Everything :class:`FindingsFromMask` derived from a mask; ``text`` is the LViT sentence."""

    text: str
    n_areas: int
    zones: list[str]  # union over lesions, in vocab.ZONES order
    lesions: list[LesionFinding]
    instances: np.ndarray  # kept components relabelled 1..N, specks set to 0
    voxel_zones: np.ndarray  # zone code (1..6) of every kept lesion voxel, 0 elsewhere: slices of it give 2D findings


def body_mask(image, threshold: float = -500.0) -> np.ndarray:
    """Largest connected region above ``threshold`` HU: the patient's body (drops table and noise)."""
    above = spatial_array(image) > threshold
    labels, n = label_in_memory_order(above)
    if n == 0:
        return above
    return labels == np.argmax(label_counts(labels, n)[1:]) + 1


def _to_world(index, affine) -> np.ndarray:
    """World points (N, 3) of voxel indices given as a tuple of 2 or 3 index arrays."""
    ijk = np.zeros((len(index[0]), 3))
    for d, ix in enumerate(index):
        ijk[:, d] = ix
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def fallback_zone_codes(index, shape, affine, reference=None, z_extent: Sequence[float] | None = None) -> np.ndarray:
    """Zones of voxels ``index`` (tuple of index arrays) without a lung label: side by world x about
    the centre of ``reference`` (default: the field of view), level by world-z thirds of its extent
    (or of ``z_extent`` = (zmin, zmax)). Only the asked voxels are computed: real masks are large."""
    ref = None if reference is None else spatial_array(reference) > 0
    if ref is not None and ref.ndim == 3 and ref.any():
        midline, ref_z = _reference_geometry(ref, affine)
    else:  # the field of view (or a 2D reference): its corners bound z, its centre is the midline
        if ref is not None and ref.any():
            points = np.nonzero(ref)
        else:
            grids = np.meshgrid(*[np.array([0.0, n - 1.0, (n - 1) / 2]) for n in shape], indexing="ij")
            points = tuple(g.ravel() for g in grids)
        ref_world = _to_world(points, affine)
        midline, ref_z = float(ref_world[:, 0].mean()), (float(ref_world[:, 2].min()), float(ref_world[:, 2].max()))
    if z_extent is None:
        z_extent = ref_z
    world = _to_world(index, affine)
    sides = np.where(world[:, 0] < midline, LUNG_LABELS["left"], LUNG_LABELS["right"])
    return zone_codes(sides, world[:, 2], {"left": z_extent, "right": z_extent})


def _reference_geometry(ref: np.ndarray, affine: np.ndarray) -> tuple[float, tuple[float, float]]:
    """``(mean world x, (min, max) world z)`` of the voxels of a 3D mask, without a list of its voxels (a
    body is half of a 512x512x300 scan: that list and its world points took 3 GB and 7 s). The mean comes
    from per-axis voxel counts (world x is linear in the indices); world z is linear along every line of
    axis 1, so its extremes lie at each line's first or last voxel."""
    n = np.count_nonzero(ref)
    mean_ijk = np.array([np.dot(np.arange(s, dtype=np.float64), ref.sum(axis=tuple(a for a in range(3) if a != d)))
                         for d, s in enumerate(ref.shape)]) / n
    midline = float(affine[0, :3] @ mean_ijk + affine[0, 3])
    present = ref.any(axis=1)  # (i, k) lines holding a voxel
    first = np.argmax(ref, axis=1)
    last = ref.shape[1] - 1 - np.argmax(ref[:, ::-1], axis=1)
    i, k = np.nonzero(present)
    ends = np.concatenate([np.stack([i, first[i, k], k], 1), np.stack([i, last[i, k], k], 1)])
    z = ends @ affine[2, :3] + affine[2, 3]
    return midline, (float(z.min()), float(z.max()))


def label_components(mask, min_size: int = 1, affine: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Lesions = connected components (full connectivity) of ``mask`` with at least ``min_size`` voxels,
    numbered 1..N by size, largest first. The one labelling every report, preview and finding uses. Equal
    sizes are ordered by their centroid in world (RAS) coordinates when ``affine`` is given, so ids do not
    depend on how the file stores its voxels (else in scan order). Only the mask's bounding box is labelled:
    real masks are mostly empty."""
    m = spatial_array(mask) > 0.5
    instances = np.zeros_like(m, dtype=np.int32)  # in the mask's memory order: written to NIfTI (Fortran) without a transposing copy
    box = bounding_box(m)
    labels, n = ndimage.label(m[box], ndimage.generate_binary_structure(m.ndim, m.ndim))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ids = np.flatnonzero(sizes[1:] >= min_size) + 1
    keys = [-sizes[ids]]
    if affine is not None and len(np.unique(sizes[ids])) < len(ids):
        local = np.array(ndimage.center_of_mass(labels > 0, labels, ids), dtype=np.float64).reshape(len(ids), m.ndim)
        world = (local + [b.start for b in box]) @ np.asarray(affine, dtype=np.float64)[:3, : m.ndim].T
        keys = [*np.round(world, 3).T[::-1], keys[0]]  # np.lexsort: the last key is the primary one
    kept = ids[np.lexsort(keys)] if len(ids) else ids
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[kept] = np.arange(1, len(kept) + 1)
    instances[box] = relabel[labels]
    return instances, len(kept)


def _voxel_sizes(affine: np.ndarray, ndim: int) -> np.ndarray:
    return np.linalg.norm(affine[:3, :ndim], axis=0)


def nearest_zone_voxel(zmap: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(ndim, *shape): for each voxel the index of the nearest zone voxel (itself inside a zone), by the
    Euclidean distance in mm: where a lesion voxel over the pleura is placed."""
    return ndimage.distance_transform_edt(zmap == 0, sampling=_voxel_sizes(affine, zmap.ndim), return_distances=False,
                                          return_indices=True)


class FindingsFromMask(Transform):
    """Lesion mask (+ lung label or zone map) -> LViT finding sentence. Rules in the module docstring.

    Call with ``mask`` (binary or instance map, 2D or 3D, channel-first allowed) and the optional
    ``lung``, ``affine`` (else taken from the MetaTensor), ``zone_map``, ``z_extent``, ``image``.
    :meth:`describe` returns the full :class:`Findings` (instances, per-lesion zones, centroids).
    """

    def __init__(
        self, min_size: int = 5, zone_fraction: float = 0.1, all_word: bool = True, body_threshold: float = -500.0
    ):
        self.min_size = min_size
        self.zone_fraction = zone_fraction
        self.all_word = all_word
        self.body_threshold = body_threshold

    def _lesion_zones(self, index, shape, affine, lung, zone_map, z_extent, image) -> np.ndarray:
        """Zone code of each lesion voxel ``index``; voxels outside the lungs take the nearest lung zone."""
        if zone_map is None and lung is not None and (spatial_array(lung) > 0).any():
            zone_map = lung_zone_map(lung, affine, z_extent)
        if zone_map is None:
            reference = None if image is None else body_mask(image, self.body_threshold)
            extent = None
            if z_extent is not None:
                extent = (min(v[0] for v in z_extent.values()), max(v[1] for v in z_extent.values()))
            return fallback_zone_codes(index, shape, affine, reference, extent)
        zmap = spatial_array(zone_map).astype(np.uint8)
        if zmap.shape != tuple(shape):
            raise ValueError(f"zone/lung map shape {zmap.shape} differs from mask shape {tuple(shape)}")
        codes = zmap[index]
        outside = codes == 0
        if outside.any():  # voxels over the pleura (predicted masks leak): the nearest zone's code
            if not zmap.any():
                raise ValueError("zone map is empty: no lung to place the lesions in")
            # inside the box holding the zones and these voxels, which holds each voxel's nearest zone
            # voxel too: the same answer as over the whole volume, in a fraction of the time
            far = tuple(ix[outside] for ix in index)
            box = tuple(slice(min(b.start, int(f.min())), max(b.stop, int(f.max()) + 1))
                        for b, f in zip(bounding_box(zmap > 0), far))
            sub = zmap[box]
            near = nearest_zone_voxel(sub, affine)
            local = tuple(f - b.start for f, b in zip(far, box))
            codes = codes.copy()
            codes[outside] = sub[tuple(n[local] for n in near)]
        return codes

    def describe(self, mask, lung=None, affine=None, zone_map=None, z_extent=None, image=None) -> Findings:
        """Components, their zones and centroids, and the sentence (rules in the module docstring)."""
        a = affine_of(mask, affine)
        instances, k = label_components(mask, self.min_size, a)
        if not k:
            return Findings(format_finding(0, ()), 0, [], [], instances, np.zeros(instances.shape, np.uint8))
        m, box = instances > 0, bounding_box(instances > 0)

        index = tuple(ix + b.start for ix, b in zip(np.nonzero(instances[box]), box))
        ids = instances[index]
        codes = self._lesion_zones(index, m.shape, a, lung, zone_map, z_extent, image).astype(np.int64)
        voxel_zones = np.zeros(m.shape, dtype=np.uint8)
        voxel_zones[index] = codes
        table = np.bincount(ids * 7 + codes, minlength=(k + 1) * 7).reshape(k + 1, 7)[1:, 1:]
        world = _to_world(index, a)
        counts_all = np.bincount(ids, minlength=k + 1)[1:]
        centroids = np.stack([np.bincount(ids, weights=world[:, d], minlength=k + 1)[1:] for d in range(3)], 1)
        centroids /= counts_all[:, None]

        lesions, union = [], set()
        for i in range(k):
            counts = table[i]
            hit = (counts >= self.zone_fraction * counts.sum()) | (np.arange(6) == counts.argmax())
            zones = [z for z, h in zip(ZONES, hit) if h]
            union.update(zones)
            lesions.append(LesionFinding(i + 1, int(counts_all[i]), zones, tuple(float(v) for v in centroids[i]),
                                         {z: int(c) for z, c in zip(ZONES, counts) if c}))
        zones = [z for z in ZONES if z in union]
        return Findings(format_finding(k, zones, self.all_word), k, zones, lesions, instances, voxel_zones)

    def __call__(self, mask, lung=None, affine=None, zone_map=None, z_extent=None, image=None) -> str:
        return self.describe(mask, lung, affine, zone_map, z_extent, image).text


def _affine_from(d: Mapping, key: str):
    """The affine of ``d[key]``: None for a MetaTensor (it carries one), else from ``<key>_meta_dict``."""
    if isinstance(d[key], MetaTensor):
        return None
    return d.get(f"{key}_meta_dict", {}).get("affine")


class FindingsFromMaskd(MapTransform):
    """Dictionary version of :class:`FindingsFromMask`: the mask under each key -> a sentence.

    ``lung_key``/``zones_key``/``image_key`` name the optional lung label, zone map and CT (HU) of the
    same item; missing ones are skipped (the fallback zones are used). Sentences go to ``output_keys``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lung_key: str | None = "lung",
        zones_key: str | None = None,
        image_key: str | None = None,
        output_keys: KeysCollection = "text",
        min_size: int = 5,
        zone_fraction: float = 0.1,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.lung_key, self.zones_key, self.image_key = lung_key, zones_key, image_key
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys))
        self.findings = FindingsFromMask(min_size=min_size, zone_fraction=zone_fraction)

    def __call__(self, data):
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.findings(
                d[key],
                lung=d.get(self.lung_key) if self.lung_key else None,
                affine=_affine_from(d, key),
                zone_map=d.get(self.zones_key) if self.zones_key else None,
                image=d.get(self.image_key) if self.image_key else None,
            )
        return d


class LungZonesFromText(Transform):
    """Finding sentence -> six-zone multi-hot float tensor in :data:`vocab.ZONES` order (seed 004 labels)."""

    def __call__(self, text: str) -> torch.Tensor:
        return torch.tensor(parse_finding(text).multi_hot, dtype=torch.float32)


class LungZonesFromTextd(MapTransform):
    """Dictionary version of :class:`LungZonesFromText`; writes ``output_keys`` (default ``"<key>_zones"``)."""

    def __init__(
        self, keys: KeysCollection = "text", output_keys: KeysCollection | None = None, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        default = tuple(f"{k}_zones" for k in self.keys)
        self.output_keys = ensure_tuple_rep(output_keys, len(self.keys)) if output_keys else default
        self.to_zones = LungZonesFromText()

    def __call__(self, data):
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.to_zones(d[key])
        return d


MIN_AREA_FRACTION = 1e-3  # a slice's lesion component counts from this share of the slice's pixels


def min_area(shape) -> int:
    """Smallest counted lesion component, in pixels, on a slice of ``shape``."""
    return max(1, int(round(MIN_AREA_FRACTION * int(np.prod(shape)))))


def slice_finding(label: np.ndarray, zone_map: np.ndarray) -> Findings:
    """The :class:`Findings` of a 2D lesion mask on a slice zone map (both H x W): the rule that writes
    the slice sentences MedSegText trains on, and that checks the ones it writes."""
    return FindingsFromMask(min_size=min_area(label.shape)).describe(np.asarray(label) > 0, affine=np.eye(4),
                                                                     zone_map=zone_map)
