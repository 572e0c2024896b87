"""Shared vocabularies: lesion attribute groups (seed 001, Table 1) and the six lung zones.

Every module that names an attribute class or a lung zone imports it from here, so the phantom,
the transforms, the heads and the reports can never disagree on an index.
"""

from __future__ import annotations

# Seed 001, Table 1: five attribute groups, classes in a fixed order (index = class id).
ATTRIBUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "shape": ("round-like", "irregular", "wall thickening", "punctate/nodular"),
    "invasion": ("no close relationship", "close relationship with adjacent structures"),
    "density": ("hypodense", "isodense", "hyperdense"),
    "heterogeneity": ("homogeneous", "heterogeneous"),
    "surface": ("well-defined", "ill-defined margin"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTE_GROUPS)
ATTRIBUTE_NUM_CLASSES: dict[str, int] = {k: len(v) for k, v in ATTRIBUTE_GROUPS.items()}

# Lung sides are the PATIENT's, decided from the affine (RAS+ world: +x is toward the patient's RIGHT).
SIDES: tuple[str, ...] = ("left", "right")
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")  # craniocaudal thirds of each lung
# The six-zone multi-hot vector (seed 004 location labels) uses this order; zone maps use value i+1.
ZONES: tuple[str, ...] = tuple(f"{level}_{side}" for side in SIDES for level in LEVELS)
# Lung label values written by the phantom and expected by the findings transforms.
LUNG_LABELS: dict[str, int] = {"right": 1, "left": 2}

# Severity by percentage of lung involved (MosMedData CT-0..CT-4 convention).
SEVERITY_BINS: tuple[tuple[str, float], ...] = (("CT-0", 0.0), ("CT-1", 25.0), ("CT-2", 50.0), ("CT-3", 75.0), ("CT-4", 100.0))


def severity_from_percent(percent: float) -> str:
    """CT-0: no lesion; CT-1: <25 %; CT-2: 25-50 %; CT-3: 50-75 %; CT-4: >=75 % of lung involved."""
    if percent <= 0:
        return "CT-0"
    for name, upper in SEVERITY_BINS[1:]:
        if percent < upper:
            return name
    return "CT-4"

# The one minimum lesion size (mL, from the affine's voxel volume) below which a predicted component is a
# speck, not a lesion: applied to every model's mask before its report, and the default of every spec.
MIN_LESION_ML = 0.5

# A predicted lesion is pulmonary when at least this share of its voxels lies in the lung mask (lesions at
# the pleura leak over it); the others (bowel, muscle, outside air) are never called pulmonary infection:
# the report lists them apart with where they are, and the automatic 3D mode does not refine them.
PULMONARY_FRACTION = 0.1

# A scan whose HU lung mask holds less lung than this (mL) is not a chest CT for the lung-lesion models:
# refused with "no lungs found" unless overridden (--allow-no-lungs). Real adult lungs hold litres; an
# abdominal CT that only grazes the lung bases holds tens of mL (66 mL on TotalSegmentator's example).
MIN_LUNG_ML = 200.0

# Every phantom NIfTI's header description starts with this: how provenance tells phantom-trained models.
PHANTOM_MARK = "segreport phantom"
