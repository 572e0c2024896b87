"""Transforms: HU window, lesion ROI crop + paste back, axial slicing, click simulation, attributes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from scipy import ndimage

from segreport.errors import InputError
from segreport.transforms import (
    IGNORE_INDEX,
    ClickSimulator,
    CropLargestLesion,
    CropLargestLesiond,
    EncodeAttributesd,
    HUWindow,
    HUWindowd,
    SimulateClicksd,
    SliceDataset,
    VolumeToSlices,
    VolumeToSlicesd,
    axial_axis,
    decode_attributes,
    encode_attributes,
    largest_lesion_center,
    paste_back,
    sample_click,
    stack_slices,
)
from segreport.transforms.clicks import interior_distance
from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES

# ---------------------------------------------------------------- HU window


def test_hu_window_lung_preset_clips_and_scales():
    hu = np.array([[[-2000.0, -1350.0, -600.0, 150.0, 3000.0]]])
    out = np.asarray(HUWindow("lung")(hu))
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5, 1.0, 1.0]]], atol=1e-6)
    assert out.dtype == np.float32


def test_hu_window_explicit_bounds_and_errors():
    d = HUWindowd(["image", "other"], a_min=-100, a_max=100, allow_missing_keys=True)({"image": torch.tensor([[-100.0, 0.0, 50.0]])})
    np.testing.assert_allclose(np.asarray(d["image"]), [[0.0, 0.5, 0.75]])
    with pytest.raises(ValueError, match="preset"):
        HUWindow("brain")
    with pytest.raises(ValueError, match="a_min < a_max"):
        HUWindow(a_min=100, a_max=-100)


# ---------------------------------------------------------------- lesion ROI crop


def _two_lesions_3d():
    lab = np.zeros((1, 30, 40, 20), np.uint8)
    lab[0, 2:5, 2:5, 2:5] = 1  # small
    lab[0, 12:20, 25:35, 8:14] = 1  # largest
    big = np.zeros_like(lab)
    big[0, 12:20, 25:35, 8:14] = 1
    return lab, big


def test_crop_picks_largest_and_pastes_back_exactly():
    lab, big = _two_lesions_3d()
    img = np.random.default_rng(0).normal(size=lab.shape).astype(np.float32)
    assert largest_lesion_center(lab) == (16, 30, 11)
    d = CropLargestLesiond(["image", "label"], roi_size=(16, 16, 8))({"image": img, "label": lab})
    assert d["image"].shape == d["label"].shape == (1, 16, 16, 8)
    assert d["crop_box"] == {"box_start": [8, 22, 7], "box_end": [24, 38, 15], "orig_size": [30, 40, 20]}
    assert int(d["label"].sum()) == big.sum()  # the whole largest lesion, none of the small one
    back = paste_back(d["label"], d["crop_box"])
    np.testing.assert_array_equal(np.asarray(back), big)
    # image values inside the box come back too (the crop is a pure copy)
    np.testing.assert_array_equal(np.asarray(paste_back(d["image"], d["crop_box"]))[0, 8:24, 22:38, 7:15], img[0, 8:24, 22:38, 7:15])


def test_crop_pads_near_border_and_when_roi_exceeds_image_2d():
    lab = np.zeros((1, 10, 12), np.float32)
    lab[0, 0:3, 9:12] = 1  # corner lesion
    img = np.arange(120, dtype=np.float32).reshape(1, 10, 12) + 1
    crop = CropLargestLesion(roi_size=(24, 24))  # larger than the image on both axes
    out = crop(img, lab)
    assert out.shape == (1, 24, 24)
    info = crop.compute_box(img, lab)
    assert info["box_start"] == [1 - 12, 10 - 12]  # lesion bbox centre (1, 10) at ROI index (12, 12)
    assert float(out.sum()) == float(img.sum())  # every image voxel once, the rest zero padding
    np.testing.assert_array_equal(np.asarray(paste_back(out, info)), img)
    np.testing.assert_array_equal(np.asarray(paste_back(crop(lab, crop_info=info), info)), lab)


def test_crop_records_trace_moves_affine_and_inverts_with_invertd():
    lab, big = _two_lesions_3d()
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    affine[:3, 3] = [-100.0, 20.0, 300.0]
    data = {"image": MetaTensor(torch.rand(lab.shape), affine=affine), "label": MetaTensor(torch.as_tensor(lab), affine=affine)}
    pre = Compose([CropLargestLesiond(["image", "label"], roi_size=(16, 16, 8), box_key=None)])
    d = pre(data)
    assert "crop_box" not in d
    op = d["label"].applied_operations[-1]
    assert op["class"] == "CropLargestLesion" and op["extra_info"]["box_start"] == [8, 22, 7]
    # world position of cropped voxel 0 == world position of original voxel box_start
    np.testing.assert_allclose(d["label"].affine.numpy()[:3, 3], (affine @ [8, 22, 7, 1])[:3])
    d["pred"] = d["label"].clone()
    inv = Invertd(keys="pred", transform=pre, orig_keys="label", nearest_interp=True)(d)
    np.testing.assert_array_equal(inv["pred"].numpy(), big)
    np.testing.assert_allclose(inv["pred"].affine.numpy(), affine)


def test_crop_center_override_and_empty_label():
    lab = np.zeros((1, 20, 20), np.uint8)
    d = CropLargestLesiond("image", roi_size=8, center_key="points")(
        {"image": np.ones((1, 20, 20)), "label": lab, "points": np.array([[3, 15], [10, 10]])}
    )
    assert d["crop_box"]["box_start"] == [3 - 4, 15 - 4]  # first click, not the label (which is empty)
    clicks = {"points": torch.tensor([[0, 0], [12, 5], [2, 2]]), "point_labels": torch.tensor([-1, 1, 0])}
    d = CropLargestLesiond("image", roi_size=8, center_key="points", center_labels_key="point_labels")({"image": np.ones((1, 20, 20)), **clicks})
    assert d["crop_box"]["box_start"] == [12 - 4, 5 - 4]  # first positive click: padding and negatives skipped
    assert CropLargestLesion(8).compute_box(lab, lab)["box_start"] == [6, 6]  # on_empty="center"
    with pytest.raises(InputError, match="no lesion"):
        CropLargestLesion(8, on_empty="raise")(torch.zeros(1, 20, 20), torch.zeros(1, 20, 20))


def test_crop_real_mosmeddata_mask_pastes_back(shared_data):
    path = shared_data / "mosmeddata_masks" / "masks" / "study_0255_mask.nii.gz"
    lab = (np.asarray(nib.load(str(path)).dataobj) > 0).astype(np.uint8)[None]
    components, _ = ndimage.label(lab[0], ndimage.generate_binary_structure(3, 3))
    largest = components == np.argmax(np.bincount(components.ravel())[1:]) + 1
    roi = (160, 160, 48)  # 48 > 38 slices: padded along z
    d = CropLargestLesiond("label", roi_size=roi)({"label": lab})
    assert d["label"].shape == (1, *roi)
    back = np.asarray(paste_back(d["label"], d["crop_box"]))[0]
    inside = np.zeros(lab.shape[1:], bool)
    inside[tuple(slice(max(0, s), e) for s, e in zip(d["crop_box"]["box_start"], d["crop_box"]["box_end"]))] = True
    np.testing.assert_array_equal(back, lab[0] * inside)  # exactly the label inside the box, zeros outside
    assert back[largest].all()


# ---------------------------------------------------------------- axial slicing


def test_axial_axis_from_affine_not_position():
    assert axial_axis(np.eye(4)) == 2
    perm = np.eye(4)[:, [2, 0, 1, 3]]  # voxel axis 0 runs along world z
    assert axial_axis(perm) == 0
    oblique = np.eye(4)
    oblique[:3, :3] = [[0.0, 0.2, 1.0], [0.1, 1.0, 0.0], [-3.0, 0.0, 0.1]]  # LPS-ish sign, slight tilt
    assert axial_axis(oblique) == 0


def test_real_ct_axial_axis_and_transposed_copy(shared_data):
    img = nib.load(str(shared_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    assert axial_axis(img.affine) == 2
    # same scan stored z-first: data axes (z, x, y), affine columns permuted to match
    vol_t = vol.transpose(2, 0, 1)
    aff_t = img.affine[:, [2, 0, 1, 3]]
    assert axial_axis(aff_t) == 0
    ijk = np.array([5, 7, 9])
    np.testing.assert_allclose(nib.affines.apply_affine(aff_t, ijk[[2, 0, 1]]), nib.affines.apply_affine(img.affine, ijk))
    slicer = VolumeToSlicesd(keys="image", case_id_key="case_id")
    a = slicer({"image": MetaTensor(torch.from_numpy(vol[None]), affine=torch.from_numpy(img.affine)), "case_id": "ct"})
    b = slicer({"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(vol_t[None])), affine=torch.from_numpy(aff_t)), "case_id": "ct"})
    assert len(a) == len(b) == vol.shape[2]
    assert a[11]["slice_axis"] == 2 and b[11]["slice_axis"] == 0
    for k in (0, 11, 29):
        np.testing.assert_array_equal(a[k]["image"].numpy(), b[k]["image"].numpy())
        np.testing.assert_array_equal(a[k]["image"].numpy()[0], vol[:, :, k])


def _volume_z_first():
    """(1, Z=6, 5, 4) volume whose first spatial axis is world z, lesion on slices 2 and 3."""
    affine = np.eye(4)[:, [2, 0, 1, 3]]
    img = np.arange(6 * 5 * 4, dtype=np.float32).reshape(1, 6, 5, 4)
    lab = np.zeros_like(img, dtype=np.uint8)
    lab[0, 2, 1:3, 1:3] = 1
    lab[0, 3, 2, 2] = 1
    return img, lab, affine


def test_slice_modes_case_id_and_findings():
    img, lab, affine = _volume_z_first()
    item = {"image": img, "label": lab, "image_meta_dict": {"affine": affine}, "case_id": "c1", "source": "phantom", "text": "volume"}
    lesion = VolumeToSlicesd(mode="lesion", finding_fn=lambda s: f"{int(s['label'].sum())} voxels")(item)
    assert [s["slice_index"] for s in lesion] == [2, 3]
    assert [s["text"] for s in lesion] == ["4 voxels", "1 voxels"]
    assert all(s["case_id"] == "c1" and s["source"] == "phantom" and s["image"].shape == (1, 5, 4) for s in lesion)
    np.testing.assert_array_equal(lesion[0]["label"][0], lab[0, 2])
    assert "text" not in VolumeToSlicesd()(item)[0]  # the volume's own text is not a slice finding
    mixes = [[s["slice_index"] for s in VolumeToSlicesd(mode="mix", neg_ratio=1.0, seed=s)(item)] for s in (1, 1, 2, 3)]
    assert mixes[0] == mixes[1]  # seeded
    for m in mixes:
        assert len(m) == 4 and {2, 3} <= set(m)
    assert len(VolumeToSlices(mode="all")(img, affine=affine)) == 6
    with pytest.raises(InputError, match="no affine"):
        VolumeToSlicesd()({"image": img, "label": lab, "case_id": "c1"})


def test_stack_slices_restores_volume_on_original_grid():
    img, lab, affine = _volume_z_first()
    like = MetaTensor(torch.from_numpy(img), affine=torch.from_numpy(affine))
    slices = VolumeToSlicesd(mode="lesion")({"image": like, "label": torch.from_numpy(lab), "case_id": "c1"})
    preds = [s["label"] for s in slices]
    out = stack_slices(preds, like=like, slice_indices=[s["slice_index"] for s in slices])
    assert isinstance(out, MetaTensor)
    np.testing.assert_array_equal(out.numpy(), lab)  # missing slices filled with 0, which is the truth here
    np.testing.assert_allclose(out.affine.numpy(), affine)
    every = VolumeToSlicesd(keys="image")({"image": like, "case_id": "c1"})
    np.testing.assert_array_equal(stack_slices([s["image"].numpy()[0] for s in every], like), img)  # (H, W) preds
    with pytest.raises(ValueError, match="prediction shape"):
        stack_slices([np.zeros((1, 4, 5))], like, slice_indices=[0])


def test_slice_dataset_holds_slices_for_monai():
    img, lab, affine = _volume_z_first()
    vols = [{"image": img, "label": lab, "image_meta_dict": {"affine": affine}, "case_id": f"c{i}"} for i in range(2)]
    ds = SliceDataset(vols, mode="lesion", transform=lambda s: {**s, "seen": True})
    assert len(ds) == 4
    assert ds[3]["case_id"] == "c1" and ds[3]["slice_index"] == 3 and ds[3]["seen"]


# ---------------------------------------------------------------- click simulation


def test_first_click_inside_gt_at_max_distance_2d_and_3d():
    gt = np.zeros((20, 20), bool)
    gt[3:12, 5:14] = True  # 9 x 9 box: the centre (7, 9) is the unique farthest point
    assert sample_click(gt, rng=0) == ((7, 9), 1)
    gt3 = np.zeros((12, 12, 12), bool)
    gt3[2:9, 3:10, 4:11] = True
    assert sample_click(gt3, rng=0) == ((5, 6, 7), 1)


def test_click_on_a_thin_lesion_goes_to_its_centre_not_its_rim():
    # 2 slices thick: every voxel is 1 voxel from the background, so the interior distance ties everywhere
    gt = np.zeros((12, 12, 6), bool)
    gt[3:8, 4:9, 2:4] = True
    for seed in range(5):
        (point, _) = sample_click(gt, rng=seed)
        assert point[:2] == (5, 6) and point[2] in (2, 3)
    # spacing in mm decides which axis is "thin": 1 x 1 x 5 mm makes the in-plane centre the unique farthest
    (point, _) = sample_click(gt, rng=0, spacing=(1.0, 1.0, 5.0))
    assert point[:2] == (5, 6)


def test_correction_click_fn_positive_fp_negative():
    gt = np.zeros((30, 30), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[5:25, 15:25] = False  # misses the right half: FN
    (point, label) = sample_click(gt, pred, rng=0)
    fn = gt & ~pred
    dist = interior_distance(fn)
    assert label == 1 and fn[point] and dist[point] == dist.max()
    pred = gt.copy()
    pred[0:30, 0:5] = True  # spills out to the left: FP only
    (point, label) = sample_click(gt, pred, rng=0)
    assert label == 0 and pred[point] and not gt[point]
    assert sample_click(gt, gt) is None  # perfect prediction: nothing to click


def test_click_jitter_seeded_and_empty_gt():
    gt = np.zeros((40, 40), bool)
    gt[5:35, 5:35] = True
    clicks = [sample_click(gt, rng=np.random.default_rng(s), jitter=0.5)[0] for s in (7, 7, 8, 9, 10)]
    assert clicks[0] == clicks[1]
    assert len(set(clicks)) > 1  # jitter really spreads the clicks
    assert all(gt[c] for c in clicks)
    assert sample_click(np.zeros((8, 8)), rng=0) is None
    d = SimulateClicksd(max_points=3)({"label": np.zeros((1, 8, 8))})
    assert d["points"].shape == (3, 2) and d["point_labels"].tolist() == [-1, -1, -1]


def test_simulate_clicksd_accumulates_and_pads():
    gt = np.zeros((1, 16, 16, 8), np.uint8)
    gt[0, 4:12, 4:12, 2:6] = 1
    sim = SimulateClicksd(max_points=4, seed=3)
    d = sim({"label": gt})
    assert d["point_labels"].tolist() == [1, -1, -1, -1]
    assert gt[(0, *d["points"][0].tolist())] == 1
    pred = np.zeros_like(gt, dtype=np.float32)
    pred[0, 0:3, 0:3, 0:3] = 0.9  # misses the lesion (FN 256 voxels) and adds a small FP
    d = sim({**d, "pred": pred})
    assert d["points"].shape == (4, 3) and d["point_labels"].tolist() == [1, 1, -1, -1]
    assert ClickSimulator(seed=0)(gt, pred)[1] == 1
    with pytest.raises(ValueError, match="max_points"):
        SimulateClicksd(max_points=1)({**d, "pred": pred})


# ---------------------------------------------------------------- attributes


def test_encode_attributes_tolerant_and_roundtrip():
    enc = encode_attributes({"id": 3, "lesion_type": "nodule", "shape": "Round", "invasion": "no", "density": "HYPER", "heterogeneity": "Heterogenous", "surface": "ill_defined"})
    assert enc == {"shape": 0, "invasion": 0, "density": 2, "heterogeneity": 1, "surface": 1}
    for group, classes in ATTRIBUTE_GROUPS.items():
        for i, name in enumerate(classes):
            assert encode_attributes({g: 0 for g in ATTRIBUTE_NAMES} | {group: name.upper().replace("-", "_")})[group] == i
    full = {g: c[-1] for g, c in ATTRIBUTE_GROUPS.items()}
    assert decode_attributes(encode_attributes(full)) == full
    assert decode_attributes(torch.tensor([1, 1, 0, 0, IGNORE_INDEX]))["surface"] is None


def test_encode_attributes_errors_and_missing():
    good = {g: 0 for g in ATTRIBUTE_NAMES}
    with pytest.raises(InputError, match="'density'.*'bright'.*hypodense"):
        encode_attributes(good | {"density": "bright"}, path="case.json")
    with pytest.raises(InputError, match="'surface' missing"):
        encode_attributes({k: v for k, v in good.items() if k != "surface"})
    assert encode_attributes({"shape": "irregular"}, missing="ignore") == {"shape": 1} | {g: IGNORE_INDEX for g in ATTRIBUTE_NAMES[1:]}
    with pytest.raises(InputError):
        encode_attributes(good | {"shape": 4})  # index out of range


def test_encode_attributesd_per_lesion_list():
    lesions = [{"id": 1, "shape": "irregular", "invasion": 1, "density": "iso", "heterogeneity": "homo", "surface": "smooth"}, {"id": 2, "shape": "nodular"}]
    d = EncodeAttributesd(missing="ignore")({"attributes": lesions, "case_id": "p1"})
    assert d["attributes_labels"].tolist() == [[1, 1, 1, 0, 0], [3, -100, -100, -100, -100]]
    assert d["attributes"] is lesions
    with pytest.raises(InputError, match="p1"):
        EncodeAttributesd()({"attributes": lesions, "case_id": "p1"})
