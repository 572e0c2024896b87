"""Finding grammar (real QaTa/LViT rows), lung zones, and mask -> sentence on real and phantom masks."""

import csv
import itertools

import nibabel as nib
import numpy as np
import openpyxl
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from segreport.text.findings import NO_FINDING, format_finding, parse_finding
from segreport.transforms.findings import FindingsFromMask, FindingsFromMaskd, LungZonesFromText, LungZonesFromTextd
from segreport.transforms.lung_regions import (
    LungZones,
    LungZonesd,
    lung_label_from_lobes,
    lung_label_from_mask,
    lung_z_extent,
    lung_zone_map,
    side_of_points,
    world_grid,
)
from segreport.vocab import ZONES

MIRROR = {z: z.replace("left", "R").replace("right", "left").replace("R", "right") for z in ZONES}


@pytest.fixture(scope="module")
def real_rows(shared_data):
    with open(shared_data / "qata_cov19_text" / "test_text_first111.csv", newline="") as f:
        qata = [r["Description"] for r in csv.DictReader(f)]
    ws = openpyxl.load_workbook(shared_data / "lvit_lv_loss" / "LV_loss.xlsx", read_only=True).active
    lv = [r[1] for r in ws.iter_rows(min_row=2, values_only=True)]
    assert len(qata) == 111 and len(lv) == 14
    return qata + lv


# ------------------------------------------------------------------------------------- grammar


def test_parses_every_real_row(real_rows):
    for text in real_rows:
        p = parse_finding(text)
        assert p.n_areas is not None and p.n_areas >= 1, text
        assert p.zones, text
        sides = {z.split("_")[1] for z in p.zones}
        assert p.laterality == ("bilateral" if len(sides) == 2 else "unilateral"), text
        # what we write for the parsed content reads back the same
        assert parse_finding(format_finding(p.n_areas, p.zones)).zones == p.zones


@pytest.mark.parametrize(
    "text, n, zones",
    [  # hand-read from the real rows, typos and spacing slips included
        ("Bilateral pulmonary infection, two infected areas,lower left lung and all right lung.", 2,
         {"lower_left", "upper_right", "middle_right", "lower_right"}),
        ("Bilateral pulmonary infection, two infected areas, upper midlle left lung and lower right lung.", 2,
         {"upper_left", "middle_left", "lower_right"}),
        ("Bilateral pulmonary infection, two infected areas,  middle lower left lung and lower right lung.", 2,
         {"middle_left", "lower_left", "lower_right"}),
        ("Bilateral pulmonary infection, two infected areas, middle upper left lung and all right lung.", 2,
         {"upper_left", "middle_left", "upper_right", "middle_right", "lower_right"}),
        ("Bilateral pulmonary infection, three infected areas, middle left lung and upper lower right lung.", 3,
         {"middle_left", "upper_right", "lower_right"}),
        ("Unilateral pulmonary infection, one infected area, lower right lung.", 1, {"lower_right"}),
        ("Bilateral pulmonary infection, four infected areas, upper middle lower left lung and "
         "upper middle lower right lung.", 4, set(ZONES)),
    ],
)  # fmt: skip
def test_hand_checked_rows(text, n, zones):
    p = parse_finding(text)
    assert (p.n_areas, p.zones) == (n, zones)
    assert p.multi_hot == [int(z in zones) for z in ZONES]


def test_real_rows_in_the_set_read_as_hand_checked(real_rows):
    typo = "Bilateral pulmonary infection, two infected areas, upper midlle left lung and lower right lung."
    assert typo in real_rows
    assert "Bilateral pulmonary infection, two infected areas,lower left lung and all right lung." in real_rows


def test_tolerates_typos_glued_words_and_odd_text():
    p = parse_finding("Bilaterall pulmonery infection , 2 infected aeras, lowerleft lung and uper rigth lung")
    assert (p.laterality, p.n_areas, p.zones) == ("bilateral", 2, {"lower_left", "upper_right"})
    assert parse_finding("Unilateral pulmonary infection, one infected area, left lung.").zones == {
        "upper_left", "middle_left", "lower_left"}  # fmt: skip
    for odd in ("", "nothing to see", "lung", "12345"):
        p = parse_finding(odd)
        assert p.zones == set() and p.multi_hot == [0] * 6
    none = parse_finding(NO_FINDING)
    assert (none.n_areas, none.laterality, none.zones) == (0, None, set())


