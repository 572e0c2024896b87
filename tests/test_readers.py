"""Dataset readers -> MONAI datalists, on the real fixtures wherever the layout allows."""

from __future__ import annotations

import csv
import logging
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from openpyxl import Workbook
from PIL import Image

from segreport.data.dicom_groups import read_dicom_folder
from segreport.data.io import load_pair
from segreport.data.readers import (
    read_datalist_json,
    read_lvit,
    read_mosmeddata,
    read_msd,
    read_nifti_folder,
    read_png_slices,
    write_datalist_json,
)
from segreport.errors import InputError


def _touch(folder, *names):
    """Readers only look at names: empty files are enough for layout tests."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    return folder


# ------------------------------------------------------------------------------------ NIfTI folder


def test_nifti_folder_nnunet_identical_and_suffixed_names(tmp_path):
    images = _touch(tmp_path / "imagesTr", "case_a_0000.nii.gz", "case_b_0000.nii.gz", ".hidden.nii.gz")
    labels = _touch(tmp_path / "labelsTr", "case_a.nii.gz", "case_b.nii.gz")
    items = read_nifti_folder(images, labels)
    assert [it["case_id"] for it in items] == ["case_a", "case_b"]
    assert items[0]["image"] == str(images / "case_a_0000.nii.gz")
    assert items[0]["label"] == str(labels / "case_a.nii.gz")

    # MosMedData-style names: study_0255 is NOT a channel suffix, the mask carries "_mask"
    images = _touch(tmp_path / "ct", "study_0255.nii.gz", "study_0256.nii")
    labels = _touch(tmp_path / "masks", "study_0255_mask.nii.gz", "study_0256_mask.nii.gz", "stray.txt")
    items = read_nifti_folder(images, labels, label_suffix="_mask")
    assert [(it["case_id"], it["label"].rsplit("/", 1)[1]) for it in items] == [
        ("study_0255", "study_0255_mask.nii.gz"),
        ("study_0256", "study_0256_mask.nii.gz"),
    ]

    nested = _touch(tmp_path / "nested" / "site1", "p1.nii.gz")
    _touch(tmp_path / "nested" / "site2", "p2.nii.gz")
    assert [it["case_id"] for it in read_nifti_folder(nested.parent, recursive=True)] == ["p1", "p2"]
    assert "label" not in read_nifti_folder(nested.parent, recursive=True)[0]


def test_nifti_folder_errors(tmp_path):
    with pytest.raises(InputError, match="images folder not found"):
        read_nifti_folder(tmp_path / "missing")
    images = _touch(tmp_path / "img", "a.nii.gz", "b.nii.gz")
    labels = _touch(tmp_path / "lab", "a.nii.gz")
    with pytest.raises(InputError, match="no label b.nii") as err:
        read_nifti_folder(images, labels)
    assert err.value.path == str(images / "b.nii.gz")
    assert "label" not in read_nifti_folder(images, labels, require_labels=False)[1]
    _touch(images, "a.nii")  # a.nii and a.nii.gz: one case twice
    with pytest.raises(InputError, match="duplicated case id 'a'"):
        read_nifti_folder(images)
    with pytest.raises(InputError, match="no image matches"):
        read_nifti_folder(_touch(tmp_path / "none"))


# --------------------------------------------------------------------------------------------- MSD


def test_msd_dataset_json_with_phantom_fields(tmp_path):
    _touch(tmp_path / "imagesTr", "ph_000.nii.gz", "ph_001.nii.gz")
    _touch(tmp_path / "labelsTr", "ph_000.nii.gz", "ph_001.nii.gz", "ph_000_lung.nii.gz", "ph_000_lesions.nii.gz")
    attributes = [{"id": 1, "lesion_type": "GGO", "shape": "irregular", "density": "hypodense"}]
    dataset = {
        "name": "phantom",
        "training": [
            {
                "image": "./imagesTr/ph_000.nii.gz",
                "label": "./labelsTr/ph_000.nii.gz",
                "lung": "labelsTr/ph_000_lung.nii.gz",
                "lesions": "labelsTr/ph_000_lesions.nii.gz",
                "text": "Unilateral pulmonary infection, one infected area, lower left lung.",
                "severity": "CT-1",
                "lesion_type": "GGO",
                "attributes": attributes,
            },
            {"image": "./imagesTr/ph_001.nii.gz", "label": "./labelsTr/ph_001.nii.gz", "case_id": "custom"},
        ],
        "test": ["./imagesTr/ph_001.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    items = read_msd(tmp_path / "dataset.json")
    first = items[0]
    assert first["image"] == str(tmp_path / "imagesTr" / "ph_000.nii.gz")
    assert first["lung"] == str(tmp_path / "labelsTr" / "ph_000_lung.nii.gz")
    assert first["lesions"] == str(tmp_path / "labelsTr" / "ph_000_lesions.nii.gz")
    assert (first["severity"], first["lesion_type"], first["attributes"]) == ("CT-1", "GGO", attributes)
    assert first["text"].startswith("Unilateral") and first["case_id"] == "ph_000" and first["source"] == "msd"
    assert items[1]["case_id"] == "custom"
    assert read_msd(tmp_path / "dataset.json", "test") == [
        {"image": str(tmp_path / "imagesTr" / "ph_001.nii.gz"), "case_id": "ph_001", "source": "msd"}
    ]

    with pytest.raises(InputError, match=r"no list 'validation'; lists found: \['training', 'test'\]"):
        read_msd(tmp_path / "dataset.json", "validation")
    (tmp_path / "labelsTr" / "ph_000_lung.nii.gz").unlink()
    with pytest.raises(InputError, match="ph_000_lung.nii.gz: listed in .*dataset.json"):
        read_msd(tmp_path / "dataset.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_msd(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- DICOM


def test_dicom_folder_finds_each_real_series(shared_data, tmp_path):
    items = read_dicom_folder(shared_data / "totalsegmentator" / "example_ct_dicom")
    assert len(items) == 1
    assert items[0]["n_slices"] == 20 and items[0]["modality"] == "CT"
    assert items[0]["series_uid"] is None  # anonymised: no SeriesInstanceUID

    root = tmp_path / "cohort"
    shutil.copytree(shared_data / "monai_ct_dicom", root / "pat1" / "ct")
    shutil.copytree(shared_data / "lungmask_lidc_slices", root / "pat2")
    items = read_dicom_folder(root)
    by_case = {it["case_id"]: it for it in items}
    assert set(by_case) == {"pat1_ct", "pat2"}
    assert by_case["pat1_ct"]["patient_id"] == "77654033" and by_case["pat1_ct"]["n_slices"] == 4
    assert by_case["pat2"]["series_uid"].startswith("1.2.826.0.1.3680043") and by_case["pat2"]["n_slices"] == 2
    assert by_case["pat2"]["image"] == str(root / "pat2")
    with pytest.raises(InputError, match="no DICOM series found"):
        read_dicom_folder(root, recursive=False)


# -------------------------------------------------------------------------------------- MosMedData


@pytest.fixture(scope="module")
def mosmed_tree(shared_data, tmp_path_factory):
    """The real registry and masks, with stand-in CTs on the masks' exact grid (the real CT volumes
    are not in the fixture): two annotated CT-1 studies and one CT-0 study without a mask.
    Built once (writing 512x512xZ volumes is the slow part); tests that break it work on a copy."""
    real = shared_data / "mosmeddata_masks"
    root = tmp_path_factory.mktemp("mosmed") / "COVID19_1110"
    (root / "masks").mkdir(parents=True)
    shutil.copy(real / "dataset_registry.csv", root)
    for study in ("study_0255", "study_0256"):
        mask = real / "masks" / f"{study}_mask.nii.gz"
        (root / "masks" / mask.name).symlink_to(mask)
        mask_img = nib.load(mask)
        ct = np.full(mask_img.shape, -850, np.int16)
        ct[np.asarray(mask_img.dataobj) > 0] = -500  # ground-glass where the expert drew
        (root / "studies" / "CT-1").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ct, mask_img.affine, mask_img.header), root / "studies" / "CT-1" / f"{study}.nii.gz")
    (root / "studies" / "CT-0").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), root / "studies" / "CT-0" / "study_0001.nii.gz")
    return root


def test_mosmeddata_reader_on_real_registry_and_masks(mosmed_tree):
    items = read_mosmeddata(mosmed_tree)
    assert [(it["case_id"], it["severity"], "label" in it) for it in items] == [
        ("study_0001", "CT-0", False),
        ("study_0255", "CT-1", True),
        ("study_0256", "CT-1", True),
    ]
    assert items[1]["study_id"] == 255 and items[1]["label"] == str(mosmed_tree / "masks" / "study_0255_mask.nii.gz")
    assert [it["case_id"] for it in read_mosmeddata(mosmed_tree, only_masked=True)] == ["study_0255", "study_0256"]

    image, label, affine, meta = load_pair(items[1]["image"], items[1]["label"])
    assert meta["axcodes"] == "LAS" and label.any() and np.all(image[label > 0] == -500)


def test_mosmeddata_reader_errors(mosmed_tree, tmp_path):
    mosmed_tree = shutil.copytree(mosmed_tree, tmp_path / "copy", symlinks=True)
    # a study filed under the wrong severity disagrees with the registry
    studies = mosmed_tree / "studies"
    (studies / "CT-2").mkdir()
    (studies / "CT-1" / "study_0256.nii.gz").rename(studies / "CT-2" / "study_0256.nii.gz")
    with pytest.raises(InputError, match="study_0256 is CT-1 here but stored in .*CT-2") as err:
        read_mosmeddata(mosmed_tree)
    assert err.value.path.endswith("dataset_registry.csv")
    (studies / "CT-2" / "study_0256.nii.gz").unlink()

    (mosmed_tree / "masks" / "study_0255_mask.nii.gz").unlink()
    with pytest.raises(InputError, match="mask of study_0255 listed in dataset_registry.csv but not found"):
        read_mosmeddata(mosmed_tree)

    registry = mosmed_tree / "dataset_registry.csv"
    registry.write_text("study,category,study_file,mask_file\n1,CT-0,/studies/CT-0/study_0001.nii.gz,\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['study_id'\]; columns found: \['study', 'category'"):
        read_mosmeddata(mosmed_tree)
    with pytest.raises(InputError, match="studies folder not found"):
        read_mosmeddata(mosmed_tree / "masks")


# -------------------------------------------------------------------------------- LViT / PNG slices


def _png(path, value=0):
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


def test_lvit_reader_on_real_lv_loss_spreadsheet(shared_data, tmp_path, caplog):
    """LViT's own xlsx (MosMedData+ convention: mask and image share a name) as Train_text.xlsx."""
    real = shared_data / "lvit_lv_loss"
    folder = tmp_path / "Train_Folder"
    for sub in ("img", "labelcol"):
        (folder / sub).mkdir(parents=True)
        for png in real.glob("fig*.png"):
            (folder / sub / png.name).symlink_to(png)
    shutil.copy(real / "LV_loss.xlsx", folder / "Train_text.xlsx")
    items = read_lvit(tmp_path, "Train")
    assert len(items) == 14
    first = items[0]
    assert first["case_id"] == "fig1" and first["split"] == "Train" and first["source"] == "lvit"
    assert first["text"] == "Unilateral pulmonary infection, one infected area, all left lung."
    assert first["image"] == str(folder / "img" / "fig1.png")
    assert first["label"] == str(folder / "labelcol" / "fig1.png")
    assert items[13]["text"].startswith("Bilateral pulmonary infection, four infected areas")

    # issue 32, item 9: a mask of another size, a colour mask, images without a row, an empty finding
    (folder / "labelcol" / "fig2.png").unlink()
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(folder / "labelcol" / "fig2.png")
    with pytest.raises(InputError, match=r"fig2.png: mask size 9x7 differs from its image fig2.png"):
        read_lvit(tmp_path, "Train")
    Image.open(folder / "img" / "fig2.png").convert("RGB").save(folder / "labelcol" / "fig2.png")
    with pytest.raises(InputError, match=r"labelcol/fig2.png: a RGB mask \(row 3 of Train_text.xlsx\)"):
        read_lvit(tmp_path, "Train")
    Image.open(folder / "img" / "fig2.png").convert("L").save(folder / "labelcol" / "fig2.png")
    _png(folder / "img" / "extra.png")
    with caplog.at_level(logging.WARNING, logger="segreport.data"):
        assert len(read_lvit(tmp_path, "Train")) == 14
    assert "1 image(s)" in caplog.text and "extra.png" in caplog.text
    table = folder / "Train_text.csv"
    table.write_text("Image,Description\nfig1.png,\n")
    with pytest.raises(InputError, match=r"Train_text.csv: row 2: empty Description cell for fig1.png"):
        read_lvit(tmp_path, "Train", text_file=table)

    (folder / "labelcol" / "fig3.png").unlink()
    with pytest.raises(InputError, match=r"Train_text.xlsx: row 4: no mask for fig3.png"):
        read_lvit(tmp_path, "Train")
    assert "label" not in read_lvit(tmp_path, "Train", require_labels=False)[2]


