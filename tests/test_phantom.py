"""Synthetic chest-CT phantom: determinism, HU per tissue, geometry, realised attributes, severity, 2D export."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import openpyxl
import pytest
from PIL import Image
from scipy import ndimage

from segreport.phantom import (
    LESION_TYPES,
    TISSUES,
    TYPE_HU,
    ensure_dataset,
    generate_case,
    generate_dataset,
)
from segreport.phantom.export import lung_window, render_preview
from segreport.phantom.plan import CLASS_FLOOR, DENSITIES_OF, FOCAL_SHARE, lesion_plan, quota
from segreport.text.findings import parse_finding
from segreport.transforms.findings import FindingsFromMask
from segreport.transforms.lung_regions import lung_zone_map, world_grid
from segreport.vocab import ATTRIBUTE_GROUPS, ZONES, severity_from_percent

SMALL = dict(shape=(96, 96, 24), spacing=(3.2, 3.2, 10.0))


def _load(root: Path, folder: str, cid: str):
    img = nib.load(root / folder / f"{cid}.nii.gz")
    return np.asarray(img.dataobj), img.affine


def _cases(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "cases").glob("*.json"))]


def _digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    kw = dict(n_cases=2, shape=(64, 64, 16), spacing=(4.8, 4.8, 15.0))
    generate_dataset(tmp_path / "a", seed=5, **kw)
    generate_dataset(tmp_path / "b", seed=5, **kw)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and any(k.endswith(".xlsx") for k in a) and any(k.endswith(".png") for k in a)
    generate_dataset(tmp_path / "c", seed=6, export_2d=False, **kw)
    assert _digest(tmp_path / "c")["imagesTr/case_0000.nii.gz"] != a["imagesTr/case_0000.nii.gz"]


def test_ensure_dataset_generates_once_and_never_over_user_data(tmp_path):
    kw = dict(n_cases=2, shape=(64, 64, 16), spacing=(4.8, 4.8, 15.0), export_2d=False)
    user = tmp_path / "mine"
    (user / "imagesTr").mkdir(parents=True)  # someone's own dataset: must be left alone
    assert ensure_dataset(user, ("dataset.json", "imagesTr"), **kw) == str(user)
    assert not (user / "dataset.json").exists() and not any((user / "imagesTr").iterdir())
    fresh = tmp_path / "fresh"
    ensure_dataset(fresh, ("dataset.json", "imagesTr"), seed=5, **kw)
    first = _digest(fresh)
    assert "dataset.json" in first and len([k for k in first if k.startswith("imagesTr/")]) == 2
    ensure_dataset(fresh, ("dataset.json", "imagesTr"), seed=6, **kw)  # present now: not regenerated
    assert _digest(fresh) == first


@pytest.fixture(scope="module")
def ct0_case():
    return generate_case("h", "CT-0", seed=1, index=0, **SMALL)


def test_hounsfield_units_per_tissue(ct0_case):
    ct, tissue = ct0_case.ct.astype(float), ct0_case.tissue
    med = {name: np.median(ct[tissue == code]) for name, code in TISSUES.items()}
    assert -1024 <= med["air"] <= -980
    assert -130 <= med["fat"] <= -60
    assert 20 <= med["soft tissue"] <= 70
    assert -900 <= med["lung"] <= -800
    assert 400 <= ct[tissue == TISSUES["bone"]].mean() <= 1000
    assert ct0_case.ct.dtype == np.int16 and ct0_case.label.sum() == 0
    assert ct0_case.meta["severity"] == "CT-0" and ct0_case.meta["text"] == "No pulmonary infection."
    # CT noise of about 12 HU (robust spread: partial volume at the skin is not noise)
    q25, q75 = np.percentile(ct[tissue == TISSUES["air"]], [25, 75])
    assert 5 < (q75 - q25) / 1.349 < 25


def test_geometry_spacing_orientation_and_patient_sides(phantom_dir):
    dataset = json.loads((phantom_dir / "dataset.json").read_text())
    for meta in _cases(phantom_dir):
        lung, affine = _load(phantom_dir, "lungsTr", meta["case_id"])
        assert "".join(nib.aff2axcodes(affine)) == meta["orientation"] == dataset["orientation"] == "LPS"
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), meta["spacing"])
        assert list(lung.shape) == meta["shape"]
        x = np.broadcast_to(world_grid(lung.shape, affine, 0), lung.shape)
        # RAS+ world: +x is the patient's right, so the LEFT lung (2) has the smaller world x
        assert x[lung == 2].mean() < x[lung == 1].mean()
        z = np.broadcast_to(world_grid(lung.shape, affine, 2), lung.shape)
        zones = lung_zone_map(lung, affine)
        assert z[zones == ZONES.index("upper_left") + 1].mean() > z[zones == ZONES.index("lower_left") + 1].mean()


def test_orientation_is_only_storage():
    """LPS and RAI storage of the same seed: the same patient, arrays mirrored, identical findings."""
    a = generate_case("o", "CT-1", seed=0, index=2, orientation="LPS", **SMALL)
    b = generate_case("o", "CT-1", seed=0, index=2, orientation="RAI", **SMALL)
    assert (a.meta["orientation"], b.meta["orientation"]) == ("LPS", "RAI")
    np.testing.assert_array_equal(a.ct, b.ct[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(a.lung, b.lung[::-1, ::-1, ::-1])
    ijk = np.array([3, 7, 11])
    other = np.array(a.ct.shape) - 1 - ijk
    np.testing.assert_allclose(nib.affines.apply_affine(a.affine, ijk), nib.affines.apply_affine(b.affine, other))
    assert a.meta["text"] == b.meta["text"] and a.meta["n_areas"] >= 1
    with pytest.raises(ValueError, match="orientation"):
        generate_case("o", "CT-1", seed=0, index=2, orientation="SAL", **SMALL)


@pytest.fixture(scope="module")
def lesion_cases(phantom_dir):
    """A few focal-lesion (CT-1) cases in memory plus the fixture's cases from disk: (meta, ct, lesions, lung)."""
    out = []
    plan = lesion_plan(20, np.random.default_rng(5))  # every attribute class at least CLASS_FLOOR times
    for i in range(4):
        case = generate_case(f"f{i}", "CT-1", seed=5, index=i, recipes=plan[5 * i : 5 * i + 5], **SMALL)
        out.append((case.meta, case.ct, case.lesions, case.lung))
    for meta in _cases(phantom_dir):
        cid = meta["case_id"]
        arrays = [_load(phantom_dir, f, cid)[0] for f in ("imagesTr", "lesionsTr", "lungsTr")]
        out.append((meta, *arrays))
    return out


