"""The folder evaluator: predictions written by `segreport infer` scored against ground truth."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from segreport.data.io import save_nifti
from segreport.errors import InputError
from segreport.inference.evaluate_folder import evaluate_folder
from segreport.inference.predictor import Prediction
from segreport.data.outputs import write_json
from segreport.run.report import build_report
from segreport.transforms.findings import label_components


def _write_prediction(folder, case, mask, affine, ct, attributes_for=None):
    save_nifti(mask.astype(np.uint8), affine, folder / f"{case}_seg.nii.gz")
    report = build_report(Prediction(mask=mask), ct, affine, case_id=case)
    for les in report["lesions"]:
        les["attributes"] = attributes_for(les) if attributes_for else None
    write_json(report, folder / f"{case}_report.json")
    return report


def test_scores_masks_text_and_attributes_and_reports_bad_cases(phantom_dir, tmp_path):
    dataset = json.loads((phantom_dir / "dataset.json").read_text())
    item = next(it for it in dataset["training"] if it["attributes"])
    case = item["case_id"]
    img = nib.load(phantom_dir / item["label"])
    label, affine = np.asarray(img.dataobj), img.affine
    ct = np.asarray(nib.load(phantom_dir / item["image"]).dataobj, dtype=np.float32)
    lesions = np.asarray(nib.load(phantom_dir / item["lesions"]).dataobj)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()

    # case 1: the ground truth itself, with every lesion's true attributes, except "shape" always wrong
    instances, _ = label_components(label > 0, 1, affine)  # the report's ids
    truth_by_pred = {}
    for annotated in item["attributes"]:
        ids = instances[lesions == annotated["id"]]
        if ids.any():
            truth_by_pred[int(np.bincount(ids[ids > 0]).argmax())] = annotated

    def attributes(les):
        a = truth_by_pred.get(les["id"], {})
        return {g: {"label": ("wall thickening" if a.get("shape") != "wall thickening" else "irregular") if g == "shape" else a.get(g)}
                for g in ("shape", "invasion", "density", "heterogeneity", "surface")}

    _write_prediction(pred_dir, case, label > 0, affine, ct, attributes)
    # case 2: on a different grid (not the label's): an error row, the run goes on
    other = next(it for it in dataset["training"] if it["case_id"] != case)
    save_nifti(np.zeros((8, 8, 8), np.uint8), np.eye(4), pred_dir / f"{other['case_id']}_seg.nii.gz")
    # case 3: no ground truth at all
    save_nifti(np.zeros((8, 8, 8), np.uint8), np.eye(4), pred_dir / "stranger_seg.nii.gz")

    labels = {c: phantom_dir / "labelsTr" / f"{c}.nii.gz" for c in (case, other["case_id"])}
    metrics = evaluate_folder(pred_dir, labels, tmp_path / "eval", phantom_dir / "dataset.json")
    assert metrics["n_cases"] == 3 and metrics["n_scored"] == 1 and metrics["n_failed"] == 2
    assert metrics["dice"]["mean"] == 1.0 and metrics["hd95_mm"]["mean"] == 0.0
    acc = metrics["attribute_accuracy"]
    assert acc["shape"] == 0.0 and acc["density"] == 1.0 and acc["n_lesions"]["density"] == len(item["attributes"])
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "eval" / "per_case.csv"))}
    assert "does not match the label" in rows[other["case_id"]]["error"]
    assert "no ground truth" in rows["stranger"]["error"]
    assert rows[case]["reference"] == item["text"] and rows[case]["finding"]
    assert 0.0 <= metrics["text"]["bleu4"] <= 1.0


def test_empty_prediction_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no <case>_seg.nii.gz predictions"):
        evaluate_folder(tmp_path, tmp_path)


def test_cli_evaluate(phantom_dir, tmp_path, capsys):
    from segreport.cli import main

    label = phantom_dir / "labelsTr" / "case_0001.nii.gz"
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    (tmp_path / "p" / "case_0001_seg.nii.gz").write_bytes(label.read_bytes())
    (tmp_path / "g" / "case_0001.nii.gz").write_bytes(label.read_bytes())
    assert main(["evaluate", "-p", str(tmp_path / "p"), "-g", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["dice"]["mean"] == 1.0
    assert main(["evaluate", "-p", str(tmp_path / "empty"), "-g", str(phantom_dir / "labelsTr")]) == 2
    # labels without predictions are failed cases, and the run says so with exit 1
    assert main(["evaluate", "-p", str(tmp_path / "p"), "-g", str(phantom_dir / "labelsTr")]) == 1
    assert "not scored" in capsys.readouterr().err


def test_labels_that_are_not_binary_and_labels_without_predictions_fail_by_name(phantom_dir, tmp_path):
    """Issue 32, item 8: a label value -1 gave HD95 496 mm, a lung class 2 was scored as lesion, a label
    without a prediction was silently left out."""
    img = nib.load(phantom_dir / "labelsTr" / "case_0001.nii.gz")
    label = (np.asarray(img.dataobj) > 0).astype(np.int16)
    pred, gt = tmp_path / "p", tmp_path / "g"
    pred.mkdir(), gt.mkdir()
    for case, value in (("signed", -1), ("lung_class", 2), ("fine", 1)):
        save_nifti(label, img.affine, pred / f"{case}_seg.nii.gz")
        bad = label.copy()
        bad[0, 0, 0] = value
        save_nifti(bad, img.affine, gt / f"{case}.nii.gz")
    save_nifti(label, img.affine, gt / "unpredicted.nii.gz")
    metrics = evaluate_folder(pred, gt, tmp_path / "eval")
    assert metrics["n_cases"] == 4 and metrics["n_scored"] == 1 and metrics["hd95_mm"]["mean"] == 0.0
    rows = {r["case_id"]: r for r in csv.DictReader(open(tmp_path / "eval" / "per_case.csv"))}
    assert "values -1 outside {0, 1}" in rows["signed"]["error"] and "signed.nii.gz" in rows["signed"]["error"]
    assert "values 2 outside {0, 1}" in rows["lung_class"]["error"]
    assert "no prediction unpredicted_seg.nii.gz" in rows["unpredicted"]["error"]
