"""Results must not depend on how a file stores its voxels: one CT stored as LPS, as RAS and with its
in-plane axes swapped (affines adjusted) gives the same masks in world space and the same findings,
for the slice-wise 2D model and the 3D prompt model. And every 2D path shows slices the same way."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from segreport.data.io import load_volume, save_nifti
from segreport.metrics.segmentation import dice
from segreport.models import lesion_report_3d as m3d
from segreport.models import medsegtext as mmst
from segreport.models.spec import read_checkpoint
from segreport.networks import MedSegText
from segreport.run.batch import run_batch
from segreport.text.tokenizers import build_word_tokenizer
from segreport.transforms.orientation import from_display, to_display


def _storages(path, out):
    """The same CT three ways: as stored (LPS), reoriented to RAS, and with axes 0/1 swapped."""
    img = nib.load(path)
    data, affine = np.asarray(img.dataobj), img.affine
    ras = nib.as_closest_canonical(img)
    swapped_affine = affine[:, [1, 0, 2, 3]]
    files = {"lps": (data, affine), "ras": (np.asarray(ras.dataobj), ras.affine),
             "swapped": (np.ascontiguousarray(data.transpose(1, 0, 2)), swapped_affine)}
    for name, (array, aff) in files.items():
        save_nifti(array, aff, out / f"{name}.nii.gz")
    assert "".join(nib.aff2axcodes(ras.affine)) == "RAS" and "".join(nib.aff2axcodes(swapped_affine)) == "PLS"
    return files


def _to_reference(mask, affine, ref_affine):
    """A mask on another storage of the same grid, put into the reference's voxel order."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), nib.orientations.io_orientation(ref_affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(mask, ornt))


def test_display_round_trip_and_orientation_on_a_real_ras_ct(shared_data):
    """Real TotalSegmentator CT (RAS): the display grid is PLS and the inverse is exact."""
    image, affine, _ = load_volume(shared_data / "totalsegmentator" / "example_ct.nii.gz")
    shown = to_display(image[None], affine)
    assert "".join(nib.aff2axcodes(np.asarray(shown.affine))) == "PLS"
    np.testing.assert_array_equal(from_display(shown.as_tensor(), shown)[0], image)
    # patient right on the image's left: column 0 of a display slice is the patient's right-most column
    aff = np.asarray(shown.affine)
    assert (aff @ [0, 0, 0, 1])[0] > (aff @ [0, shown.shape[2] - 1, 0, 1])[0]  # +x is the patient's right
    assert (aff @ [0, 0, 0, 1])[1] > (aff @ [shown.shape[1] - 1, 0, 0, 1])[1]  # row 0 is anterior


def test_volume_slices_for_training_match_the_lvit_png_export(phantom_dir):
    from segreport.training.medsegtext import volume_to_slice_items

    case = {"image": str(phantom_dir / "imagesTr" / "case_0001.nii.gz"), "label": str(phantom_dir / "labelsTr" / "case_0001.nii.gz"),
            "lung": str(phantom_dir / "lungsTr" / "case_0001.nii.gz"), "case_id": "case_0001"}
    items = {it["slice_index"]: it for it in volume_to_slice_items(case, mode="lesion")}
    pngs = {p.name: p for p in phantom_dir.glob("slices2d/*_Folder/labelcol/case_0001_s*.png")}
    assert items and pngs
    for k, item in items.items():
        png = pngs.get(f"case_0001_s{k:03d}.png")
        if png is not None:  # the export's slice k and the training slice k show the same pixels
            np.testing.assert_array_equal(np.asarray(Image.open(png)) > 127, item["label"][0] > 0.5)


@pytest.fixture(scope="module")
def three_storages(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("storages")
    return out, _storages(phantom_dir / "imagesTr" / "case_0001.nii.gz", out)


def _threshold_at(prob, share=0.03):
    return float(np.quantile(prob, 1 - share))  # an untrained model: keep its top 3 % so the mask is not trivial


def test_medsegtext_answer_does_not_depend_on_voxel_storage(three_storages, tmp_path):
    folder, files = three_storages
    tok = build_word_tokenizer(["Unilateral pulmonary infection, one infected area, lower left lung."])
    torch.manual_seed(0)
    net = MedSegText.from_config("tiny", vocab_size=len(tok), pad_id=0, bos_id=1, eos_id=2, max_length=12)
    torch.save({"model": net.state_dict(), "spec": mmst.spec_for(net, tok, 48, 12)}, tmp_path / "m.pt")
    predictor = mmst.predictor(*read_checkpoint(tmp_path / "m.pt"))
    ref_data, ref_affine = files["lps"]
    probs = {name: predictor.probabilities(a.astype(np.float32), aff)[0] for name, (a, aff) in files.items()}
    predictor.threshold = _threshold_at(probs["lps"])
    masks = {name: _to_reference(p > predictor.threshold, files[name][1], ref_affine) for name, p in probs.items()}
    assert masks["lps"].sum() > 100
    for name in ("ras", "swapped"):
        assert dice(masks[name], masks["lps"]) >= 0.99, name
    summary = run_batch(predictor, folder, tmp_path / "out", progress=False)
    findings = {row["case_id"]: row["finding"] for row in summary.cases}
    assert summary.counts["ok"] == 3 and len(set(findings.values())) == 1, findings


def test_3d_prompt_answer_does_not_depend_on_voxel_storage(three_storages, phantom_dir):
    _, files = three_storages
    torch.manual_seed(0)
    net = m3d.build_network(roi_size=32, spacing=(6.4, 6.4, 10.0))
    predictor = m3d.LesionReportPredictor(net)
    lesions = np.asarray(nib.load(phantom_dir / "lesionsTr" / "case_0001.nii.gz").dataobj)
    ref_affine = files["lps"][1]
    click_world = ref_affine @ np.r_[np.argwhere(lesions == 1).mean(0).round(), 1.0]
    probs = {}
    for name, (array, aff) in files.items():
        session = predictor.session()
        session.set_image(array.astype(np.float32), aff)
        session.click((np.linalg.inv(aff) @ click_world)[:3])
        probs[name] = _to_reference(session.probability(), aff, ref_affine)
    threshold = _threshold_at(probs["lps"][probs["lps"] > 0], share=0.3)  # inside the ROI footprint
    assert (probs["lps"] > threshold).sum() > 100
    # the same click in world space gives the same mask on every storage
    for name in ("ras", "swapped"):
        assert dice(probs[name] > threshold, probs["lps"] > threshold) >= 0.99, name