def _edge_step(ct, lesion, lung, others):
    """Median |HU step| across in-plane boundary pairs (inside lesion -> lung outside), per unit contrast."""
    steps = []
    for axis in (0, 1):
        for shift in (1, -1):
            out = np.roll(lesion, shift, axis=axis)  # voxels whose neighbour is in the lesion
            pair_out = out & ~lesion & lung & ~others
            if pair_out.any():
                inside = np.roll(ct, shift, axis=axis)[pair_out]
                steps.append(inside.astype(float) - ct[pair_out])
    return np.median(np.concatenate(steps)) if steps else np.nan


def test_attributes_are_realised_in_the_image(lesion_cases):
    seen = Counter()
    for meta, ct, lesions, lung in lesion_cases:
        lung_mask = lung > 0
        background = np.median(ct[lung_mask & (lesions == 0)])
        for les in meta["lesions"]:
            m = lesions == les["id"]
            assert m.sum() == les["voxels"]
            seen[les["lesion_type"]] += 1
            for group in ATTRIBUTE_GROUPS:
                assert les[group] in ATTRIBUTE_GROUPS[group]
                seen[group, les[group]] += 1
            core = ndimage.binary_erosion(m)
            core = core if core.sum() >= 8 else m
            mean = ct[core].mean()
            lo, hi = TYPE_HU[les["lesion_type"]]
            assert lo <= mean <= hi, (les["lesion_type"], mean)
            # density class agrees with the HU against the soft-tissue reference (40 HU +- 50)
            assert {"hypodense": mean < -10, "isodense": -10 <= mean <= 90, "hyperdense": mean > 90}[les["density"]]
            # surface: a sharp edge steps most of the lesion-to-lung contrast in one voxel, a blurred one not
            # (sharp edges measure 0.8-1.05, blurred 0.1-0.5 with small lesions in the tail; a cavity's inner
            # wall is always sharp, so shells are left out)
            step = _edge_step(ct, m, lung_mask, (lesions > 0) & ~m) / (np.median(ct[core]) - background)
            if les["shape"] != "wall thickening":
                assert (step > 0.7) if les["surface"] == "well-defined" else (step < 0.6), (les, step)
            # invasion: contact with non-lung body tissue (chest wall, mediastinum, diaphragm)
            touches = (ndimage.binary_dilation(m, np.ones((3, 3, 3), bool)) & ~lung_mask & (ct > -500)).any()
            assert touches == (les["invasion"] == ATTRIBUTE_GROUPS["invasion"][1])
    assert set(LESION_TYPES) <= set(seen)
    missing = [(g, c) for g, classes in ATTRIBUTE_GROUPS.items() for c in classes if not seen[g, c]]
    assert not missing, f"attribute classes never realised: {missing}"