def test_lvit_reader_on_real_qata_rows(shared_data, tmp_path):
    """The 111 real QaTa rows name the MASK (mask_<image>): build the tree they describe and read it
    in both the LViT layout (Test_text.csv) and LanGuideMedSeg's (prompt/test.csv)."""
    csv_path = shared_data / "qata_cov19_text" / "test_text_first111.csv"
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for folder, img, lab in (("Test_Folder", "img", "labelcol"), ("Test Folder", "Images", "Ground-truths")):
        (tmp_path / folder / img).mkdir(parents=True)
        (tmp_path / folder / lab).mkdir()
    for row in rows:
        _png(tmp_path / "Test_Folder" / "img" / row["Image"].removeprefix("mask_"))
        _png(tmp_path / "Test_Folder" / "labelcol" / row["Image"], 255)
    shutil.copy(csv_path, tmp_path / "Test_Folder" / "Test_text.csv")

    items = read_lvit(tmp_path, "Test")
    assert len(items) == 111
    assert [it["text"] for it in items] == [row["Description"].strip() for row in rows]
    for item, row in zip(items, rows):
        assert item["label"].endswith("/labelcol/" + row["Image"])
        assert item["image"].endswith("/img/" + row["Image"].removeprefix("mask_"))

    # LanGuideMedSeg layout: "Test Folder/Images", "Ground-truths", prompt/test.csv
    shutil.rmtree(tmp_path / "Test_Folder")
    (tmp_path / "prompt").mkdir()
    shutil.copy(csv_path, tmp_path / "prompt" / "test.csv")
    for row in rows[:3]:
        _png(tmp_path / "Test Folder" / "Images" / row["Image"].removeprefix("mask_"))
        _png(tmp_path / "Test Folder" / "Ground-truths" / row["Image"], 255)
    with pytest.raises(InputError, match=r"test.csv: row 5: image 'mask_.*' not found"):
        read_lvit(tmp_path, "Test")  # only 3 of the 111 images exist
    three = tmp_path / "three.csv"
    three.write_text("".join(open(csv_path, encoding="utf-8").readlines()[:4]))
    items = read_lvit(tmp_path, "Test", text_file=three)
    assert len(items) == 3 and all("/Ground-truths/mask_" in it["label"] for it in items)