def test_format_matches_real_style_and_round_trips(real_rows):
    assert format_finding(2, {"upper_left", "middle_left", "lower_left", "lower_right"}) == (
        "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
    )
    assert format_finding(1, {"middle_left"}) in real_rows
    assert format_finding(4, ZONES, all_word=False) in real_rows  # LV_loss fig14
    assert format_finding(0, ()) == NO_FINDING
    for k in range(1, 7):
        for zones in itertools.combinations(ZONES, k):
            for n, all_word in ((1, True), (3, False)):
                p = parse_finding(format_finding(n, zones, all_word))
                assert (p.n_areas, p.zones) == (n, set(zones))
    with pytest.raises(ValueError, match="unknown lung zones"):
        format_finding(1, {"upper_lefty"})
    with pytest.raises(ValueError, match="inconsistent"):
        format_finding(0, {"upper_left"})


def test_zones_from_text_transforms():
    t = LungZonesFromText()("Unilateral pulmonary infection, one infected area, middle lower right lung.")
    assert t.dtype == torch.float32 and t.tolist() == [0, 0, 0, 0, 1, 1]
    d = LungZonesFromTextd("text")({"text": NO_FINDING})
    assert d["text_zones"].sum() == 0


# ------------------------------------------------------------------------------------- lung zones


# L, A, S voxel axes: low i is the patient's right, where _two_lungs puts label 1 (right lung)
LAS = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -30], [0, 0, 5.0, -100], [0, 0, 0, 1]])


def _two_lungs(shape=(40, 30, 20)):
    """Box lungs: label 1 (right) at low i, label 2 (left) at high i; consistent with :data:`LAS`."""
    lung = np.zeros(shape, dtype=np.uint8)
    lung[4:16, 5:25, 2:18] = 1
    lung[24:36, 5:25, 5:18] = 2
    return lung


