"""Batch inference: real predictor over mixed folders (synthetic, real CT, DICOM, broken files), geometry,
summaries, manifest, resume/overwrite, atomic outputs, prefetch, points, CLI, monai.bundle route, torchrun.

The predictor here is a real (simple) model that obeys the contract in segreport/inference/predictor.py:
dense tissue inside the lung mask, found with torch smoothing + a HU threshold, with per-lesion
density attributes. The bundle folders written by the tests wire it with ``_target_`` like a real
bundle, so the CLI and the config route are exercised end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from segreport.data.io import load_volume
from segreport.run import batch
from segreport.run.batch import (
    Case,
    OutputExistsError,
    discover_cases,
    prefetch,
    run_batch,
)
from segreport.run.infer_cli import main
from segreport.inference.predictor import LesionAttributes, Prediction
from segreport.run.report import lung_regions
from segreport.transforms.lung_mask import lung_mask_from_ct
from segreport.vocab import ATTRIBUTE_GROUPS
from test_report import LOWER_RIGHT, UPPER_LEFT, make_chest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
OUTPUT_KINDS = ("_seg.nii.gz", "_lesions.nii.gz", "_report.json", "_report.txt", "_preview.png")


class ThresholdPredictor:
    """Dense lesions in lung: 3x3x3-smoothed HU above ``threshold`` inside the eroded lung mask.

    ``checkpoint``: a JSON file holding the threshold (this model's "weights"). Positive clicks keep only
    the lesions they touch. Density attributes come from each lesion's mean HU.
    """

    name = "hu-threshold"
    DENSITY_HU = {"hypodense": -600.0, "isodense": -200.0, "hyperdense": 50.0}

    def __init__(self, threshold: float = -500.0, checkpoint: str | None = None, device: str = "cpu", min_voxels: int = 3):
        if checkpoint:
            threshold = json.loads(Path(checkpoint).read_text())["threshold"]
        self.threshold, self.min_voxels = float(threshold), min_voxels
        self.checkpoint_path, self.device = checkpoint, device
        self.calls, self.lungs = 0, []

    def predict(self, image, affine, points=None, point_labels=None, lung=None) -> Prediction:
        self.calls += 1
        self.lungs.append(lung)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(self.device)
        smooth = F.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)[0, 0].float().cpu().numpy()
        lung = ndimage.binary_erosion(lung_mask_from_ct(image))
        labels, n = ndimage.label((smooth > self.threshold) & lung, ndimage.generate_binary_structure(3, 3))
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= self.min_voxels
        keep[0] = False
        if points:
            clicked = {int(labels[tuple(p)]) for p, lab in zip(points, point_labels) if lab == 1}
            keep &= np.isin(np.arange(n + 1), list(clicked))
        mask = keep[labels]
        attributes = []
        for c in np.flatnonzero(keep):
            voxels = np.argwhere(labels == c)
            hu = image[labels == c]
            anchor = tuple(int(v) for v in voxels[np.argmax(hu)])
            score = np.array([-abs(hu.mean() - centre) / 150.0 for centre in self.DENSITY_HU.values()])
            probs = np.exp(score - score.max()) / np.exp(score - score.max()).sum()
            names = ATTRIBUTE_GROUPS["density"]
            attributes.append(LesionAttributes(anchor, {"density": {
                "label": names[int(np.argmax(probs))], "prob": float(probs.max()),
                "probs": {k: float(p) for k, p in zip(names, probs)}}}))
        return Prediction(
            mask=mask.astype(np.uint8),
            lesion_attributes=attributes,
            extras={"inference_mode": torch.is_inference_mode_enabled(),
                    "autocast_bf16": torch.is_autocast_enabled(torch.device(self.device).type)},
        )


class InterruptingPredictor(ThresholdPredictor):
    """Stops the run (like Ctrl-C) on its ``stop_at``-th call."""

    def __init__(self, stop_at: int, **kwargs):
        super().__init__(**kwargs)
        self.stop_at = stop_at

    def predict(self, image, affine, points=None, point_labels=None, lung=None):
        if self.calls + 1 == self.stop_at:
            raise KeyboardInterrupt
        return super().predict(image, affine, points, point_labels, lung)


def write_bundle(root: Path, threshold: float = -500.0) -> Path:
    """A bundle folder whose inference.json builds ThresholdPredictor from a checkpoint file."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "threshold.json").write_text(json.dumps({"threshold": threshold}))
    (root / "configs" / "metadata.json").write_text(json.dumps({"name": "threshold_test", "version": "0.0.1"}))
    (root / "configs" / "inference.json").write_text(json.dumps({
        "imports": ["$import test_batch"], "bundle_root": ".", "device": "cpu", "bf16": False,
        "checkpoint": "$@bundle_root + '/models/threshold.json'",
        "predictor": {"_target_": "test_batch.ThresholdPredictor", "checkpoint": "@checkpoint", "device": "@device"}}))
    return root


def save_ct(path: Path, ct: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.round(ct).astype(np.int16), affine), path)
    return path


