"""Does a model's sentence say what its own mask shows?

Every sentence a model wrote about a case (MedSegText's per-slice findings now; the text that guided a
text-guided model next) is read back with the tolerant LViT parser and compared with the finding derived
from the mask by the report's one geometry (:func:`segreport.run.report.describe_lesions`): the
patient sides, the number of infected areas and the zones. A slice sentence is compared with that
slice of the mask, its lesion voxels keeping the zones the 3D geometry gave them, so the check is the
same rule that wrote the training sentences. Only sentences in the finding grammar are checked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..text.findings import NO_FINDING, parse_finding
from ..transforms.findings import Findings, FindingsFromMask, slice_finding
from ..transforms.slicing import axial_axis, plane_index
from ..vocab import ZONES


def _sides(zones) -> set[str]:
    return {z.split("_")[1] for z in zones}


def compare(text: str, derived_n: int, derived_zones, source: str) -> dict | None:
    """One check; None when ``text`` is not a finding sentence (nothing to compare)."""
    parsed = parse_finding(text)
    if parsed.laterality is None and parsed.n_areas is None and not parsed.zones and text.strip() != NO_FINDING:
        return None
    said_n = parsed.n_areas if parsed.n_areas is not None else (0 if text.strip() == NO_FINDING else None)
    differences = []
    if _sides(parsed.zones) != _sides(derived_zones):
        differences.append(f"sides: text {sorted(_sides(parsed.zones)) or 'none'}, mask {sorted(_sides(derived_zones)) or 'none'}")
    if said_n is not None and said_n != derived_n:
        differences.append(f"areas: text {said_n}, mask {derived_n}")
    if set(parsed.zones) != set(derived_zones):
        order = {z: i for i, z in enumerate(ZONES)}
        differences.append("zones: text " + (", ".join(sorted(parsed.zones, key=order.get)) or "none")
                           + "; mask " + (", ".join(sorted(derived_zones, key=order.get)) or "none"))
    return {"source": source, "text": text, "agree": not differences, "differences": differences}


def check(slice_findings: Mapping[int, str], findings: Findings, affine: np.ndarray,
          case_sentences: Mapping[str, str] | None = None) -> dict:
    """The report's ``consistency`` block: one entry per checked sentence, and the counts."""
    items = []
    axis = axial_axis(affine)
    per_slice = FindingsFromMask(min_size=1)
    n_slices = findings.instances.shape[axis]
    for k, text in sorted(slice_findings.items()):
        if not 0 <= int(k) < n_slices:  # a model bug, not a disagreement about anatomy: say so
            items.append({"source": f"slice {k}", "text": text, "agree": False,
                          "differences": [f"slice index {k} is outside the image (0..{n_slices - 1})"]})
            continue
        at = plane_index(axis, int(k))
        instances_k, zones_k = np.ascontiguousarray(findings.instances[at]), np.ascontiguousarray(findings.voxel_zones[at])
        derived = per_slice.describe(instances_k > 0, affine=np.eye(4), zone_map=zones_k) if instances_k.any() else None
        item = compare(text, derived.n_areas if derived else 0, derived.zones if derived else [], f"slice {k}")
        if item is not None:
            items.append(item)
    for source, text in (case_sentences or {}).items():
        item = compare(text, len(findings.lesions), findings.zones, source)
        if item is not None:
            items.append(item)
    disagree = [it for it in items if not it["agree"]]
    return {"rule": "sides, area count and zones of each model sentence vs the mask's own geometry",
            "checked": len(items), "agree": len(items) - len(disagree), "disagree": len(disagree), "items": items}


def warning_lines(block: Mapping, limit: int = 10) -> list[str]:
    """TXT report lines for the sentences that disagree with the mask."""
    if not block.get("checked"):
        return []
    bad = [it for it in block["items"] if not it["agree"]]
    lines = [f"Consistency: {block['agree']} of {block['checked']} sentence(s) agree with the mask"]
    lines += [f"WARNING: {it['source']}: " + ("the mask does not follow the sentence that guided it"
                                              if it["source"].startswith("guide text") else
                                              "the model's sentence disagrees with its mask")
              + f" ({'; '.join(it['differences'])})" for it in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"WARNING: {len(bad) - limit} more sentence(s) disagree (see the JSON report's consistency block)")
    return lines


def sentence_agrees(text: str, mask: np.ndarray, zone_map: np.ndarray) -> bool:
    """Whether a generated slice sentence names the sides, areas and zones of ``mask`` on ``zone_map``
    (by the rules that wrote the training sentences: :func:`~segreport.transforms.findings.slice_finding`)."""
    found = slice_finding(mask, zone_map)
    checked = compare(text, found.n_areas, found.zones, "slice")
    return bool(checked is not None and checked["agree"])