def test_lvit_unknown_columns_and_missing_folders(tmp_path):
    folder = tmp_path / "Val_Folder"
    (folder / "img").mkdir(parents=True)
    book = Workbook()
    book.active.append(["Img", "Caption"])
    book.active.append(["a.png", "Unilateral pulmonary infection, one infected area, upper left lung."])
    book.save(folder / "Val_text.xlsx")
    expected = r"missing column\(s\) \['Image', 'Description'\]; columns found: \['Img', 'Caption'\]"
    with pytest.raises(InputError, match=expected) as err:
        read_lvit(tmp_path, "Val")
    assert err.value.path.endswith("Val_text.xlsx")
    with pytest.raises(InputError, match=r"no split folder \['Train_Folder', 'Train Folder'\]"):
        read_lvit(tmp_path, "Train")


def test_png_slices_on_real_covid_ct(shared_data, tmp_path):
    real = shared_data / "covid19_ct_seg_png"
    items = read_png_slices(real / "ct", real / "infection", real / "lungs")
    assert len(items) == 50 and items[0]["case_id"] == "0000"
    assert items[-1]["label"] == str(real / "infection" / "1225.png")
    assert items[-1]["lung"] == str(real / "lungs" / "1225.png")
    masks = _touch(tmp_path / "masks")
    shutil.copy(real / "infection" / "0000.png", masks)
    with pytest.raises(InputError, match="no matching label file 0025.png"):
        read_png_slices(real / "ct", masks)