def files_under(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


# ---------------------------------------------------------------------------------- mixed folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, shared_data):
    """A folder of good synthetic volumes (two share a file name), the real TotalSegmentator CT and
    broken files, run through the CLI (OUTPUT_DIR beside the input folder: never inside it)."""
    root = tmp_path_factory.mktemp("mixed")
    data = root / "in"
    ct1, aff1, truth1 = make_chest(axcodes="LPS", spacing=(7.0, 7.0, 15.0))
    save_ct(data / "sub1" / "chest.nii.gz", ct1, aff1)
    ct2, aff2, truth2 = make_chest(shape=(52, 48, 20), spacing=(6.0, 6.5, 12.0), axcodes="RAS",
                                   lesions=(LOWER_RIGHT,), seed=1)
    save_ct(data / "sub2" / "chest.nii.gz", ct2, aff2)
    shutil.copy(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz", data / "real_ct.nii.gz")
    good = save_ct(root / "tmp.nii.gz", ct1, aff1).read_bytes()
    (data / "truncated.nii.gz").write_bytes(good[: len(good) // 2])
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.int16), np.eye(4)), data / "fourd.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), data / "flat.nii.gz")
    (data / "notes.nii.gz").write_text("this is a text file, not an image\n")
    (data / "readme.txt").write_text("not matched by the pattern\n")
    bundle = write_bundle(root / "bundle")
    out = root / "results"
    before = files_under(data)
    code = main(["--bundle", str(bundle), "-i", str(data), "-o", str(out), "--workers", "2", "--no-progress"])
    return {"root": root, "data": data, "out": out, "bundle": bundle, "code": code, "before": before,
            "truth": {"sub1__chest": truth1, "sub2__chest": truth2}}


def summary_rows(out: Path) -> dict[str, dict]:
    return {r["case_id"]: r for r in json.loads((out / "summary.json").read_text())["cases"]}


def test_bad_files_fail_clearly_and_the_run_goes_on(mixed):
    assert mixed["code"] == 1  # documented: non-zero when any case failed
    rows = summary_rows(mixed["out"])
    assert set(rows) == {"sub1__chest", "sub2__chest", "real_ct", "truncated", "fourd", "flat", "notes"}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"sub1__chest", "sub2__chest", "real_ct"}
    expected = {"truncated": "truncated or corrupt", "fourd": "expected a 3D image, got 4D",
                "flat": "expected a 3D image, got 2D", "notes": "not a readable NIfTI"}
    for case_id, problem in expected.items():
        row = rows[case_id]
        assert row["status"] == "failed" and f"{case_id}.nii.gz" in row["error"] and problem in row["error"], row
        assert not any((mixed["out"] / f"{case_id}{kind}").exists() for kind in OUTPUT_KINDS)
    with open(mixed["out"] / "summary.csv") as f:
        header = f.readline().strip().split(",")
    assert header == list(batch.SUMMARY_FIELDS)


def test_outputs_keep_the_input_geometry(mixed):
    data, out = mixed["data"], mixed["out"]
    for case_id, src in (("sub1__chest", "sub1/chest.nii.gz"), ("sub2__chest", "sub2/chest.nii.gz"),
                         ("real_ct", "real_ct.nii.gz")):
        inp, seg = nib.load(data / src), nib.load(out / f"{case_id}_seg.nii.gz")
        assert seg.shape == inp.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(seg.affine, inp.affine)
        np.testing.assert_allclose(seg.header.get_qform(), inp.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
        for kind in OUTPUT_KINDS:
            assert (out / f"{case_id}{kind}").stat().st_size > 0
    assert nib.aff2axcodes(nib.load(out / "sub1__chest_seg.nii.gz").affine) == ("L", "P", "S")


def test_reports_find_the_planted_lesions(mixed):
    out = mixed["out"]
    seg = np.asarray(nib.load(out / "sub1__chest_seg.nii.gz").dataobj)
    assert dice(seg, mixed["truth"]["sub1__chest"]) > 0.6
    report = json.loads((out / "sub1__chest_report.json").read_text())
    assert report["finding"] == "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."
    assert [(les["side"], les["zone"]) for les in report["lesions"]] == [("left", "upper_left"), ("right", "lower_right")]
    assert np.allclose(report["lesions"][0]["centroid_ras_mm"], UPPER_LEFT[0], atol=10)
    for les in report["lesions"]:  # each lesion got the attributes anchored inside it
        assert les["attributes"]["density"]["label"] in ("isodense", "hyperdense")
        assert sum(les["attributes"]["density"]["probs"].values()) == pytest.approx(1.0)
    assert report["unmatched_attributes"] == []
    assert report["extras"] == {"inference_mode": True, "autocast_bf16": False}
    # the instance map holds every report lesion's voxels under its id, on the input grid (LPS here)
    lesions = nib.load(out / "sub1__chest_lesions.nii.gz")
    ids = np.asarray(lesions.dataobj)
    np.testing.assert_array_equal(lesions.affine, nib.load(out / "sub1__chest_seg.nii.gz").affine)
    assert np.array_equal(ids > 0, seg > 0) and sorted(np.unique(ids[ids > 0])) == [les["id"] for les in report["lesions"]]
    for les in report["lesions"]:
        assert (ids == les["id"]).sum() == les["voxels"]
        assert ids[tuple(int(round(v)) for v in les["centroid_voxel"])] == les["id"]
    text = (out / "sub1__chest_report.txt").read_text()
    assert report["finding"] in text and "#2: right lung, lower zone" in text
    r2 = json.loads((out / "sub2__chest_report.json").read_text())
    assert r2["n_lesions"] == 1 and r2["lesions"][0]["side"] == "right" and r2["geometry"]["axcodes"] == "RAS"
    rows = summary_rows(out)
    assert rows["sub1__chest"]["n_lesions"] == 2
    assert rows["sub1__chest"]["total_volume_ml"] == pytest.approx(report["total_volume_ml"])
    assert all(rows["sub1__chest"][k] >= 0 for k in ("load_s", "wait_s", "predict_s", "write_s"))
    img = Image.open(out / "sub1__chest_preview.png")
    assert img.format == "PNG" and img.size[0] >= 600


def test_manifest_records_versions_model_and_checkpoint(mixed):
    manifest = json.loads((mixed["out"] / "manifest.json").read_text())
    ckpt = mixed["bundle"] / "models" / "threshold.json"
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert manifest["status"] == "finished" and manifest["end_time"] >= manifest["start_time"]
    assert manifest["counts"] == {"ok": 3, "failed": 4, "skipped": 0}
    assert manifest["model"]["name"] == "hu-threshold" and manifest["model"]["checkpoint"]["sha256"] == sha
    assert manifest["bundle"]["name"] == "threshold_test" and manifest["bundle"]["checkpoint"]["sha256"] == sha
    assert manifest["device"] == "cpu" and manifest["arguments"]["workers"] == 2
    for key in ("segreport", "torch", "monai", "numpy", "python"):
        assert manifest["versions"][key]


def test_nothing_written_outside_output_dir_and_no_temp_files(mixed):
    data, out = mixed["data"], mixed["out"]
    assert files_under(data) == mixed["before"]  # the input folder is byte-identical
    assert not [p for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    expected = {f"{c}{k}" for c in ("sub1__chest", "sub2__chest", "real_ct") for k in OUTPUT_KINDS}
    assert {p.name for p in out.iterdir()} == expected | {"summary.csv", "summary.json", "manifest.json"}


def test_rerun_refuses_then_resume_skips_then_overwrite_replaces(mixed, capsys):
    data, out, bundle = mixed["data"], mixed["out"], mixed["bundle"]
    args = ["--bundle", str(bundle), "-i", str(data), "-o", str(out), "--no-progress"]
    done = files_under(out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and str(out) in err
    assert files_under(out) == done  # refused before touching anything

    assert main(args + ["--resume"]) == 1  # the broken files are retried and fail again
    rows = summary_rows(out)
    assert {k for k, r in rows.items() if r["status"] == "skipped"} == {"sub1__chest", "sub2__chest", "real_ct"}
    assert rows["sub1__chest"]["n_lesions"] == 2  # carried over from the finished report
    after = files_under(out)
    for name, mtime in done.items():
        if name.endswith(OUTPUT_KINDS):
            assert after[name] == mtime, f"{name} rewritten by --resume"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arguments"]["resume"] and len(manifest["previous_runs"]) == 1

    os.remove(out / "sub2__chest_preview.png")  # an incomplete case is run again by --resume
    assert main(args + ["--resume"]) == 1
    assert summary_rows(out)["sub2__chest"]["status"] == "ok" and (out / "sub2__chest_preview.png").exists()

    assert main(args + ["--overwrite", "--workers", "0"]) == 1
    assert files_under(out)["sub1__chest_seg.nii.gz"] != done["sub1__chest_seg.nii.gz"]
    assert {r["status"] for r in summary_rows(out).values()} == {"ok", "failed"}


# --------------------------------------------------------------------- real scans, other geometry


def test_real_lps_nifti_and_dicom_series_keep_their_geometry(shared_data, tmp_path):
    ts = shared_data / "totalsegmentator"
    dicom = shutil.copytree(ts / "example_ct_dicom", tmp_path / "dicom" / "series1")
    cropped = ts / "pulmonary_report" / "ct_cropped.nii.gz"
    summary = run_batch(ThresholdPredictor(), [cropped, tmp_path / "dicom"], tmp_path / "out", progress=False)
    assert summary.counts == {"ok": 2, "failed": 0, "skipped": 0}, summary.cases
    seg = nib.load(tmp_path / "out" / "ct_cropped_seg.nii.gz")
    inp = nib.load(cropped)
    assert seg.shape == inp.shape == (122, 102, 112) and nib.aff2axcodes(seg.affine) == ("L", "P", "S")
    np.testing.assert_array_equal(seg.affine, inp.affine)
    # DICOM: the mask is written on the grid load_volume gives the series (RAS+ affine of the LPS data)
    image, affine, _ = load_volume(dicom)
    seg = nib.load(tmp_path / "out" / "series1_seg.nii.gz")
    assert seg.shape == image.shape == (512, 512, 20)
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    report = json.loads((tmp_path / "out" / "series1_report.json").read_text())
    assert report["input"] == str(dicom) and report["geometry"]["axcodes"] == "LPS"


def test_laterality_on_real_ct_from_totalsegmentator_lobes(shared_data, tmp_path):
    """A dense blob planted in the real CT's right lower lobe (TotalSegmentator's label, id 14) is
    reported in the RIGHT lung, also when the scan is stored with its first axis reversed."""
    ts = shared_data / "totalsegmentator"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    ct = np.asarray(img.dataobj, dtype=np.float32)
    lobe = np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj) == 14
    depth = ndimage.distance_transform_edt(lobe)
    depth[..., :3] = depth[..., -3:] = 0  # away from the first/last slices, so the blob is whole
    centre = np.unravel_index(np.argmax(depth), lobe.shape)
    ball = np.zeros(lobe.shape, bool)
    ball[centre] = True
    ball = ndimage.binary_dilation(ball, iterations=2) & lobe  # ~8 mm across, well inside the lobe
    ct[ball] = 30.0
    save_ct(tmp_path / "in" / "planted.nii.gz", ct, img.affine)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = ct.shape[0] - 1
    save_ct(tmp_path / "in" / "planted_flipped.nii.gz", ct[::-1], img.affine @ flip)
    run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False)
    for case_id in ("planted", "planted_flipped"):
        report = json.loads((tmp_path / "out" / f"{case_id}_report.json").read_text())
        near = [les for les in report["lesions"]
                if np.linalg.norm(np.subtract(les["centroid_ras_mm"], nib.affines.apply_affine(img.affine, centre))) < 6]
        assert len(near) == 1 and near[0]["side"] == "right", report["lesions"]
        assert near[0]["zone"].endswith("_right")


# ------------------------------------------------------------------------------ pieces of the run


def test_case_ids_are_unique_and_output_dir_is_never_input(tmp_path):
    for rel in ("a/ct.nii.gz", "b/ct.nii.gz", "ct.nii", "ct.nii.gz", "out/x_seg.nii.gz", ".hidden.nii.gz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    cases = discover_cases(tmp_path, exclude=tmp_path / "out")
    assert [c.case_id for c in cases] == ["a__ct", "b__ct", "ct.nii", "ct.nii.gz"]
    assert [c.case_id for c in discover_cases(tmp_path, pattern="*.nii", exclude=tmp_path / "out")] == ["ct"]
    with pytest.raises(batch.InputError, match="no file matches"):
        discover_cases(tmp_path / "a", pattern="*.mha")
    with pytest.raises(batch.InputError, match="input not found"):
        discover_cases(tmp_path / "missing")


def test_prefetch_loads_ahead_in_order_and_delivers_errors():
    started = [threading.Event() for _ in range(4)]

    def load(i):
        started[i].set()
        if i == 2:
            raise ValueError("bad case")
        return i * 10

    seen = []
    for i, future in prefetch(range(4), load, workers=2):
        if i == 0:  # while case 0 is "predicted", case 1 is already loading
            assert started[1].wait(5)
        try:
            seen.append(future.result())
        except ValueError as exc:
            seen.append(str(exc))
    assert seen == [0, 10, "bad case", 30]

    started = [threading.Event() for _ in range(4)]
    for i, _ in prefetch(range(2), load, workers=0):
        if i == 0:
            assert not started[1].is_set()  # workers=0: nothing runs ahead


def test_points_select_lesions_ijk_and_world(tmp_path):
    ct, affine, _ = make_chest(axcodes="LPS")
    save_ct(tmp_path / "in" / "c1.nii.gz", ct, affine)
    save_ct(tmp_path / "in" / "c2.nii.gz", ct, affine)
    save_ct(tmp_path / "in" / "c3.nii.gz", ct, affine)
    ijk = np.linalg.solve(affine, [*LOWER_RIGHT[0], 1])[:3].round().astype(int).tolist()
    points = tmp_path / "points.json"
    points.write_text(json.dumps({
        "c1": {"points": [ijk], "labels": [1]},
        "c2.nii.gz": {"points_world": [list(UPPER_LEFT[0])]},  # by file name, RAS mm, label defaults to 1
        "c3": {"points": [[0, 0, 99]], "labels": [1]},
    }))
    summary = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", points=points, progress=False)
    rows = {r["case_id"]: r for r in summary.cases}
    r1 = json.loads((tmp_path / "out" / "c1_report.json").read_text())
    r2 = json.loads((tmp_path / "out" / "c2_report.json").read_text())
    assert [les["side"] for les in r1["lesions"]] == ["right"] and r1["points"] == {"ijk": [ijk], "labels": [1]}
    assert [les["side"] for les in r2["lesions"]] == ["left"]
    assert rows["c3"]["status"] == "failed"
    assert str(points) in rows["c3"]["error"] and "outside the image" in rows["c3"]["error"]


def test_wrong_shape_prediction_fails_the_case_with_a_clear_message(tmp_path):
    class Shrinking(ThresholdPredictor):
        def predict(self, image, affine, points=None, point_labels=None, lung=None):
            pred = super().predict(image, affine)
            pred.mask = pred.mask[:-1]
            return pred

    ct, affine, _ = make_chest()
    save_ct(tmp_path / "in" / "c.nii.gz", ct, affine)
    summary = run_batch(Shrinking(), tmp_path / "in", tmp_path / "out", progress=False)
    (row,) = summary.cases
    assert row["status"] == "failed" and "mask of shape (47, 48, 16)" in row["error"] and "input grid" in row["error"]
    assert "Traceback" in row["traceback"] and summary.exit_code == 1
    with pytest.raises(batch.BatchFailedError, match="1 of 1 cases failed"):
        summary.raise_if_failed()


def test_interrupted_run_leaves_whole_cases_and_resume_finishes(tmp_path):
    ct, affine, _ = make_chest()
    for name in ("a", "b", "c"):
        save_ct(tmp_path / "in" / f"{name}.nii.gz", ct, affine)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_batch(InterruptingPredictor(stop_at=2), tmp_path / "in", out, progress=False)
    assert {p.name for p in out.iterdir()} == {f"a{k}" for k in OUTPUT_KINDS} | {"summary.csv", "summary.json", "manifest.json"}
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert [r["case_id"] for r in json.loads((out / "summary.json").read_text())["cases"]] == ["a"]
    with pytest.raises(OutputExistsError):
        run_batch(ThresholdPredictor(), tmp_path / "in", out, progress=False)
    with pytest.raises(ValueError, match="exclude each other"):
        run_batch(ThresholdPredictor(), tmp_path / "in", out, overwrite=True, resume=True, progress=False)
    predictor = ThresholdPredictor()
    summary = run_batch(predictor, tmp_path / "in", out, resume=True, bf16=True, progress=False)
    assert [r["status"] for r in summary.cases] == ["skipped", "ok", "ok"] and predictor.calls == 2
    # the loader's lung label reaches the model, so a predictor needing one does not threshold the CT again
    assert all(np.array_equal(lung, lung_regions(ct, affine)[0]) for lung in predictor.lungs)
    report = json.loads((out / "b_report.json").read_text())
    assert report["extras"] == {"inference_mode": True, "autocast_bf16": True}  # --bf16 reaches the model


# ------------------------------------------------------------------------------- other entry points


def test_monai_bundle_run_with_the_batch_overlay(tmp_path):
    """The MONAI route: inference.json + the bundle's batch_inference.yaml, --input_dir/--output_dir."""
    from monai.bundle import run

    bundle = write_bundle(tmp_path / "bundle")
    ct, affine, _ = make_chest()
    save_ct(tmp_path / "in" / "c.nii.gz", ct, affine)
    for name in ("medsegtext", "lesion_report_3d"):
        overlay = REPO / "bundles" / name / "configs" / "batch_inference.yaml"
        out = tmp_path / f"out_{name}"
        args = dict(config_file=[str(bundle / "configs" / "inference.json"), str(overlay)],
                    meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False, bundle_root=str(bundle),
                    checkpoint=str(bundle / "models" / "threshold.json"), input_dir=str(tmp_path / "in"), output_dir=str(out))
        run(**args)
        assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 1
        manifest = json.loads((out / "manifest.json").read_text())
        sha = hashlib.sha256((bundle / "models" / "threshold.json").read_bytes()).hexdigest()
        assert manifest["bundle"]["checkpoint"]["sha256"] == sha
        (tmp_path / "in" / "broken.nii.gz").write_text("not an image")
        with pytest.raises(RuntimeError) as failed:  # MONAI wraps it: the process exits non-zero
            run(**args, resume=True)
        assert isinstance(failed.value.__cause__, batch.BatchFailedError) and "broken.nii.gz" in str(failed.value.__cause__)
        (tmp_path / "in" / "broken.nii.gz").unlink()


def test_cli_reports_bundle_and_input_problems(tmp_path, capsys):
    bundle = write_bundle(tmp_path / "bundle")
    ct, affine, _ = make_chest()
    save_ct(tmp_path / "in" / "c.nii.gz", ct, affine)
    assert main(["--bundle", str(tmp_path), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o")]) == 2
    assert "inference.json" in capsys.readouterr().err
    assert main(["--bundle", str(bundle), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main(["--bundle", str(bundle), "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_torchrun_two_cpu_processes_shard_and_merge(tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank runs half the cases, rank 0 merges the summary."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    bundle = write_bundle(tmp_path / "bundle")
    ct, affine, _ = make_chest(shape=(40, 40, 12), spacing=(8.5, 8.5, 20.0))
    for i in range(4):
        save_ct(tmp_path / "in" / f"case{i}.nii.gz", ct, affine)
    (tmp_path / "in" / "broken.nii.gz").write_text("not an image")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
         "-m", "segreport.run.batch", "--bundle", str(bundle), "-i", str(tmp_path / "in"), "-o", str(out),
         "--device", "cpu", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0, proc.stderr[-3000:]  # the broken file makes the run fail (rank 0's exit 1)
    assert "FAILED broken" in proc.stderr, proc.stderr[-3000:]
    rows = json.loads((out / "summary.json").read_text())["cases"]
    assert [r["case_id"] for r in rows] == ["broken", "case0", "case1", "case2", "case3"]
    assert [r["status"] for r in rows] == ["failed", "ok", "ok", "ok", "ok"]
    ranks = [json.loads((out / f"summary.rank{k}.json").read_text()) for k in (0, 1)]
    assert sorted(len(r["cases"]) for r in ranks) == [2, 3]  # round-robin halves
    assert {r["case_id"] for r in ranks[0]["cases"]}.isdisjoint(r["case_id"] for r in ranks[1]["cases"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["counts"] == {"ok": 4, "failed": 1, "skipped": 0}
    for i in range(4):
        assert nib.load(out / f"case{i}_seg.nii.gz").shape == (40, 40, 12)


def test_case_outputs_stay_inside_output_dir(tmp_path):
    case = Case("a__b", "/x/a/b.nii.gz")
    for path in case.outputs(tmp_path).values():
        assert path.parent == tmp_path


def test_ctrl_c_in_the_cli_is_one_line_and_exit_130(tmp_path, capsys):
    """Issue 32, item 10: SIGINT printed a 35-line traceback."""
    from segreport.run.infer_cli import main

    ct, affine, _ = make_chest()
    for name in ("a", "b"):
        save_ct(tmp_path / "in" / f"{name}.nii.gz", ct, affine)
    bundle = write_bundle(tmp_path / "bundle")
    config = bundle / "configs" / "inference.json"
    cfg = json.loads(config.read_text())
    cfg["predictor"].update({"_target_": "test_batch.InterruptingPredictor", "stop_at": 2})
    config.write_text(json.dumps(cfg))
    assert main(["--bundle", str(bundle), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err


def test_the_minimum_lesion_size_is_the_checkpoints_unless_the_run_overrides_it(tmp_path):
    """One filter, applied by the per-case path: the spec's ``inference.min_lesion_ml`` by default, the
    run's value when given; the manifest and each report record the one used."""
    ct, affine, _ = make_chest(axcodes="LPS")
    save_ct(tmp_path / "in" / "c1.nii.gz", ct, affine)
    plain = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "plain", progress=False)
    assert plain.cases[0]["n_lesions"] >= 2
    strict = ThresholdPredictor()
    strict.spec = {"inference": {"min_lesion_ml": 1e6}}  # a checkpoint that counts nothing smaller than a litre
    by_spec = run_batch(strict, tmp_path / "in", tmp_path / "spec", progress=False)
    overridden = run_batch(strict, tmp_path / "in", tmp_path / "run", progress=False, min_lesion_ml=0.0)
    assert by_spec.cases[0]["n_lesions"] == 0 and overridden.cases[0]["n_lesions"] == plain.cases[0]["n_lesions"]
    for out, value in (("spec", 1e6), ("run", 0.0)):
        report = json.loads((tmp_path / out / "c1_report.json").read_text())
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        assert report["provenance"]["min_lesion_ml"] == value == manifest["arguments"]["min_lesion_ml"]


def test_every_route_refuses_an_output_folder_inside_the_input(tmp_path):
    """The checks before the model loads are one plan (run.outputs.plan_run) that the CLI makes first and
    run_batch makes when called directly (MONAI bundle route, Python): neither writes into an input folder."""
    ct, affine, _ = make_chest(axcodes="LPS")
    save_ct(tmp_path / "in" / "c1.nii.gz", ct, affine)
    with pytest.raises(batch.CannotStartError, match="inside the input folder"):
        run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "in" / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["c1.nii.gz"]
    plan = batch.plan_run(tmp_path / "in", tmp_path / "out")
    assert [c.case_id for c in plan.cases] == ["c1"]
    summary = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False, plan=plan)
    assert summary.counts["ok"] == 1
