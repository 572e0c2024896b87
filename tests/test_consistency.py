"""The consistency block: a model's sentences checked against its own mask, on real MosMedData lesion
masks (LAS affine) and on sentences made to disagree."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from segreport.inference.predictor import Prediction
from segreport.metrics import consistency
from segreport.run.report import build_report, describe_lesions, format_report_text
from segreport.transforms.findings import FindingsFromMask
from segreport.transforms.slicing import axial_axis

MASKS = ("study_0255_mask.nii.gz", "study_0262_mask.nii.gz", "study_0280_mask.nii.gz", "study_0301_mask.nii.gz")


def _whole_fov_lung(mask, affine):
    """These masks ship without a CT: take the whole field of view as lung (sides from the affine)."""
    from segreport.transforms.lung_mask import split_left_right
    from segreport.transforms.lung_regions import lung_zone_map

    lung = split_left_right(np.ones(mask.shape, bool), affine)
    return lung, lung_zone_map(lung, affine)


def _real(shared_data, name):
    img = nib.load(shared_data / "mosmeddata_masks" / "masks" / name)
    mask = (np.asarray(img.dataobj) > 0).astype(np.uint8)
    if not mask.any():
        pytest.skip(f"{name} is empty")
    return mask, img.affine


def _slice_sentences(mask, affine, findings):
    """What a perfect slice-wise model would write: the finding of each slice, by the same rule."""
    axis = axial_axis(affine)
    out = {}
    for k in np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))):
        inst, zones = np.take(findings.instances, k, axis=axis), np.take(findings.voxel_zones, k, axis=axis)
        out[int(k)] = FindingsFromMask(min_size=1).describe(inst > 0, affine=np.eye(4), zone_map=zones).text
    return out


@pytest.mark.parametrize("name", MASKS)
def test_sentences_written_from_a_real_mask_agree_and_altered_ones_do_not(shared_data, name):
    mask, affine = _real(shared_data, name)
    image = np.full(mask.shape, -850.0, np.float32)  # no CT ships with these masks: sides about the field of view
    findings = describe_lesions(mask, image, affine, np.zeros(mask.shape, np.uint8), np.zeros(mask.shape, np.uint8))
    sentences = _slice_sentences(mask, affine, findings)
    block = consistency.check(sentences, findings, affine, {"case finding": findings.text})
    assert block["checked"] == len(sentences) + 1 and block["disagree"] == 0

    # made to disagree: swap left and right on one slice, add an area on another
    k1, k2 = sorted(sentences)[0], sorted(sentences)[-1]
    swapped = sentences[k1].replace("left", "LEFT").replace("right", "left").replace("LEFT", "right")
    more = FindingsFromMask(min_size=1)
    n2 = more.describe(np.take(findings.instances, k2, axis=axial_axis(affine)) > 0, affine=np.eye(4),
                       zone_map=np.take(findings.voxel_zones, k2, axis=axial_axis(affine))).n_areas
    from segreport.text.findings import number_word

    extra = sentences[k2].replace(f"{number_word(n2)} infected area", f"{number_word(n2 + 1)} infected area")
    bad = consistency.check({**sentences, k1: swapped, k2: extra}, findings, affine)
    wrong = {it["source"]: it for it in bad["items"] if not it["agree"]}
    if swapped != sentences[k1]:
        assert any(d.startswith("sides") or d.startswith("zones") for d in wrong[f"slice {k1}"]["differences"])
    assert f"areas: text {n2 + 1}, mask {n2}" in wrong[f"slice {k2}"]["differences"]


def test_report_carries_consistency_and_the_text_report_warns(shared_data):
    mask, affine = _real(shared_data, MASKS[0])
    image = np.full(mask.shape, -850.0, np.float32)
    axis = axial_axis(affine)
    k = int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0])
    other = (k + 1) % mask.shape[axis]
    prediction = Prediction(mask=mask, slice_findings={k: "No pulmonary infection.", other: "not a finding at all"})
    lung, zones = _whole_fov_lung(mask, affine)
    report = build_report(prediction, image, affine, case_id="s255", lung=lung, zone_map=zones)
    block = report["consistency"]
    assert block["checked"] == 1 and block["disagree"] == 1  # the non-grammar sentence is not judged
    assert block["items"][0]["differences"][0].startswith("sides: text none")
    assert "WARNING: slice %d: the model's sentence disagrees with its mask" % k in format_report_text(report)
    json.dumps(report)  # serialisable


def test_case_sentence_and_per_lesion_zones_come_from_one_geometry(shared_data):
    """The report's case sentence is exactly what its lesions' zones spell."""
    from segreport.text.findings import format_finding

    mask, affine = _real(shared_data, MASKS[2])
    image = np.full(mask.shape, -850.0, np.float32)
    lung, zones = _whole_fov_lung(mask, affine)
    report = build_report(Prediction(mask=mask), image, affine, case_id="x", lung=lung, zone_map=zones)
    findings = describe_lesions(mask, image, affine, lung, zones)
    assert report["n_lesions"] == len(findings.lesions)
    assert [les["side"] for les in report["lesions"]] == [max(f.zone_voxels, key=f.zone_voxels.get).split("_")[1]
                                                         for f in findings.lesions]
    assert report["mask_finding"] == findings.text and report["lesions_outside_lungs"] == []
    assert findings.text == format_finding(len(findings.lesions), {z for f in findings.lesions for z in f.zones})
