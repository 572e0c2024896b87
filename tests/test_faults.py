"""Fault injection: each kind of bad input or fault gets a clear error that names the file and the
problem, the other cases finish, and nothing is lost or half-written. The README's failure table lists
these same kinds."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segreport.errors import InputError
from segreport.run.batch import run_batch
from segreport.run.infer_cli import main
from segreport.run.run_lock import LOCK_NAME, RunLock, RunLockedError
from test_batch import OUTPUT_KINDS, ThresholdPredictor, save_ct, write_bundle
from test_report import make_chest

REPO = Path(__file__).resolve().parents[1]
GOOD = "good"


def _nifti(path: Path, data, affine=None, **header) -> Path:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def _good_ct():
    ct, affine, _ = make_chest(shape=(40, 40, 12), spacing=(8.0, 8.0, 20.0))
    return np.round(ct).astype(np.int16), affine


def _bad_volumes(folder: Path) -> dict[str, str]:
    """{case id: what its error must say} for every kind of bad volume, written into ``folder``."""
    ct, affine = _good_ct()
    folder.mkdir(parents=True)
    save_ct(folder / f"{GOOD}.nii.gz", ct, affine)
    good_bytes = (folder / f"{GOOD}.nii.gz").read_bytes()
    (folder / "random_bytes.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))
    (folder / "truncated.nii.gz").write_bytes(good_bytes[: len(good_bytes) // 2])
    (folder / "empty_file.nii.gz").write_bytes(b"")
    (folder / "text_file.nii.gz").write_text("not an image\n")
    _nifti(folder / "two_d.nii.gz", ct[:, :, 0])
    _nifti(folder / "four_d.nii.gz", np.stack([ct, ct], -1))
    rgb = np.zeros(ct.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _nifti(folder / "rgb.nii.gz", rgb)
    _nifti(folder / "complex.nii.gz", ct.astype(np.complex64))
    nan = ct.astype(np.float32)
    nan[3, 3, 3] = np.nan
    _nifti(folder / "nan.nii.gz", nan)
    inf = ct.astype(np.float32)
    inf[3, 3, 3] = np.inf
    _nifti(folder / "inf.nii.gz", inf)
    _nifti(folder / "constant.nii.gz", np.full(ct.shape, 40, np.int16))
    _nifti(folder / "binary_mask.nii.gz", (ct > 0).astype(np.uint8))
    _nifti(folder / "display_8bit.nii.gz", np.clip((ct + 1000) / 8, 0, 255).astype(np.uint8))
    _nifti(folder / "mr_like.nii.gz", np.clip(ct + 1000, 0, None).astype(np.int16))
    _nifti(folder / "absurd_spacing.nii.gz", ct, np.diag([1e6, 1e6, 1e6, 1.0]))
    zero = nib.Nifti1Image(ct, None)  # no qform/sform: the affine comes from pixdim
    zero.header["pixdim"][1:4] = [0.0, 2.0, 5.0]
    nib.save(zero, folder / "zero_spacing.nii.gz")
    nan_affine = affine.copy()
    nan_affine[0, 3] = np.nan
    _nifti(folder / "nan_affine.nii.gz", ct, nan_affine)
    _nifti(folder / "single_slice.nii.gz", ct[:, :, :1])
    return {
        "random_bytes": "not a readable NIfTI", "truncated": "truncated or corrupt", "empty_file": "not a readable NIfTI",
        "text_file": "not a readable NIfTI", "two_d": "expected a 3D image, got 2D", "four_d": "expected a 3D image, got 4D",
        "rgb": "colour image, not a scalar CT", "complex": "complex-valued voxels", "nan": "NaN or infinite",
        "inf": "NaN or infinite", "constant": "constant volume", "binary_mask": "a mask or label map",
        "display_8bit": "8-bit", "mr_like": "no air or lung", "absurd_spacing": "voxel spacing",
        "zero_spacing": "zero or negative voxel spacing", "nan_affine": "NaN or infinite",
        "single_slice": "single slice",
    }


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    expected = _bad_volumes(root / "in")
    before = {p.name: p.read_bytes() for p in (root / "in").iterdir()}
    summary = run_batch(ThresholdPredictor(), root / "in", root / "out", progress=False)
    return root, expected, before, summary


def test_at_least_25_kinds_of_fault_are_covered(bad_run):
    _, expected, _, _ = bad_run
    run_level = ("kill_then_resume", "changed_input_then_resume", "other_checkpoint_then_resume", "second_concurrent_run",
                 "output_is_a_file", "output_under_a_file", "output_is_the_input", "output_inside_the_input",
                 "random_checkpoint", "truncated_checkpoint", "pickled_checkpoint", "other_bundles_checkpoint",
                 "checkpoint_without_spec", "cuda_without_gpu", "malformed_points", "point_outside_image",
                 "dataset_dir_without_dataset", "corrupt_spreadsheet", "label_grid_mismatch", "broken_dicom_series")
    assert len(expected) + len(run_level) >= 25


def test_every_bad_volume_fails_with_its_reason_and_the_good_one_finishes(bad_run):
    root, expected, before, summary = bad_run
    rows = {r["case_id"]: r for r in summary.cases}
    assert rows[GOOD]["status"] == "ok"
    for case, reason in expected.items():
        row = rows[case]
        assert row["status"] == "failed", case
        assert f"{case}.nii.gz" in row["error"] and reason in row["error"], (case, row["error"])
        assert not [p for p in (root / "out").iterdir() if p.name.startswith(case + "_")], case  # nothing half-written
    assert {p.name for p in (root / "out").iterdir() if p.name.startswith(GOOD)} == {GOOD + k for k in OUTPUT_KINDS}
    assert {p.name: p.read_bytes() for p in (root / "in").iterdir()} == before  # the input is untouched
    assert not [p for p in (root / "out").iterdir() if ".tmp" in p.name or p.name == LOCK_NAME]


def test_allow_non_ct_lets_a_user_who_knows_better_through(bad_run, tmp_path):
    root, _, _, _ = bad_run
    summary = run_batch(ThresholdPredictor(), root / "in" / "mr_like.nii.gz", tmp_path / "o", progress=False, allow_non_ct=True)
    assert summary.cases[0]["status"] == "ok"


# ------------------------------------------------------------------------------- resume and locking
def _one_case(tmp_path: Path) -> tuple[Path, Path]:
    ct, affine = _good_ct()
    data = tmp_path / "in"
    save_ct(data / "a.nii.gz", ct, affine)
    save_ct(data / "b.nii.gz", ct, affine)
    return data, tmp_path / "out"


def test_kill_during_a_write_then_resume_redoes_only_that_case(tmp_path):
    data, out = _one_case(tmp_path)
    run_batch(ThresholdPredictor(), data, out, progress=False)
    (out / "b_report.json").unlink()  # killed before its report (written last) landed
    (out / ".b_seg.nii.gz.123-0123456789ab.tmp.nii.gz").write_bytes(b"half")  # and a temp file left behind
    predictor = ThresholdPredictor()
    summary = run_batch(predictor, data, out, resume=True, progress=False)
    assert {r["case_id"]: r["status"] for r in summary.cases} == {"a": "skipped", "b": "ok"} and predictor.calls == 1
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_changed_input_or_other_checkpoint_is_redone_on_resume(tmp_path):
    data, out = _one_case(tmp_path)
    ckpt = tmp_path / "t.json"
    ckpt.write_text(json.dumps({"threshold": -500.0}))
    run_batch(ThresholdPredictor(checkpoint=str(ckpt)), data, out, progress=False)
    ct, affine = _good_ct()
    save_ct(data / "a.nii.gz", ct + 1, affine)  # the input was replaced
    os.utime(data / "a.nii.gz", ns=(1, 1))
    summary = run_batch(ThresholdPredictor(checkpoint=str(ckpt)), data, out, resume=True, progress=False)
    assert {r["case_id"]: r["status"] for r in summary.cases} == {"a": "ok", "b": "skipped"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"threshold": -400.0}))
    summary = run_batch(ThresholdPredictor(checkpoint=str(other)), data, out, resume=True, progress=False)
    assert {r["status"] for r in summary.cases} == {"ok"}  # another model: every case redone


def test_a_second_concurrent_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    data, out = _one_case(tmp_path)
    out.mkdir()
    with RunLock(out):
        with pytest.raises(RunLockedError, match="another segreport run is writing here"):
            run_batch(ThresholdPredictor(), data, out, progress=False)
    (out / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 17}))  # a killed run's lock
    assert run_batch(ThresholdPredictor(), data, out, progress=False).counts["ok"] == 2
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ CLI start-up
@pytest.fixture()
def cli_setup(tmp_path):
    data, _ = _one_case(tmp_path)
    return data, write_bundle(tmp_path / "bundle"), tmp_path


@pytest.mark.parametrize("where, says", [
    ("file", "names a file, not a folder"), ("under_file", "cannot write there"),
    ("input", "the output folder is the input folder"), ("inside_input", "inside the input folder"),
    ("link_into_input", "inside the input folder"), ("link_to_input", "the output folder is the input folder"),
])
def test_bad_output_folders_stop_before_the_model_loads(cli_setup, capsys, where, says):
    data, bundle, tmp = cli_setup
    (tmp / "afile").write_text("x")
    (tmp / "link_in").symlink_to(data, target_is_directory=True)  # -o through a symlink (issue 32, item 4)
    out = {"file": tmp / "afile", "under_file": tmp / "afile" / "sub", "input": data, "inside_input": data / "results",
           "link_into_input": tmp / "link_in" / "results", "link_to_input": tmp / "link_in"}[where]
    before = sorted(p.name for p in data.rglob("*"))
    assert main(["--bundle", str(bundle), "-i", str(data), "-o", str(out), "--no-progress"]) == 2
    assert says in capsys.readouterr().err and sorted(p.name for p in data.rglob("*")) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_stops_with_exit_2(cli_setup, capsys):
    data, bundle, tmp = cli_setup
    assert main(["--bundle", str(bundle), "-i", str(data), "-o", str(tmp / "o"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available here" in capsys.readouterr().err and not (tmp / "o").exists()


def test_bad_click_files_are_clear(cli_setup, capsys):
    data, bundle, tmp = cli_setup
    (tmp / "points.json").write_text("{not json")
    assert main(["--bundle", str(bundle), "-i", str(data), "-o", str(tmp / "o"), "--points", str(tmp / "points.json")]) == 2
    assert "points.json: cannot read points JSON" in capsys.readouterr().err
    (tmp / "points.json").write_text(json.dumps({"a": {"points": [[999, 0, 0]]}}))
    summary = run_batch(ThresholdPredictor(), data, tmp / "o2", points=tmp / "points.json", progress=False)
    rows = {r["case_id"]: r for r in summary.cases}
    assert rows["a"]["status"] == "failed" and "lies outside the image" in rows["a"]["error"] and rows["b"]["status"] == "ok"


def _medsegtext_checkpoint(path: Path) -> None:
    from segreport.models.medsegtext import spec_for
    from segreport.networks import MedSegText
    from segreport.text.tokenizers import build_word_tokenizer

    tok = build_word_tokenizer(["No pulmonary infection."])
    net = MedSegText.from_config("tiny", vocab_size=len(tok), pad_id=0, bos_id=1, eos_id=2, max_length=8)
    torch.save({"model": net.state_dict(), "spec": spec_for(net, tok, 32, 8)}, path)


@pytest.mark.parametrize("kind, says", [
    ("random", "not a readable PyTorch checkpoint"), ("truncated", "not a readable PyTorch checkpoint"),
    ("pickled", "not a readable PyTorch checkpoint"), ("other_bundle", "is a 'lesion_report_3d' model, not 'medsegtext'"),
    ("no_spec", "has no segreport spec"),
])
def test_bad_checkpoints_stop_with_their_root_cause(cli_setup, capsys, kind, says):
    from segreport.models import lesion_report_3d as m3d

    data, _, tmp = cli_setup
    ckpt = tmp / f"{kind}.pt"
    if kind == "random":
        ckpt.write_bytes(np.random.default_rng(1).bytes(5000))
    elif kind == "truncated":
        _medsegtext_checkpoint(ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:3000])
    elif kind == "pickled":
        ckpt.write_bytes(pickle.dumps({"model": {}, "spec": {"format": "segreport-spec"}}))
    elif kind == "other_bundle":
        net = m3d.build_network(roi_size=32)
        torch.save({"model": net.state_dict(), "spec": m3d.spec_for(net)}, ckpt)
    else:
        torch.save({"encoder.weight": torch.zeros(1)}, ckpt)
    code = main(["--bundle", str(REPO / "bundles" / "medsegtext"), "--checkpoint", str(ckpt), "-i", str(data),
                 "-o", str(tmp / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{kind}.pt: " in err and says in err and "ConfigExpression" not in err


def test_a_pickled_payload_in_a_real_zip_checkpoint_is_refused_not_run(tmp_path):
    from segreport.models import read_checkpoint

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"model": {}, "spec": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: checkpoint holds more than weights and a spec, refused"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ datasets
def test_dataset_faults_name_the_file(phantom_dir, tmp_path):
    from segreport.data.io import load_pair
    from segreport.phantom import ensure_default
    from segreport.data.readers import read_lvit

    with pytest.raises(InputError, match="no dataset found"):
        ensure_default(tmp_path / "nothing_here")
    lvit = tmp_path / "lvit"
    shutil.copytree(phantom_dir / "slices2d", lvit)
    (lvit / "Train_Folder" / "Train_text.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(InputError, match=r"Train_text\.xlsx: cannot read table"):
        read_lvit(lvit, split="Train")
    label = tmp_path / "label.nii.gz"
    _nifti(label, np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(InputError, match=r"label\.nii\.gz: label shape \(5, 5, 5\) differs from image shape"):
        load_pair(phantom_dir / "imagesTr" / "case_0000.nii.gz", label)


def test_training_refuses_a_label_off_its_image(phantom_dir, tmp_path):
    """Issue 32, item 9: a label 50 mm off its image was trained on (3D and the 2D volume slices)."""
    import nibabel as nib

    from segreport.training.lesion_report import load_datalists
    from segreport.training.slices2d import volume_to_slice_items

    data = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
        for f in sorted((phantom_dir / sub).glob("*.nii.gz"))[:4]:
            shutil.copy(f, data / sub / f.name)
    moved = sorted((data / "labelsTr").glob("*.nii.gz"))[1]
    img = nib.load(moved)
    affine = img.affine.copy()
    affine[0, 3] += 50.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), moved)
    with pytest.raises(InputError, match="label affine differs from the image's") as err:
        load_datalists(data)
    assert str(moved) in str(err.value)
    case = {"image": str(data / "imagesTr" / moved.name), "label": str(moved), "case_id": "moved"}
    with pytest.raises(InputError, match="label affine differs"):
        volume_to_slice_items(case)


def test_a_dicom_series_with_a_missing_slice_fails_its_case(shared_data, tmp_path):
    series = tmp_path / "in" / "series"
    shutil.copytree(shared_data / "totalsegmentator" / "example_ct_dicom", series)
    files = sorted(series.iterdir())
    files[len(files) // 2].unlink()  # a gap in the middle of the series
    summary = run_batch(ThresholdPredictor(), series, tmp_path / "out", progress=False)
    (row,) = summary.cases
    assert row["status"] == "failed" and str(series) in row["error"] and "slice" in row["error"]
    assert not zipfile.is_zipfile(series / files[0].name)  # the input is as it was (still DICOM, untouched)


def test_a_truncated_dicom_file_fails_its_case_by_name(shared_data, tmp_path):
    """Issue 32, item 10: a truncated file was dropped from the series and reported as 'missing slices'."""
    series = tmp_path / "in" / "series"
    shutil.copytree(shared_data / "totalsegmentator" / "example_ct_dicom", series)
    damaged = sorted(series.iterdir())[9]
    damaged.write_bytes(damaged.read_bytes()[:2000])  # the preamble stays: it says DICOM, its header is cut
    summary = run_batch(ThresholdPredictor(), series, tmp_path / "out", progress=False)
    (row,) = summary.cases
    assert row["status"] == "failed" and str(damaged) in row["error"] and "truncated or damaged" in row["error"]


def test_a_dicom_series_that_says_it_is_mr_fails_its_case(shared_data, tmp_path):
    """Issue 32, item 10: a series with Modality MR was run as CT. Its voxels are the real CT's, so only
    the header can tell; --allow-non-ct still runs it."""
    import pydicom

    series = tmp_path / "in" / "series"
    series.mkdir(parents=True)
    for src in sorted((shared_data / "totalsegmentator" / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(src)
        ds.Modality = "MR"
        ds.save_as(series / src.name)
    summary = run_batch(ThresholdPredictor(), series, tmp_path / "out", progress=False)
    (row,) = summary.cases
    assert row["status"] == "failed" and str(series) in row["error"] and "Modality is MR, not CT" in row["error"]
    summary = run_batch(ThresholdPredictor(), series, tmp_path / "out2", progress=False, allow_non_ct=True)
    assert summary.cases[0]["status"] == "ok"


def test_dicom_series_beside_nifti_files_are_found_and_other_files_listed(shared_data, tmp_path):
    data = tmp_path / "in"
    ct, affine = _good_ct()
    save_ct(data / "nifti_case.nii.gz", ct, affine)
    shutil.copytree(shared_data / "totalsegmentator" / "example_ct_dicom", data / "patient1" / "ct")
    (data / "notes.txt").write_text("not an image")
    (data / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")  # issue 32, item 10: links to nothing
    (data / "loop.nii.gz").symlink_to(data / "loop.nii.gz")
    summary = run_batch(ThresholdPredictor(), data, tmp_path / "out", progress=False)
    assert {r["case_id"]: r["status"] for r in summary.cases} == {"nifti_case": "ok", "patient1_ct": "ok"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    broken = "a broken symbolic link (its target is missing, or the links loop)"
    assert manifest["skipped_inputs"] == [{"path": str(data / "notes.txt"), "reason": "not a NIfTI file nor part of a DICOM series"},
                                          {"path": str(data / "dangling.nii.gz"), "reason": broken},
                                          {"path": str(data / "loop.nii.gz"), "reason": broken}]


def test_series_option_picks_one_series_and_names_the_ones_found(shared_data, tmp_path, capsys):
    from segreport.data.dicom_groups import read_dicom_folder

    folder = shared_data / "totalsegmentator" / "example_ct_dicom"
    (uid,) = [it["series_uid"] for it in read_dicom_folder(folder)]
    summary = run_batch(ThresholdPredictor(), folder, tmp_path / "out", progress=False, series_uid=uid)
    assert [r["status"] for r in summary.cases] == ["ok"]
    with pytest.raises(InputError, match="no DICOM series '1.2.3' here"):
        run_batch(ThresholdPredictor(), folder, tmp_path / "out2", progress=False, series_uid="1.2.3")


def test_two_series_without_series_uid_in_one_folder_are_told_apart(shared_data, tmp_path):
    """Anonymised: SeriesInstanceUID removed from two series (another orientation and frame of reference)
    sharing one folder. They are two cases, each its own volume, and --series picks one."""
    import pydicom

    from segreport.data.io import load_volume
    from segreport.data.dicom_groups import read_dicom_folder

    folder = tmp_path / "in" / "mixed"
    folder.mkdir(parents=True)
    for i, src in enumerate(sorted((shared_data / "totalsegmentator" / "example_ct_dicom").iterdir())):
        ds = pydicom.dcmread(src)
        del ds.SeriesInstanceUID
        ds.save_as(folder / f"a_{i:03d}.dcm")
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.9.9999.1"
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal stack of the same pixels
        ds.ImagePositionPatient = [float(i) * 3.0, 0.0, 0.0]
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.9999.2.{i}"
        ds.save_as(folder / f"b_{i:03d}.dcm")
    items = read_dicom_folder(tmp_path / "in")
    assert sorted(it["series_uid"] for it in items) == ["nouid:0", "nouid:1"]
    shapes = {it["series_uid"]: load_volume(it["image"], series_uid=it["series_uid"])[0].shape for it in items}
    n = len(list(folder.iterdir())) // 2
    assert all(n in shape for shape in shapes.values())  # each volume holds its own slices only
    with pytest.raises(InputError, match="holds 2 DICOM series .*pass series_uid"):
        load_volume(folder)
    summary = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False, series_uid="nouid:0")
    assert len(summary.cases) == 1


def test_a_series_without_uid_beside_one_with_a_uid_can_be_picked(shared_data, tmp_path):
    import pydicom

    from segreport.data.dicom_groups import read_dicom_folder

    folder = tmp_path / "in"
    folder.mkdir()
    for i, src in enumerate(sorted((shared_data / "totalsegmentator" / "example_ct_dicom").iterdir())):
        ds = pydicom.dcmread(src)
        ds.save_as(folder / f"anon_{i:03d}.dcm")  # this export has no SeriesInstanceUID
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.9999.7"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.9999.8.{i}"
        ds.save_as(folder / f"named_{i:03d}.dcm")
    assert sorted(it["series_uid"] for it in read_dicom_folder(folder)) == ["1.2.826.0.1.3680043.9.9999.7", "nouid:0"]
    summary = run_batch(ThresholdPredictor(), folder, tmp_path / "out", progress=False, series_uid="nouid:0")
    assert [r["status"] for r in summary.cases] == ["ok"]


def test_a_user_supplied_lung_mask_replaces_the_hu_mask_and_a_wrong_one_is_named(shared_data, tmp_path):
    from segreport.transforms.lung_regions import lung_label_from_lobes

    root = shared_data / "totalsegmentator"
    (tmp_path / "in").mkdir()
    shutil.copy(root / "example_ct_sm.nii.gz", tmp_path / "in")
    shutil.copy(root / "pulmonary_report" / "ct_cropped.nii.gz", tmp_path / "in")
    masks = tmp_path / "lungs"
    masks.mkdir()
    shutil.copy(root / "example_seg.nii.gz", masks / "example_ct_sm.nii.gz")  # TotalSegmentator's multi-label output
    shutil.copy(root / "example_seg.nii.gz", masks / "ct_cropped.nii.gz")  # another scan's grid
    summary = run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False, lung_masks=masks)
    rows = {r["case_id"]: r for r in summary.cases}
    assert rows["example_ct_sm"]["status"] == "ok"
    report = json.loads((tmp_path / "out" / "example_ct_sm_report.json").read_text())
    lobes = lung_label_from_lobes(np.asarray(nib.load(root / "example_seg.nii.gz").dataobj))
    assert "user-supplied lung mask" in report["lung"]["source"]
    assert report["lung"]["volume_ml"]["right"] == pytest.approx((lobes == 1).sum() * 27 / 1000, abs=0.01)
    assert rows["ct_cropped"]["status"] == "failed" and "does not match the scan" in rows["ct_cropped"]["error"]
    assert str(masks / "ct_cropped.nii.gz") in rows["ct_cropped"]["error"]


def test_a_mirrored_scan_is_warned_about_and_a_normal_one_is_not(shared_data, tmp_path):
    """Issue 32, item 7: the real CT's voxels mirrored left-right under the same header (what an LPS file
    labelled RAS looks like): the liver then lies on the header's left, and the report says so."""
    ts = shared_data / "totalsegmentator"
    img = nib.load(ts / "example_ct_sm.nii.gz")
    ct = np.asarray(img.dataobj, dtype=np.float32)
    save_ct(tmp_path / "in" / "as_is.nii.gz", ct, img.affine)
    save_ct(tmp_path / "in" / "mirrored.nii.gz", np.ascontiguousarray(ct[::-1]), img.affine)  # axis 0 is x here
    run_batch(ThresholdPredictor(), tmp_path / "in", tmp_path / "out", progress=False, allow_no_lungs=True)
    as_is = json.loads((tmp_path / "out" / "as_is_report.json").read_text())
    mirrored = json.loads((tmp_path / "out" / "mirrored_report.json").read_text())
    assert as_is["laterality"]["verdict"] == "consistent" and not any("mirrored" in w for w in as_is["warnings"])
    assert mirrored["laterality"]["verdict"] == "looks mirrored"
    assert any("looks mirrored" in w for w in mirrored["warnings"])
    assert "looks mirrored" in (tmp_path / "out" / "mirrored_report.txt").read_text()


