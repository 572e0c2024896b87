"""One lesion of a labelled 3D case as THE training target (:class:`SelectLesiond`): its mask, the mask of
every lesion, and its attribute targets; what the 3D lesion report's training and evaluation load."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

from ..errors import InputError
from ..vocab import ATTRIBUTE_NAMES
from .attributes import IGNORE_INDEX, encode_attributes

__all__ = ["SelectLesiond", "attribute_targets", "lesion_ids", "lesion_row", "EVERY_LESION"]

log = logging.getLogger("segreport.lesion_report")
_FULL_3D = ndimage.generate_binary_structure(3, 3)  # same connectivity as CropLargestLesion's default


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


def lesion_row(attributes: Sequence[Mapping] | None, lesion_id: int) -> Mapping | None:
    """The attribute row whose ``id`` is ``lesion_id``, None without one."""
    return next((r for r in attributes or [] if r.get("id") is not None and int(r["id"]) == lesion_id), None)


def attribute_targets(attributes: Sequence[Mapping] | None, lesion_id: int, case_id: str | None = None,
                      largest: bool = True) -> torch.Tensor:
    """(5,) class indices of lesion ``lesion_id`` in ``ATTRIBUTE_NAMES`` order; unknown -> IGNORE_INDEX.

    The row whose ``id`` matches wins; else, for the case's ``largest`` lesion, a case-level row
    (``id`` None). Missing rows or groups are ignored by the loss and logged, so a half-annotated
    dataset still trains.
    """
    rows = list(attributes or [])
    row = lesion_row(rows, lesion_id)
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


EVERY_LESION = "every_lesion"  # item key: the mask of all the case's lesions (SelectLesiond)


class SelectLesiond(MapTransform):
    """Make one lesion THE lesion of the item: label := its mask, plus its attribute targets.

    The lesion is the item's ``id_key`` when set (:func:`expand_lesions`), else the largest one.

    Runs on the original grid (before resampling), so the instance map is never interpolated.
    Writes ``label`` (that lesion only: other lesions are background, as an annotator clicking this
    lesion expects), ``every_key`` (every lesion: the target of a no-click step, which, as the
    automatic mode's windows, is asked for all the lesions it sees), ``lesion_id`` and ``attr_target``
    (LongTensor (5,), IGNORE_INDEX where unknown, see :func:`attribute_targets`); removes
    ``instance_key``. An empty label raises
    :class:`InputError` naming the file (:func:`drop_lesion_free` skips those cases beforehand).
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        instance_key: str = "lesions",
        attributes_key: str = "attributes",
        id_key: str = "lesion_id",
        attr_key: str = "attr_target",
        every_key: str = EVERY_LESION,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.instance_key, self.attributes_key = instance_key, attributes_key
        self.id_key, self.attr_key, self.every_key = id_key, attr_key, every_key

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
            d[self.every_key] = _like(label, (ids > 0)[None].astype(np.float32))
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