# ----------------------------------------------------------------------------------- JSON datalists


def test_datalist_json_roundtrip_and_monai_compatibility(tmp_path):
    from monai.data import load_decathlon_datalist  # slow import: only for this test

    images = _touch(tmp_path / "data", "a.nii.gz", "a_seg.nii.gz", "b.nii.gz")
    items = [
        {"image": images / "a.nii.gz", "label": str(images / "a_seg.nii.gz"), "case_id": "case_a",
         "severity": "CT-2", "spacing": np.array([0.8, 0.8, 2.5]), "n": np.int64(3)},
        {"image": str(images / "b.nii.gz"), "case_id": "case_b", "text": "Bilateral pulmonary infection."},
    ]
    lists = {"training": items[:1], "test": items[1:]}
    path = write_datalist_json(tmp_path / "out" / "datalist.json", lists, metadata={"name": "x"})
    assert json.loads(path.read_text())["name"] == "x"
    training = read_datalist_json(path, "training")
    assert training == [{"image": str(images / "a.nii.gz"), "label": str(images / "a_seg.nii.gz"), "case_id": "case_a",
                         "severity": "CT-2", "spacing": [0.8, 0.8, 2.5], "n": 3}]
    assert load_decathlon_datalist(path, data_list_key="training") == training
    assert load_decathlon_datalist(path, data_list_key="test")[0]["image"] == str(images / "b.nii.gz")

    # hand-written relative datalist: only path keys are resolved, never a case id (MONAI's loader
    # would turn "case_b" into a path because a folder of that name sits beside the JSON)
    (tmp_path / "case_b").mkdir()
    (tmp_path / "rel.json").write_text(json.dumps({"training": [{"image": "data/b.nii.gz", "case_id": "case_b"}]}))
    assert read_datalist_json(tmp_path / "rel.json") == [{"image": str(images / "b.nii.gz"), "case_id": "case_b"}]
    with pytest.raises(InputError, match="datalist file not found"):
        read_datalist_json(tmp_path / "nope.json")


def test_read_lvit_recovers_case_and_slice_from_exported_names(tmp_path):
    """Slices exported from volumes (<case>_s<index>.png) keep their case, so scores pool per case."""
    from PIL import Image
    import openpyxl

    folder = tmp_path / "Train_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    names = ["case_0001_s003.png", "case_0001_s004.png", "case_0002_s010.png"]
    for n in names:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "img" / n)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "labelcol" / n)
    wb = openpyxl.Workbook()
    wb.active.append(["Image", "Description"])
    for n in names:
        wb.active.append([n, "Unilateral pulmonary infection, one infected area, lower left lung."])
    wb.save(folder / "Train_text.xlsx")
    items = read_lvit(tmp_path, split="Train")
    assert [(i["case_id"], i["slice_index"]) for i in items] == [("case_0001", 3), ("case_0001", 4), ("case_0002", 10)]
