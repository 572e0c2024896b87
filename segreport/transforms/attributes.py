"""Lesion attributes (seed 001, Table 1): names <-> class indices of ``vocab.ATTRIBUTE_GROUPS``.

Matching is tolerant: case, underscores, hyphens, slashes and repeated spaces are ignored
("Round_like" == "round-like"), and common synonyms map to the canonical class ("round",
"nodular", "ill-defined", "hypo", ...). Class indices (ints) pass through after a range check.
A group missing from the input either raises or becomes ``IGNORE_INDEX`` (-100, the default
``ignore_index`` of ``torch.nn.CrossEntropyLoss``), per ``missing=``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from segreport.errors import InputError
from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES

IGNORE_INDEX = -100
MISSING = ("error", "ignore")


def _norm(text: str) -> str:
    return re.sub(r"[\s_\-/]+", " ", str(text).strip().lower()).strip()


# Extra spellings seen in reports and datasets, keyed by group; canonical names match by themselves.
SYNONYMS: dict[str, dict[str, str]] = {
    "shape": {
        "round": "round-like", "roundlike": "round-like", "round shaped": "round-like", "oval": "round-like",
        "irregular shape": "irregular", "wall thickened": "wall thickening", "thick wall": "wall thickening",
        "punctate": "punctate/nodular", "nodular": "punctate/nodular", "nodule": "punctate/nodular",
    },
    "invasion": {
        "no": "no close relationship", "none": "no close relationship", "absent": "no close relationship",
        "no invasion": "no close relationship", "not invasive": "no close relationship",
        "yes": "close relationship with adjacent structures", "present": "close relationship with adjacent structures",
        "close relationship": "close relationship with adjacent structures",
        "invasion": "close relationship with adjacent structures", "invasive": "close relationship with adjacent structures",
    },
    "density": {
        "hypo": "hypodense", "low": "hypodense", "low density": "hypodense", "hypoattenuating": "hypodense",
        "iso": "isodense", "isoattenuating": "isodense",
        "hyper": "hyperdense", "high": "hyperdense", "high density": "hyperdense", "hyperattenuating": "hyperdense",
    },
    "heterogeneity": {
        "homogenous": "homogeneous", "homo": "homogeneous", "uniform": "homogeneous",
        "heterogenous": "heterogeneous", "hetero": "heterogeneous", "non uniform": "heterogeneous",
    },
    "surface": {
        "well defined margin": "well-defined", "clear": "well-defined", "smooth": "well-defined", "sharp": "well-defined",
        "ill defined": "ill-defined margin", "poorly defined": "ill-defined margin", "blurred": "ill-defined margin",
        "unclear": "ill-defined margin", "spiculated": "ill-defined margin",
    },
}

# normalised spelling -> class index, per group
_LOOKUP: dict[str, dict[str, int]] = {}
for _group, _classes in ATTRIBUTE_GROUPS.items():
    _LOOKUP[_group] = {_norm(name): i for i, name in enumerate(_classes)}
    _LOOKUP[_group].update({_norm(alias): _classes.index(canon) for alias, canon in SYNONYMS[_group].items()})


def encode_attribute(group: str, value, path=None) -> int:
    """Class index of ``value`` (a name, synonym or index) in ``group``; InputError if unknown."""
    if group not in ATTRIBUTE_GROUPS:
        raise InputError(path, f"unknown attribute group {group!r}; groups are {list(ATTRIBUTE_NAMES)}")
    allowed = ATTRIBUTE_GROUPS[group]
    if isinstance(value, Integral) and not isinstance(value, bool):
        if 0 <= value < len(allowed):
            return int(value)
    elif isinstance(value, str) and _norm(value) in _LOOKUP[group]:
        return _LOOKUP[group][_norm(value)]
    raise InputError(path, f"attribute {group!r}: unknown value {value!r}; allowed: {list(allowed)} (or index 0..{len(allowed) - 1})")


def encode_attributes(attrs: Mapping[str, object], missing: str = "error", path=None) -> dict[str, int]:
    """``{group: name}`` -> ``{group: class index}`` for all five groups, in vocab order.

    Keys that are not attribute groups (``id``, ``lesion_type``, ...) are ignored. A missing (or
    None) group raises InputError with ``missing="error"`` and becomes ``IGNORE_INDEX`` with
    ``missing="ignore"``. ``path`` names the source file in error messages.
    """
    if missing not in MISSING:
        raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
    out = {}
    for group in ATTRIBUTE_NAMES:
        value = attrs.get(group)
        if value is None:
            if missing == "error":
                raise InputError(path, f"attribute {group!r} missing; allowed: {list(ATTRIBUTE_GROUPS[group])}")
            out[group] = IGNORE_INDEX
        else:
            out[group] = encode_attribute(group, value, path)
    return out


def decode_attributes(indices: Mapping[str, int] | Sequence[int] | torch.Tensor) -> dict[str, str | None]:
    """Class indices (a ``{group: index}`` dict or a vector in ``ATTRIBUTE_NAMES`` order) -> names.

    ``IGNORE_INDEX`` decodes to None.
    """
    if not isinstance(indices, Mapping):
        values = [int(v) for v in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if len(values) != len(ATTRIBUTE_NAMES):
            raise ValueError(f"expected {len(ATTRIBUTE_NAMES)} indices ({list(ATTRIBUTE_NAMES)}), got {len(values)}")
        indices = dict(zip(ATTRIBUTE_NAMES, values))
    out = {}
    for group, idx in indices.items():
        idx = int(idx)
        if idx == IGNORE_INDEX:
            out[group] = None
        elif group in ATTRIBUTE_GROUPS and 0 <= idx < len(ATTRIBUTE_GROUPS[group]):
            out[group] = ATTRIBUTE_GROUPS[group][idx]
        else:
            raise ValueError(f"invalid index {idx} for attribute group {group!r}")
    return out


class EncodeAttributes(Transform):
    """Attribute dict -> LongTensor (5,) in ``ATTRIBUTE_NAMES`` order; a list of per-lesion dicts
    -> (N, 5). See :func:`encode_attributes` for ``missing``."""

    def __init__(self, missing: str = "error"):
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}, got {missing!r}")
        self.missing = missing

    def __call__(self, attrs: Mapping | Sequence[Mapping], path=None) -> torch.Tensor:
        if isinstance(attrs, Mapping):
            return torch.tensor(list(encode_attributes(attrs, self.missing, path).values()), dtype=torch.long)
        rows = [list(encode_attributes(a, self.missing, path).values()) for a in attrs]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(ATTRIBUTE_NAMES))


class EncodeAttributesd(MapTransform):
    """Dictionary version of :class:`EncodeAttributes`: writes ``<key><postfix>`` (default
    ``attributes`` -> ``attributes_labels``), keeping the names for reports. Errors name the item's
    ``case_id``."""

    def __init__(self, keys: KeysCollection = "attributes", missing: str = "error", postfix: str = "_labels", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.encoder = EncodeAttributes(missing)
        self.postfix = postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}{self.postfix}"] = self.encoder(d[key], path=d.get("case_id"))
        return d