def test_heterogeneous_lesions_are_mottled(lesion_cases):
    spread = {"heterogeneous": [], "homogeneous": []}
    for meta, ct, lesions, _ in lesion_cases:
        for les in meta["lesions"]:
            core = ndimage.binary_erosion(lesions == les["id"])
            if core.sum() >= 30:
                q25, q75 = np.percentile(ct[core], [25, 75])
                spread[les["heterogeneity"]].append((q75 - q25) / 1.349)
    assert spread["heterogeneous"] and spread["homogeneous"]
    assert min(spread["heterogeneous"]) > max(spread["homogeneous"])


def test_quota_keeps_proportions_and_floor():
    assert quota({"a": 0.5, "b": 0.3, "c": 0.2}, 10) == {"a": 5, "b": 3, "c": 2}
    assert quota({"a": 0.9, "b": 0.05, "c": 0.05}, 20) == {"a": 16, "b": 2, "c": 2}  # floor 2 beats 1
    assert quota({"a": 0.9, "b": 0.1}, 3) == {"a": 2, "b": 1}  # too few for the floor: at most n // classes each
    assert sum(quota(FOCAL_SHARE["shape"], 37).values()) == 37


@pytest.mark.parametrize("n", [8, 23, 60])
def test_lesion_plan_holds_every_class_in_its_share(n):
    plan = lesion_plan(n, np.random.default_rng(n))
    assert len(plan) == n
    for r in plan:
        assert r.density in DENSITIES_OF[r.shape]
    got = {
        "shape": Counter(r.shape for r in plan), "density": Counter(r.density for r in plan),
        "heterogeneity": Counter(ATTRIBUTE_GROUPS["heterogeneity"][r.heterogeneous] for r in plan),
        "surface": Counter(ATTRIBUTE_GROUPS["surface"][r.ill_defined] for r in plan),
        "invasion": Counter(ATTRIBUTE_GROUPS["invasion"][r.invasive] for r in plan),
    }
    for group, shares in FOCAL_SHARE.items():
        assert dict(got[group]) == {k: v for k, v in quota(shares, n).items() if v}, group
        assert min(got[group][c] for c in shares) >= min(CLASS_FLOOR, n // len(shares))


def test_planned_lesions_are_painted_as_planned(lesion_cases):
    """Density is targeted when painting and measured afterwards: the two agree for the planned lesions,
    as do shape (the geometry drawn), surface and invasion."""
    planned = [les for meta, *_ in lesion_cases for les in meta["lesions"] if les["aimed"]]
    assert len(planned) >= 20
    for group in ATTRIBUTE_GROUPS:
        agree = np.mean([les["aimed"][group] == les[group] for les in planned])
        assert agree >= (1.0 if group == "shape" else 0.8), (group, agree)


def test_every_split_holds_every_class_and_the_counts_are_recorded(tmp_path):
    generate_dataset(tmp_path, n_cases=20, seed=3, export_2d=False, split_ratios=(0.5, 0.2, 0.3), **SMALL)
    ds = json.loads((tmp_path / "dataset.json").read_text())
    splits = json.loads((tmp_path / "splits.json").read_text())
    metas = {m["case_id"]: m for m in _cases(tmp_path)}
    counts = ds["lesion_counts"]
    assert ds["split_ratios"] == [0.5, 0.2, 0.3] and [len(splits[k]) for k in ("training", "validation", "test")] == [10, 4, 6]
    for split, ids in splits.items():
        lesions = [les for cid in ids for les in metas[cid]["lesions"]]
        planned = [les for les in lesions if les["aimed"]]
        for group, classes in ATTRIBUTE_GROUPS.items():
            # the recorded counts are the case files' own
            assert counts["measured"][split][group] == {c: sum(les[group] == c for les in lesions) for c in classes}
            n_planned = sum(counts["planned"][split][group].values())
            floor = min(CLASS_FLOOR, n_planned // len(classes))
            assert min(counts["planned"][split][group].values()) >= floor, (split, group)
            assert sum(les["aimed"][group] == c for les in planned for c in classes) == len(planned)
        assert len(planned) >= 0.8 * sum(counts["planned"][split]["shape"].values())  # most find a place


def test_severity_labels_and_text_agree_with_the_masks(phantom_dir):
    metas = _cases(phantom_dir)
    assert {m["severity"] for m in metas} >= {"CT-0", "CT-1", "CT-2"}
    for meta in metas:
        cid = meta["case_id"]
        label, affine = _load(phantom_dir, "labelsTr", cid)
        lesions, _ = _load(phantom_dir, "lesionsTr", cid)
        lung, _ = _load(phantom_dir, "lungsTr", cid)
        assert set(np.unique(label)) <= {0, 1} and ((lesions > 0) == (label > 0)).all()
        assert not (label.astype(bool) & (lung == 0)).any()  # lesions are inside the lungs
        percent = 100 * label.sum() / (lung > 0).sum()
        assert severity_from_percent(percent) == meta["severity"]
        assert abs(percent - meta["lung_involvement_percent"]) < 1e-2
        assert sorted(np.unique(lesions)[1:].tolist()) == [les["id"] for les in meta["lesions"]]
        parsed = parse_finding(meta["text"])
        assert parsed.n_areas == len(meta["lesions"])
        assert parsed.zones == {z for les in meta["lesions"] for z in les["zones"]}
        assert FindingsFromMask()(label, lung=lung, affine=affine) == meta["text"]


def test_msd_dataset_json(phantom_dir):
    ds = json.loads((phantom_dir / "dataset.json").read_text())
    assert ds["modality"] == {"0": "CT"} and ds["labels"] == {"0": "background", "1": "lesion"}
    assert ds["numTraining"] == len(ds["training"]) == 6
    for item in ds["training"]:
        for key in ("image", "label", "lung", "lesions"):
            assert not Path(item[key]).is_absolute() and (phantom_dir / item[key]).is_file()
        meta = json.loads((phantom_dir / "cases" / f"{item['case_id']}.json").read_text())
        assert item["text"] == meta["text"] and item["severity"] == meta["severity"]
        assert [a["id"] for a in item["attributes"]] == [les["id"] for les in meta["lesions"]]
    assert sum(item["severity"] == "CT-0" for item in ds["training"]) >= 1


def test_2d_export_is_split_by_case_and_matches_the_volumes(phantom_dir):
    root = phantom_dir / "slices2d"
    owner, texts = {}, {}
    for folder in ("Train", "Val", "Test"):
        ws = openpyxl.load_workbook(root / f"{folder}_Folder" / f"{folder}_text.xlsx", read_only=True).active
        rows = list(ws.iter_rows(values_only=True))
        assert rows[0] == ("Image", "Description")
        names = sorted(p.name for p in (root / f"{folder}_Folder" / "img").glob("*.png"))
        assert sorted(r[0] for r in rows[1:]) == names
        for name, text in rows[1:]:
            cid = name.rsplit("_s", 1)[0]
            assert owner.setdefault(cid, folder) == folder, f"{cid} in two splits"
            texts[name] = text
    splits = json.loads((phantom_dir / "splits.json").read_text())
    lesioned = {m["case_id"] for m in _cases(phantom_dir) if m["lesions"]}
    for folder, split in (("Train", "training"), ("Val", "validation"), ("Test", "test")):
        # slices with lesion only (the default, as MosMedData+): lesion-free cases have none
        assert {c for c, f in owner.items() if f == folder} == set(splits[split]) & lesioned
    assert sum(len(v) for v in splits.values()) == 6

    # the most lesioned slice of each case: PNG = radiological display of the NIfTI slice, text = its findings
    for cid in sorted(lesioned):
        ct, affine = _load(phantom_dir, "imagesTr", cid)
        label, _ = _load(phantom_dir, "labelsTr", cid)
        lung, _ = _load(phantom_dir, "lungsTr", cid)
        k = int(np.argmax(label.sum(axis=(0, 1))))
        name = f"{cid}_s{k:03d}.png"
        folder = owner[cid]
        img = np.asarray(Image.open(root / f"{folder}_Folder" / "img" / name))
        mask = np.asarray(Image.open(root / f"{folder}_Folder" / "labelcol" / name))
        assert set(np.unique(mask)) <= {0, 255}
        # LPS storage: i runs to the patient's left, j posterior -> display is the transpose
        np.testing.assert_array_equal(img, lung_window(ct[:, :, k]).T)
        np.testing.assert_array_equal(mask > 0, label[:, :, k].T > 0)
        slice_affine = affine.copy()
        slice_affine[:3, 3] += affine[:3, 2] * k
        zone_slice = lung_zone_map(lung, affine)[:, :, k]
        expected = FindingsFromMask()(label[:, :, k], affine=slice_affine, zone_map=zone_slice)
        assert texts[name] == expected
        meta = json.loads((phantom_dir / "cases" / f"{cid}.json").read_text())
        assert parse_finding(expected).zones <= set(meta["zones"])


def test_lvit_reader_reads_the_export(phantom_dir):
    from segreport.data.readers import read_lvit

    items = read_lvit(phantom_dir / "slices2d", "Train")
    assert items and all(Path(it["label"]).is_file() and it["text"] for it in items)


def test_preview_renders(phantom_dir, tmp_path):
    out = render_preview(phantom_dir, tmp_path / "preview.png")
    with Image.open(out) as im:
        assert im.size[0] > 1000 and im.size[1] > 300
    with pytest.raises(FileNotFoundError):
        render_preview(tmp_path, tmp_path / "x.png")


def test_default_phantom_never_lands_in_a_users_folder(tmp_path, monkeypatch):
    from segreport.phantom import DEFAULT_DATASET_DIR, ensure_default
    from segreport.errors import InputError

    user = tmp_path / "mine"
    user.mkdir()
    (user / "scan.nii.gz").write_bytes(b"not mine to overwrite")
    for folder in (user, tmp_path / "empty", tmp_path / "missing"):
        if folder.name == "empty":
            folder.mkdir()
        with pytest.raises(InputError, match="no dataset found .*segreport synth --out"):
            ensure_default(folder, n_cases=2)
    assert sorted(p.name for p in user.iterdir()) == ["scan.nii.gz"] and not (tmp_path / "missing").exists()
    (user / "imagesTr").mkdir()  # a dataset layout: used as it is, nothing written
    assert ensure_default(user, n_cases=2) == str(user) and sorted(p.name for p in user.iterdir()) == ["imagesTr", "scan.nii.gz"]
    monkeypatch.chdir(tmp_path)  # the default location is generated, once
    ensure_default(DEFAULT_DATASET_DIR, n_cases=2)
    assert (tmp_path / DEFAULT_DATASET_DIR / "dataset.json").is_file() and (tmp_path / DEFAULT_DATASET_DIR / "slices2d").is_dir()