def test_lung_mask_labels_1_and_2_swapped_are_refused(shared_data, tmp_path):
    """Issue 32, item 7: --lung-masks with right (1) and left (2) swapped would swap every side."""
    from segreport.transforms.lung_regions import lung_label_from_lobes

    ts = shared_data / "totalsegmentator"
    shutil.copy(ts / "example_ct_sm.nii.gz", tmp_path / "in.nii.gz")
    lobes = lung_label_from_lobes(np.asarray(nib.load(ts / "example_seg.nii.gz").dataobj))
    affine = nib.load(ts / "example_seg.nii.gz").affine
    masks = tmp_path / "lungs"
    masks.mkdir()
    swapped = np.where(lobes == 1, 2, np.where(lobes == 2, 1, 0)).astype(np.uint8)
    nib.save(nib.Nifti1Image(swapped, affine), masks / "in.nii.gz")
    summary = run_batch(ThresholdPredictor(), tmp_path / "in.nii.gz", tmp_path / "out", progress=False, lung_masks=masks)
    (row,) = summary.cases
    assert row["status"] == "failed" and str(masks / "in.nii.gz") in row["error"] and "lung labels look swapped" in row["error"]
    nib.save(nib.Nifti1Image(lobes.astype(np.uint8), affine), masks / "in.nii.gz")
    assert run_batch(ThresholdPredictor(), tmp_path / "in.nii.gz", tmp_path / "out2", progress=False,
                     lung_masks=masks).cases[0]["status"] == "ok"
