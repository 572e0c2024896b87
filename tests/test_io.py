"""Validated volume I/O: NIfTI/DICOM reading, geometry, bad-input errors, atomic writes."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine
from nibabel.orientations import io_orientation, ornt_transform

import segreport.data.io as sio
from segreport.data.io import load_pair, load_volume, save_nifti, volume_fingerprint
from segreport.errors import InputError

AFFINE = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])


def _write(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


# ---------------------------------------------------------------------------------------- NIfTI


def test_save_load_roundtrip_keeps_affine_codes_and_values(tmp_path):
    mask = np.zeros((6, 5, 4), bool)
    mask[1:3, 2:4, 1] = True
    path = save_nifti(mask, AFFINE, tmp_path / "sub" / "mask.nii.gz")
    header = nib.load(path).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1)
    assert header.get_data_dtype() == np.uint8
    np.testing.assert_allclose(header.get_qform(), AFFINE, atol=1e-5)  # ITK readers use the qform

    array, affine, meta = load_volume(path)
    assert array.dtype == np.float32 and array.shape == (6, 5, 4)
    np.testing.assert_array_equal(array, mask)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)
    assert meta["spacing"] == pytest.approx((0.8, 0.8, 2.5))
    assert meta["axcodes"] == "LAS" and meta["format"] == "nifti"

    save_nifti(array, affine, tmp_path / "codes.nii", qform_code=2, sform_code=4)
    _, _, meta = load_volume(tmp_path / "codes.nii")
    assert (meta["qform_code"], meta["sform_code"]) == (2, 4)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a 0600 temp file
    # only the two finished files: no temp file is left behind
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["codes.nii", "mask.nii.gz"]


def test_save_nifti_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = save_nifti(np.ones((4, 4, 4), np.int16), AFFINE, tmp_path / "pred.nii.gz")
    before = path.read_bytes()

    def crash(img, filename):  # writes half a file, then dies like a killed process would
        open(filename, "wb").write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(sio.nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((4, 4, 4), np.int16), AFFINE, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pred.nii.gz"]


def test_real_ct_nifti(shared_data):
    array, affine, meta = load_volume(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    assert array.shape == (122, 101, 30) and meta["dtype"] == "int16"
    assert meta["spacing"] == pytest.approx((3.0, 3.0, 3.0)) and meta["axcodes"] == "RAS"
    assert (array.min(), array.max()) == (-1100, 1207)  # HU range stated in SOURCE.md


def test_missing_not_an_image_and_truncated_files(tmp_path, shared_data):
    with pytest.raises(InputError, match="file not found") as err:
        load_volume(tmp_path / "nope.nii.gz")
    assert err.value.path == str(tmp_path / "nope.nii.gz")

    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    with pytest.raises(InputError, match="not a readable NIfTI") as err:
        load_volume(text)
    assert str(text) in str(err.value)

    real = (shared_data / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(real[: len(real) // 2])  # header intact, voxel stream cut
    with pytest.raises(InputError, match="truncated or corrupt") as err:
        load_volume(truncated)
    assert str(truncated) in str(err.value)
    truncated.write_bytes(real[:100])  # not even a whole header
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_volume(truncated)


def test_dimensionality(tmp_path):
    with pytest.raises(InputError, match=r"expected a 3D image, got 4D"):
        load_volume(_write(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.int16)))
    with pytest.raises(InputError, match=r"expected a 3D image, got 2D"):
        load_volume(_write(tmp_path / "2d.nii.gz", np.zeros((4, 4), np.int16)))
    # a trailing singleton 4th dimension is squeezed
    array, _, meta = load_volume(_write(tmp_path / "x1.nii.gz", np.ones((4, 3, 2, 1), np.int16)))
    assert array.shape == meta["shape"] == (4, 3, 2)
    array, _, _ = load_volume(tmp_path / "4d.nii.gz", expect_ndim=4)
    assert array.shape == (4, 4, 4, 2)


def test_nan_inf_and_bad_spacing(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    with pytest.raises(InputError, match="2 voxels are NaN or infinite"):
        load_volume(_write(tmp_path / "nan.nii.gz", data))

    flat = AFFINE.copy()
    flat[:, 2] = 0  # third axis collapsed: zero spacing (a qform cannot even hold it: sform only)
    header = nib.Nifti1Header()
    header.set_sform(flat, code=1)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="zero voxel spacing"):
        load_volume(tmp_path / "flat.nii.gz")

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)  # no qform/sform: affine from pixdim
    # nibabel would silently load these as 1 mm and 2 mm
    for name, pixdim in (("zero", [1.0, 0.0, 1.0]), ("negative", [1.0, -2.0, 1.0])):
        img.header["pixdim"][1:4] = pixdim
        nib.save(img, tmp_path / f"{name}_pixdim.nii")
        with pytest.raises(InputError, match="zero or negative voxel spacing"):
            load_volume(tmp_path / f"{name}_pixdim.nii")


# ---------------------------------------------------------------------------------------- DICOM


def test_dicom_series_geometry_matches_its_nifti(shared_data):
    """The real JPEG2000 series against TotalSegmentator's segmentation of it (a dcm2niix-style LAS
    NIfTI): same world grid once reoriented, and the organs land on the right voxels."""
    ts = shared_data / "totalsegmentator"
    ct, affine, meta = load_volume(ts / "example_ct_dicom")
    assert meta["format"] == "dicom" and meta["n_files"] == 20 and meta["shape"] == (512, 512, 20)
    assert meta["spacing"] == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert -1024 <= ct.min() and ct.max() <= 3071  # rescaled to HU

    seg_img = nib.load(ts / "example_seg_dicom.nii.gz")
    to_ours = ornt_transform(io_orientation(seg_img.affine), io_orientation(affine))
    seg_on_ours = nib.Nifti1Image(np.asarray(seg_img.dataobj), seg_img.affine).as_reoriented(to_ours)
    np.testing.assert_allclose(seg_on_ours.affine, affine, atol=1e-3)
    seg = np.asarray(seg_on_ours.dataobj)

    # TotalSegmentator v2: 5 = liver, 1 = spleen. A flipped axis would put the liver label over
    # lung/air/spleen (std ~185 HU) instead of homogeneous liver parenchyma (~90 +- 22 HU).
    liver = ct[seg == 5]
    assert 40 < liver.mean() < 150 and liver.std() < 40
    assert ct[np.flip(seg, 0) == 5].std() > 100 and ct[np.flip(seg, 1) == 5].std() > 100
    # patient right is +x in RAS world: the liver lies to the right of the spleen
    liver_x = apply_affine(affine, np.argwhere(seg == 5).mean(0))[0]
    spleen_x = apply_affine(affine, np.argwhere(seg == 1).mean(0))[0]
    assert liver_x > spleen_x + 100


def test_dicom_slices_and_series_errors(shared_data, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    lidc, _, meta = load_volume(shared_data / "lungmask_lidc_slices")
    assert lidc.shape == (512, 512, 2) and meta["spacing"] == pytest.approx((0.625, 0.625, 1.0))
    assert (lidc.min(), lidc.max()) == (-2048, 1502)  # HU, as SOURCE.md states

    ct_small, affine, meta = load_volume(pydicom.data.get_testdata_file("CT_small.dcm"))  # one file
    assert ct_small.shape == (128, 128, 1) and meta["format"] == "sitk"
    assert meta["spacing"][:2] == pytest.approx((0.661468, 0.661468))

    # MONAI's toy series: the first slice is 200 mm away from the other three
    with pytest.raises(InputError, match="non-uniform slice positions") as err:
        load_volume(shared_data / "monai_ct_dicom")
    assert "monai_ct_dicom" in str(err.value)

    dup = tmp_path / "dup"
    dup.mkdir()
    shutil.copy(shared_data / "lungmask_lidc_slices" / "0.dcm", dup / "0.dcm")
    ds = pydicom.dcmread(shared_data / "lungmask_lidc_slices" / "1.dcm")
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]  # same position as slice 0
    ds.save_as(dup / "1.dcm")
    with pytest.raises(InputError, match="zero slice spacing"):
        load_volume(dup)

    # a 20-degree gantry tilt: each slice's origin also moves along y by step * tan(20)
    series = shared_data / "totalsegmentator" / "example_ct_dicom"
    tilted = tmp_path / "tilted"
    tilted.mkdir()
    slices = sorted((pydicom.dcmread(f) for f in series.iterdir() if f.is_file()), key=lambda d: float(d.ImagePositionPatient[2]))
    first_z = float(slices[0].ImagePositionPatient[2])
    for k, ds in enumerate(slices):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - first_z) * np.tan(np.radians(20)), z]
        ds.save_as(tilted / f"{k}.dcm")
    with pytest.raises(InputError, match="tilted or sheared geometry: the slices step 20.0 degrees") as err:
        load_volume(tilted)
    assert "tilted" in str(err.value).split(":")[0]  # names the series folder
    assert load_volume(series)[0].shape[2] == len(slices)  # the untilted series still reads

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        load_volume(tmp_path / "empty")


# ------------------------------------------------------------------------------------ load_pair


def test_load_pair_real_ct_and_segmentation(shared_data):
    ts = shared_data / "totalsegmentator"
    image, label, affine, meta = load_pair(ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz")
    assert image.shape == label.shape == (122, 101, 30) and label.dtype == np.int16
    assert label.max() == 117 and not meta["label_empty"]
    assert meta["label_filename"].endswith("example_seg.nii.gz")

    with pytest.raises(InputError, match=r"label shape \(512, 512, 20\) differs") as err:
        load_pair(ts / "example_ct_sm.nii.gz", ts / "example_seg_dicom.nii.gz")
    assert err.value.path.endswith("example_seg_dicom.nii.gz")
    # the CT passed as its own label: integer HU, but negative
    with pytest.raises(InputError, match="outside 0..32767"):
        load_pair(ts / "example_ct_sm.nii.gz", ts / "example_ct_sm.nii.gz")


def test_load_pair_checks(tmp_path):
    image = _write(tmp_path / "img.nii.gz", np.full((5, 5, 5), -800, np.int16))
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    with pytest.raises(InputError, match="label affine differs .* by up to 0.5 mm"):
        load_pair(image, _write(tmp_path / "shifted.nii.gz", np.ones((5, 5, 5), np.uint8), shifted))
    # below the tolerance: float32 rounding of real headers must not fail a pair
    shifted[0, 3] = AFFINE[0, 3] + 1e-4
    load_pair(image, _write(tmp_path / "close.nii.gz", np.ones((5, 5, 5), np.uint8), shifted))

    soft = np.zeros((5, 5, 5), np.float32)
    soft[2, 2, 2] = 0.5
    with pytest.raises(InputError, match=r"not integers \(e.g. 0.5\)"):
        load_pair(image, _write(tmp_path / "soft.nii.gz", soft))

    empty = _write(tmp_path / "empty.nii.gz", np.zeros((5, 5, 5), np.uint8))
    with pytest.raises(InputError, match="label is empty") as err:
        load_pair(image, empty)
    assert err.value.path == str(empty)
    _, label, _, meta = load_pair(image, empty, allow_empty=True)
    assert meta["label_empty"] and not label.any()


def test_volume_fingerprint(shared_data):
    ts = shared_data / "totalsegmentator"
    items = [
        {"image": str(ts / "example_ct_sm.nii.gz"), "label": str(ts / "example_seg_roi_subset.nii.gz")},
        {"image": str(ts / "example_mr_sm.nii.gz")},  # no label: geometry only
    ]
    fp = volume_fingerprint(items)
    assert fp["n_cases"] == 2 and fp["median_spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert fp["axcodes"] == {"RAS": 1, "LPS": 1} and not fp["anisotropic"]
    assert fp["max_shape"] == [122, 101, 30] and fp["min_shape"] == [117, 91, 20]
    liver = fp["foreground_intensity"]  # label 5 = liver: soft tissue HU
    assert 20 < liver["median"] < 150 and liver["percentile_00_5"] < liver["median"] < liver["percentile_99_5"]


def test_training_reader_is_the_inference_reader(phantom_dir, tmp_path, shared_data):
    """LoadVolumed (training) gives load_volume's array and affine, and its errors name the file."""
    from segreport.data.reader import LoadVolumed

    path = phantom_dir / "imagesTr" / "case_0001.nii.gz"
    item = LoadVolumed(keys="image", image_only=True, ensure_channel_first=True)({"image": str(path)})
    array, affine, _ = load_volume(path)
    np.testing.assert_array_equal(item["image"][0].numpy(), array)
    np.testing.assert_allclose(item["image"].affine.numpy(), affine)
    dicom = shared_data / "totalsegmentator" / "example_ct_dicom"
    d = LoadVolumed(keys="image", image_only=True, ensure_channel_first=True)({"image": str(dicom)})
    np.testing.assert_allclose(d["image"].affine.numpy(), load_volume(dicom)[1])  # LPS -> RAS as at inference
    bad = tmp_path / "nan.nii.gz"
    data = array.copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, affine), bad)
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 1 voxels are NaN or infinite"):
        LoadVolumed(keys="image")({"image": str(bad)})