def test_zone_map_follows_world_z_not_the_index():
    lung = _two_lungs()
    # stored inferior-first along k and with i pointing to the patient's left (L, P, I axes)
    affine = np.array([[-2.0, 0, 0, 40], [0, -2.0, 0, 30], [0, 0, -5.0, 100], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("L", "P", "I")
    zones = lung_zone_map(lung, affine)
    z = np.broadcast_to(world_grid(lung.shape, affine, 2), lung.shape)
    for side, label in (("right", 1), ("left", 2)):
        upper, lower = zones == ZONES.index(f"upper_{side}") + 1, zones == ZONES.index(f"lower_{side}") + 1
        assert upper.any() and lower.any()
        assert (upper <= (lung == label)).all()
        assert z[upper].min() > z[lower].max()  # superior = larger world z, whatever k does
    # the same patient stored in the opposite k order: identical zones voxel for voxel
    flip = np.diag([1.0, 1, -1, 1])
    flip[2, 3] = lung.shape[2] - 1
    np.testing.assert_array_equal(lung_zone_map(lung[:, :, ::-1], affine @ flip)[:, :, ::-1], zones)


def test_axial_slice_needs_volume_extent():
    lung, affine = _two_lungs(), LAS
    k = 15
    slice_affine = affine.copy()
    slice_affine[:3, 3] += affine[:3, 2] * k
    with pytest.raises(ValueError, match="z_extent"):
        lung_zone_map(lung[:, :, k], slice_affine)
    got = lung_zone_map(lung[:, :, k], slice_affine, z_extent=lung_z_extent(lung, affine))
    np.testing.assert_array_equal(got, lung_zone_map(lung, affine)[:, :, k])


def test_lung_zones_transforms_with_metatensor_and_lps_meta():
    lung = _two_lungs()
    ras = LAS
    expected = lung_zone_map(lung, ras)
    out = LungZones()(MetaTensor(torch.as_tensor(lung[None]), affine=torch.as_tensor(ras)))
    assert isinstance(out, MetaTensor) and out.shape == (1, *lung.shape)
    np.testing.assert_array_equal(out[0].numpy(), expected)
    lps_affine = torch.as_tensor(np.diag([-1.0, -1, 1, 1]) @ ras)
    lps = MetaTensor(torch.as_tensor(lung[None]), affine=lps_affine, meta={"space": "LPS"})
    np.testing.assert_array_equal(LungZonesd("lung")({"lung": lps})["lung_zones"][0].numpy(), expected)


def test_lobes_and_side_helpers_on_real_totalsegmentator(shared_data):
    img = nib.load(shared_data / "totalsegmentator" / "example_seg.nii.gz")
    lung = lung_label_from_lobes(np.asarray(img.dataobj))
    x = np.broadcast_to(world_grid(lung.shape, img.affine, 0), lung.shape)
    assert x[lung == 2].mean() < x[lung == 1].mean()  # RAS+: the patient's left is -x
    midline = 0.5 * (x[lung == 2].mean() + x[lung == 1].mean())
    pts = np.array([[x[lung == 2].mean(), 0, 0], [x[lung == 1].mean(), 0, 0]])
    assert side_of_points(pts, midline).tolist() == ["left", "right"]
    zones = lung_zone_map(lung, img.affine)
    assert set(np.unique(zones)) == set(range(7))


def test_binary_2d_lung_mask_split_by_display_affine(shared_data):
    # radiological display PNG: rows run anterior -> posterior, columns patient right -> left
    mask = np.asarray(Image.open(shared_data / "covid19_ct_seg_png" / "lungs" / "0500.png")) > 127
    display = np.array([[0.0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    label = lung_label_from_mask(mask, display)
    cols = np.nonzero(mask)[1]
    assert set(np.unique(label[mask])) == {1, 2}
    assert cols[label[mask] == 1].mean() < cols[label[mask] == 2].mean()  # patient right on image left


# ------------------------------------------------------------------------------------- mask -> text


def _ball(shape, centre, r):
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((a - c) ** 2 for a, c in zip(g, centre)) <= r * r


def test_findings_count_zones_specks_and_orientation():
    lung, affine = _two_lungs(), LAS
    mask = _ball(lung.shape, (10, 15, 15), 3) | _ball(lung.shape, (30, 15, 7), 3)
    mask[20, 2, 2] = True  # a one-voxel speck outside the lungs: ignored (min_size)
    f = FindingsFromMask()
    found = f.describe(mask, lung=lung, affine=affine)
    assert found.text == "Bilateral pulmonary infection, two infected areas, lower left lung and upper right lung."
    assert found.n_areas == 2 and found.instances.max() == 2 and found.instances[20, 2, 2] == 0
    by_zone = {tuple(les.zones): les for les in found.lesions}
    assert by_zone[("upper_right",)].centroid[0] > by_zone[("lower_left",)].centroid[0]
    # MetaTensor input, channel-first, affine carried along
    mt = MetaTensor(torch.as_tensor(mask[None].astype(np.uint8)), affine=torch.as_tensor(affine))
    assert f(mt, lung=lung) == found.text
    d = FindingsFromMaskd("label", lung_key="lung")({"label": mt, "lung": lung})
    assert d["text"] == found.text
    assert f(np.zeros_like(mask), lung=lung, affine=affine) == NO_FINDING


def test_lesion_over_the_pleura_takes_the_nearest_zone():
    lung, affine = _two_lungs(), LAS
    mask = np.zeros(lung.shape, dtype=bool)
    mask[36:39, 10:14, 15:17] = True  # just lateral of the left lung (label 2), at its top
    text = FindingsFromMask()(mask, lung=lung, affine=affine)
    assert parse_finding(text).zones == {"upper_left"}


def test_2d_slice_with_the_volume_zone_map():
    lung, affine = _two_lungs(), LAS
    zones = lung_zone_map(lung, affine)
    k = 6
    mask = np.zeros(lung.shape[:2], dtype=bool)
    mask[8:12, 10:14] = True
    mask[28:32, 10:14] = True
    slice_affine = affine.copy()
    slice_affine[:3, 3] += affine[:3, 2] * k
    text = FindingsFromMask()(mask, affine=slice_affine, zone_map=zones[:, :, k])
    assert text == "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung."
    with pytest.raises(ValueError, match="z_extent"):  # an axial slice alone cannot know its level
        FindingsFromMask()(mask, lung=lung[:, :, k], affine=slice_affine)


def test_fallback_without_lungs_uses_affine_and_body_centre():
    shape, affine = (40, 40, 30), np.diag([-2.0, -2.0, 4.0, 1.0])  # L, P, S voxel axes
    mask = _ball(shape, (24, 20, 26), 2)  # i > centre: world x < midline -> patient left, near the top
    f = FindingsFromMask()
    assert f(mask, affine=affine) == "Unilateral pulmonary infection, one infected area, upper left lung."
    # a body lying off-centre toward high i moves the midline past the lesion: now the right side
    image = np.full(shape, -1000.0)
    image[22:40, 5:35, :] = 40.0
    assert f(mask, affine=affine, image=image) == "Unilateral pulmonary infection, one infected area, upper right lung."


# ------------------------------------------------------------------------------------- real MosMedData masks

MOSMED = ["study_0255", "study_0262", "study_0287", "study_0300"]  # bilateral, unilateral L and R, few areas


@pytest.mark.parametrize("study", MOSMED)
def test_side_follows_the_affine_on_real_mosmeddata(shared_data, study):
    img = nib.load(shared_data / "mosmeddata_masks" / "masks" / f"{study}_mask.nii.gz")
    mask, affine = np.asarray(img.dataobj) > 0, img.affine
    assert nib.aff2axcodes(affine) == ("L", "A", "S")
    f = FindingsFromMask()
    found = f.describe(mask, affine=affine)
    assert found.n_areas >= 1

    # each one-sided lesion sits on the side of its world centroid about the field-of-view centre
    midline = nib.affines.apply_affine(affine, (np.array(mask.shape) - 1) / 2)[0]
    voxel_centroids = ndimage.center_of_mass(found.instances > 0, found.instances, range(1, found.n_areas + 1))
    for les, vc in zip(found.lesions, voxel_centroids):
        world = nib.affines.apply_affine(affine, vc)
        np.testing.assert_allclose(les.centroid, world, atol=1e-6)
        sides = {z.split("_")[1] for z in les.zones}
        if len(sides) == 1:
            assert sides == {side_of_points(world, midline)[0]}

    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = mask.shape[0] - 1
    # the same patient stored the other way along i: identical sentence
    assert f(mask[::-1], affine=affine @ flip) == found.text
    # the mirror-image patient (array flipped, affine kept; or affine flipped, array kept): sides swap
    mirrored = {MIRROR[z] for z in found.zones}
    for swapped in (f(mask[::-1], affine=affine), f(mask, affine=affine @ flip)):
        assert parse_finding(swapped).zones == mirrored


def test_unilateral_real_masks_name_the_right_side(shared_data):
    """Hand-checked: study_0262's lesions lie at world x < FOV centre (patient left), study_0287's at > centre."""
    f = FindingsFromMask()
    for study, side in (("study_0262", "left"), ("study_0287", "right")):
        img = nib.load(shared_data / "mosmeddata_masks" / "masks" / f"{study}_mask.nii.gz")
        mask = np.asarray(img.dataobj) > 0
        x = nib.affines.apply_affine(img.affine, np.argwhere(mask))[:, 0]
        centre = nib.affines.apply_affine(img.affine, (np.array(mask.shape) - 1) / 2)[0]
        assert ((x < centre) if side == "left" else (x > centre)).all()
        p = parse_finding(f(mask, affine=img.affine))
        assert p.laterality == "unilateral" and {z.split("_")[1] for z in p.zones} == {side}


# ------------------------------------------------------------------------------------- phantom with known truth


def test_phantom_case_sentence_from_loaded_files(phantom_dir):
    import json

    from monai.transforms import EnsureChannelFirstd, LoadImaged

    load = LoadImaged(["label", "lung"], image_only=True)
    chan = EnsureChannelFirstd(["label", "lung"])
    metas = [json.loads(p.read_text()) for p in sorted((phantom_dir / "cases").glob("*.json"))]
    lesioned = [m for m in metas if m["lesions"]]
    assert lesioned
    for meta in lesioned:
        cid = meta["case_id"]
        files = {"label": phantom_dir / "labelsTr" / f"{cid}.nii.gz", "lung": phantom_dir / "lungsTr" / f"{cid}.nii.gz"}
        d = chan(load({k: str(v) for k, v in files.items()}))
        assert nib.aff2axcodes(d["label"].affine.numpy()) == tuple(meta["orientation"])
        assert FindingsFromMaskd("label", lung_key="lung")(d)["text"] == meta["text"]
        # truth by construction: each lesion lies in the lung whose label it overlaps, and that is its side
        lesions = np.asarray(nib.load(phantom_dir / "lesionsTr" / f"{cid}.nii.gz").dataobj)
        lung = d["lung"][0].numpy().astype(int)
        for les in meta["lesions"]:
            on = lung[lesions == les["id"]]
            side = "right" if np.bincount(on, minlength=3)[1] > np.bincount(on, minlength=3)[2] else "left"
            assert {z.split("_")[1] for z in les["zones"]} == {side}
