"""Per-lesion statistics, report JSON/TXT and preview montage, on a world-defined chest phantom.

The phantom is drawn in world (RAS mm) coordinates through its affine, so the same patient can be
stored in any voxel order and spacing and the report must not change: sides, zones, centroids and
volumes are checked against the planted lesions, not against what the code computed before.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from nibabel.orientations import axcodes2ornt, io_orientation
from PIL import Image

from segreport.inference.predictor import LesionAttributes, Prediction
from segreport.run.preview import _display, pick_slices, save_preview
from segreport.transforms.slicing import axial_axis
from segreport.run.report import (
    build_report,
    format_report_text,
    label_lesions,
    lung_regions,
    write_json,
)

# planted lesions: (world centre RAS mm, radius mm, HU). +x is the patient's RIGHT.
UPPER_LEFT = ((-75.0, 0.0, 50.0), 22.0, -40.0)
LOWER_RIGHT = ((75.0, 10.0, -50.0), 18.0, 20.0)


def chest_affine(shape, spacing, axcodes: str) -> np.ndarray:
    """Affine storing ``shape`` voxels with ``spacing`` in the orientation ``axcodes``, centred on 0."""
    ornt = axcodes2ornt(tuple(axcodes))
    affine = np.diag([0.0, 0.0, 0.0, 1.0])
    for d, (world_axis, sign) in enumerate(ornt):
        affine[int(world_axis), d] = sign * spacing[d]
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def make_chest(shape=(48, 48, 16), spacing=(7.0, 7.0, 15.0), axcodes="LPS", lesions=(UPPER_LEFT, LOWER_RIGHT),
               lungs=True, seed=0):
    """CT in HU (air, soft-tissue body, two lungs, dense spherical lesions, noise), its affine and the
    ground-truth lesion mask. Lungs are ellipsoids at world x = +-75 mm, the body an elliptic cylinder."""
    affine = chest_affine(shape, spacing, axcodes)
    ijk = np.indices(shape).reshape(3, -1).T
    x, y, z = (ijk @ affine[:3, :3].T + affine[:3, 3]).T
    world_axis = {int(a): d for d, (a, _) in enumerate(axcodes2ornt(tuple(axcodes)))}
    z_half = 0.5 * shape[world_axis[2]] * spacing[world_axis[2]]
    ct = np.full(x.shape, -1000.0)
    ct[(x / 150) ** 2 + (y / 110) ** 2 <= 1] = 40.0
    if lungs:
        for cx in (-75.0, 75.0):
            ct[((x - cx) / 58) ** 2 + (y / 85) ** 2 + (z / (0.8 * z_half)) ** 2 <= 1] = -850.0
    truth = np.zeros(x.shape, dtype=np.uint8)
    for (cx, cy, cz), radius, hu in lesions:
        ball = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius ** 2
        ct[ball] = hu
        truth[ball] = 1
    ct += np.random.default_rng(seed).normal(0, 15, ct.shape)
    return ct.reshape(shape).astype(np.float32), affine, truth.reshape(shape)


def _report(ct, affine, mask, **kwargs):
    return build_report(Prediction(mask=mask, **kwargs), ct, affine, case_id="c1", model="test")


@pytest.fixture(scope="module")
def lps_case():
    ct, affine, truth = make_chest(axcodes="LPS")
    return ct, affine, truth, _report(ct, affine, truth)


def test_lesions_are_placed_and_measured_from_the_affine(lps_case):
    ct, affine, truth, report = lps_case
    assert report["geometry"]["axcodes"] == "LPS" and report["geometry"]["shape"] == [48, 48, 16]
    assert report["n_lesions"] == 2
    big, small = report["lesions"]  # numbered by size: the 22 mm lesion first
    assert (big["id"], small["id"]) == (1, 2) and big["voxels"] > small["voxels"]
    voxel_ml = 7 * 7 * 15 / 1000
    for lesion, ((cx, cy, cz), radius, hu), side, zone in ((big, UPPER_LEFT, "left", "upper_left"),
                                                           (small, LOWER_RIGHT, "right", "lower_right")):
        assert lesion["side"] == side and lesion["zone"] == zone
        # centroid within one voxel of the planted centre, in world mm
        assert np.allclose(lesion["centroid_ras_mm"], (cx, cy, cz), atol=8.0), lesion["centroid_ras_mm"]
        assert lesion["volume_ml"] == pytest.approx(lesion["voxels"] * voxel_ml, rel=1e-3)
        assert lesion["volume_ml"] == pytest.approx(4 / 3 * np.pi * radius ** 3 / 1000, rel=0.5)
        assert abs(lesion["hu_mean"] - hu) < 10 and 5 < lesion["hu_std"] < 25
        centre_voxel = np.linalg.solve(affine, [cx, cy, cz, 1])[:3]
        lo, hi = np.array(lesion["bbox_voxel"]["min"]), np.array(lesion["bbox_voxel"]["max"])
        assert np.all(lo <= centre_voxel + 0.5) and np.all(centre_voxel - 0.5 <= hi)
        assert lesion["in_lung_fraction"] > 0.9
    assert report["total_volume_ml"] == pytest.approx(big["volume_ml"] + small["volume_ml"], abs=1e-3)
    assert report["finding"] == "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert report["finding_source"].startswith("lesion geometry")
    assert report["lung"]["volume_ml"]["left"] > 100 and report["lung"]["volume_ml"]["right"] > 100
    assert 0 < report["lung"]["involvement_percent"] < 25 and report["lung"]["severity"] == "CT-1"


@pytest.mark.parametrize("axcodes,spacing", [("RAS", (7.0, 7.0, 15.0)), ("SLA", (15.0, 7.0, 7.0))])
def test_report_does_not_depend_on_voxel_order(lps_case, axcodes, spacing):
    """The same patient stored RAS, or slice-first and flipped: identical lesions in world terms."""
    ref = lps_case[3]
    shape = {"RAS": (48, 48, 16), "SLA": (16, 48, 48)}[axcodes]
    ct, affine, truth = make_chest(shape=shape, spacing=spacing, axcodes=axcodes)
    report = _report(ct, affine, truth)
    assert report["geometry"]["axcodes"] == axcodes
    assert report["finding"] == ref["finding"]
    for a, b in zip(report["lesions"], ref["lesions"]):
        assert (a["side"], a["zone"], a["voxels"]) == (b["side"], b["zone"], b["voxels"])
        np.testing.assert_allclose(a["centroid_ras_mm"], b["centroid_ras_mm"], atol=0.05)


def test_attributes_go_to_the_lesion_containing_their_voxel(lps_case):
    ct, affine, truth, _ = lps_case
    inside_small = np.linalg.solve(affine, [*LOWER_RIGHT[0], 1])[:3].round().astype(int)
    attrs = {"density": {"label": "hyperdense", "prob": 0.7, "probs": {"hypodense": 0.1, "isodense": 0.2, "hyperdense": 0.7}}}
    report = _report(ct, affine, truth, lesion_attributes=[
        LesionAttributes(tuple(inside_small), attrs),
        LesionAttributes((0, 0, 0), {"density": {"label": "isodense", "prob": 0.5}}),
    ])
    assert report["lesions"][0]["attributes"] is None
    assert report["lesions"][1]["attributes"] == attrs
    assert [u["voxel"] for u in report["unmatched_attributes"]] == [[0, 0, 0]]
    text = format_report_text(report)
    assert "density hyperdense (0.70)" in text and report["finding"] in text


def test_model_finding_is_kept_and_lesion_outside_the_lung_still_gets_a_zone():
    # a lesion straddling the right lung's lateral pleura: partly in lung, partly in the chest wall
    pleural = ((125.0, 0.0, 0.0), 20.0, 30.0)
    ct, affine, truth = make_chest(lesions=(pleural,), axcodes="RAS")
    finding = "Unilateral pulmonary infection, one infected area, middle right lung."
    report = _report(ct, affine, truth, case_finding=finding, slice_findings={8: "slice sentence"})
    (lesion,) = report["lesions"]
    assert 0.05 < lesion["in_lung_fraction"] < 0.95
    assert lesion["side"] == "right" and lesion["zone"] == "middle_right"
    assert report["finding"] == finding and report["finding_source"] == "model"
    assert report["slice_findings"] == {"8": "slice sentence"}


def test_without_lungs_the_side_follows_the_body_midline():
    ct, affine, truth = make_chest(lungs=False, lesions=(((-60.0, 0.0, 0.0), 20.0, 300.0),), axcodes="LPS")
    lung, zones = lung_regions(ct, affine)
    assert not lung.any()
    report = _report(ct, affine, truth)
    assert report["lesions"] == [] and report["n_lesions"] == 0  # never called pulmonary without a lung
    (lesion,) = report["lesions_outside_lungs"]
    assert lesion["side"] == "left" and lesion["zone"] is None and report["lung"]["involvement_percent"] is None
    assert report["finding"] == "No lung found in the scan; 1 lesion(s) outside the lungs are listed apart."
    assert "Outside the lungs (not called pulmonary infection): 1" in format_report_text(report)


def test_empty_mask_and_min_voxels():
    ct, affine, truth = make_chest(lesions=())
    report = _report(ct, affine, truth)
    assert report["n_lesions"] == 0 and report["finding"] == "No pulmonary infection."
    assert report["lesions"] == [] and report["total_volume_ml"] == 0
    mask = np.zeros_like(truth)
    mask[10, 10, 5] = 1  # one speck and one 2x2x2 cube
    mask[20:22, 20:22, 8:10] = 1
    instances, box = label_lesions(mask, min_voxels=2)
    assert instances.max() == 1 and box == (slice(20, 22), slice(20, 22), slice(8, 10))  # the kept lesions' box


def test_write_json_is_strict_and_atomic(tmp_path):
    path = write_json({"a": float("nan"), "b": np.float32(1.5), "c": np.arange(2)}, tmp_path / "r.json")
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [0, 1]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------------ preview


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "SLA"])
def test_display_puts_patient_right_left_and_anterior_up(axcodes):
    shape = {"SLA": (16, 48, 48)}.get(axcodes, (48, 48, 16))
    spacing = {"SLA": (15.0, 7.0, 7.0)}.get(axcodes, (7.0, 7.0, 15.0))
    affine = chest_affine(shape, spacing, axcodes)
    vol = np.zeros(shape)
    # a marker on the patient's right (+x), anterior (+y), at z = 0
    ijk = np.round(np.linalg.solve(affine, [100.0, 100.0, 0.0, 1])[:3]).astype(int)
    vol[tuple(ijk)] = 1
    axis = axial_axis(affine)
    plane = _display(np.take(vol, ijk[axis], axis=axis), tuple(a for a in range(3) if a != axis), io_orientation(affine))
    r, c = np.argwhere(plane)[0]
    assert r < plane.shape[0] / 2 and c < plane.shape[1] / 2  # top-left: anterior, patient's right


def test_preview_picks_lesion_slices_and_writes_a_png(lps_case, tmp_path):
    ct, affine, truth, report = lps_case
    instances, box = label_lesions(truth)
    slices = pick_slices(instances, box, 2, ct.shape[2], n_panels=4)
    assert len(slices) == 4
    for lesion in report["lesions"]:  # each lesion's largest cross-section is shown
        k = int(round(lesion["centroid_voxel"][2]))
        assert any(abs(k - s) <= 1 for s in slices)
    lung, _ = lung_regions(ct, affine)
    path = save_preview(tmp_path / "p.png", ct, truth, affine, caption=report["finding"], title="c1", lung=lung)
    img = Image.open(path)
    assert img.format == "PNG" and img.size[0] >= 600
    pixels = np.asarray(img.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 50  # the mask outline is drawn
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
    # no lesion: panels spread over the lungs, still a picture
    empty = save_preview(tmp_path / "e.png", ct, np.zeros_like(truth), affine, caption="No finding.", lung=lung)
    assert Image.open(empty).size[0] > 0


def test_lesions_outside_the_lungs_are_never_called_pulmonary(phantom_dir, shared_data):
    """A phantom case's lesions plus a blob in soft tissue outside the lungs: the finding and the lung
    involvement cover the lung lesions only; the blob is listed apart with where it is. On a real
    abdomen/pelvis CT (no lungs) nothing is called pulmonary infection."""
    from segreport.data.io import load_volume

    ct, affine, _ = load_volume(phantom_dir / "imagesTr" / "case_0001.nii.gz")
    label = load_volume(phantom_dir / "labelsTr" / "case_0001.nii.gz")[0] > 0
    lung, zones = lung_regions(ct, affine)
    tissue = np.argwhere((ct > 0) & (ct < 100) & ~ndimage.binary_dilation(lung > 0, iterations=3))
    blob = np.zeros_like(label)
    c = tissue[len(tissue) // 2]
    blob[c[0] - 2:c[0] + 3, c[1] - 2:c[1] + 3, c[2]:c[2] + 2] = True
    alone = build_report(Prediction(mask=label.astype(np.uint8)), ct, affine, case_id="a", lung=lung, zone_map=zones)
    both = build_report(Prediction(mask=(label | blob).astype(np.uint8)), ct, affine, case_id="b", lung=lung, zone_map=zones)
    assert both["finding"] == alone["finding"] and both["n_lesions"] == alone["n_lesions"]
    assert both["lung"]["involvement_percent"] == alone["lung"]["involvement_percent"]
    (outside,) = both["lesions_outside_lungs"]
    assert outside["voxels"] == int(blob.sum()) and outside["in_lung_fraction"] == 0.0
    assert both["consistency"]["lesions_outside_lungs"] == 1

    real, real_affine, _ = load_volume(shared_data / "totalsegmentator" / "example_ct.nii.gz")
    gut = np.zeros(real.shape, np.uint8)
    gut[50:60, 40:50, 50:60] = 1  # whatever a model might mark in the abdomen
    report = build_report(Prediction(mask=gut), real, real_affine, case_id="abdomen")
    assert report["n_lesions"] == 0 and report["total_volume_ml"] == 0 and "pulmonary infection" not in report["finding"]
    assert report["volume_outside_lungs_ml"] > 0


def _world_summary(report: dict) -> dict:
    """What a report says about the patient, without the storage-dependent fields (voxel indices, axcodes)."""
    return {
        "finding": report["finding"],
        "lung_ml": {k: round(v, 1) for k, v in report["lung"]["volume_ml"].items()},
        "lesions": [(les["side"], les["zone"], les["voxels"], tuple(np.round(les["centroid_ras_mm"], 1)))
                    for les in report["lesions"]],
        "outside": [(les["side"], les["voxels"]) for les in report["lesions_outside_lungs"]],
    }


def _reports_agree_in_every_storage_order(ct, affine, mask):
    from storage_orders import storage_orders

    reference = _world_summary(_report(ct, affine, mask))
    assert reference["lesions"] and min(reference["lung_ml"].values()) > 10
    mask_stored = dict(((p, f), (m, a)) for p, f, m, a in storage_orders(mask, affine))
    for perm, flips, stored, stored_affine in storage_orders(ct, affine):
        got = _world_summary(_report(stored, stored_affine, mask_stored[perm, flips][0]))
        assert got == reference, f"axis order {perm}, flips {flips}"


def test_the_report_of_a_real_ct_is_the_same_in_all_48_storage_orders(shared_data):
    """Issue 32, item 5: the report, not only the lung mask, whatever the voxel order (TotalSegmentator's
    real CT, with a lesion marked deep in each lung)."""
    import nibabel as nib

    from segreport.transforms.lung_mask import lung_mask_from_ct
    from segreport.transforms.lung_regions import lung_label_from_lobes

    ts = shared_data / "totalsegmentator"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    ct = np.asarray(img.dataobj, dtype=np.float32)
    lobes = lung_label_from_lobes(np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj))
    lobes[~lung_mask_from_ct(ct, img.affine)] = 0  # where the report's own lung mask is too
    mask = np.zeros(ct.shape, np.uint8)
    for side in (1, 2):
        depth = ndimage.distance_transform_edt(lobes == side)
        centre = np.unravel_index(np.argmax(depth), depth.shape)
        ball = np.zeros(ct.shape, bool)
        ball[centre] = True
        mask |= ndimage.binary_dilation(ball, iterations=2) & (lobes == side)
    _reports_agree_in_every_storage_order(ct, img.affine, mask)


def test_the_report_of_a_phantom_case_is_the_same_in_all_48_storage_orders(phantom_dir):
    import nibabel as nib

    img = nib.load(phantom_dir / "imagesTr" / "case_0000.nii.gz")
    label = np.asarray(nib.load(phantom_dir / "labelsTr" / "case_0000.nii.gz").dataobj) > 0
    _reports_agree_in_every_storage_order(np.asarray(img.dataobj, dtype=np.float32), img.affine, label.astype(np.uint8))


def test_preview_colours_and_caption_come_from_the_report(tmp_path):
    """Issue 36: a lesion in each lung and one in the mediastinum. The caption lists each numbered lesion
    where the report puts it (side and zone), the one outside the lungs apart; the overlay draws it in the
    'outside the lungs' colour, the others in the pulmonary one; the legend says which is which."""
    from segreport.run.preview import OUTSIDE, PULMONARY, lesion_descriptions, preview_caption

    mediastinum = ((0.0, 95.0, 0.0), 12.0, 40.0)  # anterior, between the lungs, inside the body
    ct, affine, truth = make_chest(axcodes="LPS", lesions=(UPPER_LEFT, LOWER_RIGHT, mediastinum))
    lung, zones = lung_regions(ct, affine)
    report = build_report(Prediction(mask=truth), ct, affine, case_id="c1", model="test", lung=lung, zone_map=zones)
    assert report["n_lesions"] == 2 and report["n_lesions_outside_lungs"] == 1
    described = lesion_descriptions(report)
    caption = preview_caption(report)
    for les in report["lesions"]:
        assert described[les["id"]][0] and f"#{les['id']} {les['zone'].replace('_', ' ')} lung" in caption
    assert {les["zone"] for les in report["lesions"]} == {"upper_left", "lower_right"}
    (outside,) = report["lesions_outside_lungs"]
    assert not described[outside["id"]][0]
    assert caption.index("Outside the lungs") < caption.index(f"#{outside['id']} patient's")
    assert caption.startswith(report["finding"])

    path = save_preview(tmp_path / "p.png", ct, truth, affine, title="c1", lung=lung, report=report, n_panels=16, columns=4)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)

    def share(colour: str) -> int:
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels - rgb).sum(axis=-1) < 30).sum())

    assert share(PULMONARY) > 50 and share(OUTSIDE) > 50  # both kinds drawn, each in its own colour
    without = save_preview(tmp_path / "q.png", ct, truth, affine, caption="x", title="c1", lung=lung)
    pixels = np.asarray(Image.open(without).convert("RGB")).astype(int)
    legend_only = share(OUTSIDE)  # without the report every lesion is drawn as pulmonary: blue is the legend's alone
    assert 0 < legend_only < 50
