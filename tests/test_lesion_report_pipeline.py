"""The interactive 3D lesion-report bundle (seed 001): data, click simulation, geometry, bad input, and
train -> evaluate -> infer through MONAI's bundle runner on the tiny session phantom."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import segreport.training.lesion_report as lr
import segreport.models.lesion_report_3d as m3d
import segreport.training.click_training as ct
import segreport.training.lesion_report_eval as lre
from segreport.inference import geometry
from segreport.errors import InputError
from segreport.models import network_from_checkpoint
from segreport.transforms.attributes import IGNORE_INDEX
from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "lesion_report_3d"
CONFIGS = BUNDLE / "configs"
# coarse spacing keeps the resampled phantom (96x96x24 at 3.2x3.2x10 mm) small; a 32³ ROI then spans 205 mm
SPACING = [6.4, 6.4, 10.0]


def _cfg(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


# --------------------------------------------------------------------------------------- bundle files
def test_metadata_validates_and_files_present(shared_data):
    import jsonschema

    schema = json.loads((shared_data / "monai_bundle_schema" / "meta_schema_20240725.json").read_text())
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    jsonschema.validate(meta, schema)
    # the I/O of network_def, the zero-click pass MONAI's tools call (the clicks are described in words)
    assert set(meta["network_data_format"]["inputs"]) == {"image"} and set(meta["network_data_format"]["outputs"]) == {"pred"}
    for name in ("train.yaml", "evaluate.yaml", "inference.json", "multi_gpu_train.yaml", "logging.conf",
                 "train_unet_baseline.yaml", "train_cnn_attr_baseline.yaml", "ablation_vanilla.yaml",
                 "ablation_refinement.yaml", "ablation_synergy.yaml", "ablation_full.yaml", "ablation_table.yaml"):
        assert (CONFIGS / name).is_file(), name
    assert (BUNDLE / "docs" / "README.md").is_file() and (BUNDLE / "LICENSE").is_file()


@pytest.mark.parametrize("overlay, model, refinement, synergy", [
    ("ablation_vanilla.yaml", "lesion_prompt", False, False),
    ("ablation_refinement.yaml", "lesion_prompt", True, False),
    ("ablation_synergy.yaml", "lesion_prompt", False, True),
    ("ablation_full.yaml", "lesion_prompt", True, True),
    ("train_unet_baseline.yaml", "unet", True, True),
    ("train_cnn_attr_baseline.yaml", "cnn_attr", True, True),
])
def test_overlays_build_the_right_network(overlay, model, refinement, synergy):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_cfg("train.yaml", overlay))
    net = parser.get_parsed_content("network_def")
    assert net.spec["model"] == model
    if model == "lesion_prompt":
        assert (net.point_refinement, net.synergy is not None) == (refinement, synergy)
    # every overlay writes to its own folder, so runs never overwrite the default model
    assert parser.get_parsed_content("output_dir") != parser.get_parsed_content("bundle_root") + "/outputs"


# ------------------------------------------------------------------------------------------- data
def test_read_attribute_table_csv_missing_cell_and_errors(tmp_path):
    table = tmp_path / "lesions.csv"
    table.write_text(
        "case_id,lesion_id,shape,invasion,density,heterogeneity,surface,lesion_type\n"
        "a,1,round,no,hypo,homogenous,well-defined,cyst\n"
        "a,2,irregular,yes,,heterogeneous,ill-defined,cyst\n"   # density not annotated
        "b,,nodular,0,2,1,1,\n"                                  # case-level row, class indices
    )
    t = lr.read_attribute_table(table)
    assert [r["id"] for r in t["a"]] == [1, 2] and t["b"][0]["id"] is None
    assert t["a"][1]["density"] is None and t["a"][0]["lesion_type"] == "cyst"
    target = lr.attribute_targets(t["a"], 2, "a")
    assert target[ATTRIBUTE_NAMES.index("density")] == IGNORE_INDEX
    assert target[ATTRIBUTE_NAMES.index("shape")] == ATTRIBUTE_GROUPS["shape"].index("irregular")
    # the case-level row describes whatever lesion id the case's largest lesion has
    assert lr.attribute_targets(t["b"], 7, "b").tolist() == [3, 0, 2, 1, 1]

    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,lesion_id,shape,invasion,density,heterogeneity,surface\na,1,triangular,no,hypo,homogeneous,well-defined\n")
    with pytest.raises(InputError, match=r"bad\.csv: line 2: attribute 'shape': unknown value 'triangular'"):
        lr.read_attribute_table(bad)
    short = tmp_path / "short.csv"
    short.write_text("case_id,shape\na,round\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['invasion'"):
        lr.read_attribute_table(short)


def test_read_attribute_table_json_mapping(tmp_path):
    path = tmp_path / "lesions.json"
    path.write_text(json.dumps({"c": [{"id": 3, "shape": "round-like", "invasion": None, "density": "isodense",
                                       "heterogeneity": "homogeneous", "surface": "well-defined"}]}))
    t = lr.read_attribute_table(path)
    assert t == {"c": [{"id": 3, "shape": "round-like", "invasion": None, "density": "isodense",
                        "heterogeneity": "homogeneous", "surface": "well-defined"}]}


def test_missing_attributes_become_ignore_index_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="segreport.lesion_report"):
        target = lr.attribute_targets([{"id": 1, "shape": "round-like"}], 2, "case_x")
    assert target.tolist() == [IGNORE_INDEX] * 5
    assert "case_x lesion 2: no attributes" in caplog.text


def test_select_lesiond_largest_or_requested_lesion_with_its_attributes():
    label = np.zeros((1, 10, 10, 10), np.float32)
    inst = np.zeros_like(label)
    inst[0, 1:3, 1:3, 1:3] = 4  # 8 voxels
    inst[0, 5:9, 5:9, 5:9] = 2  # 64 voxels, the largest
    label[inst > 0] = 1
    attrs = [{"id": 4, "shape": "punctate/nodular", "invasion": "no", "density": "hyperdense",
              "heterogeneity": "homogeneous", "surface": "well-defined"},
             {"id": None, "shape": "irregular", "invasion": "yes", "density": "hypodense",
              "heterogeneity": "heterogeneous", "surface": "ill-defined"}]  # case-level: the largest lesion
    select = lr.SelectLesiond("label")
    d = select({"label": torch.from_numpy(label), "lesions": torch.from_numpy(inst), "attributes": attrs})
    assert d["lesion_id"] == 2 and d["label"].sum() == 64 and "lesions" not in d
    assert d["attr_target"].tolist() == [1, 1, 0, 1, 1]
    d = select({"label": torch.from_numpy(label), "lesions": torch.from_numpy(inst), "attributes": attrs, "lesion_id": 4})
    assert d["label"].sum() == 8 and d["attr_target"].tolist() == [3, 0, 2, 0, 0]
    d = select({"label": torch.from_numpy(label)})  # no instance map: components in scan order
    assert d["lesion_id"] == 2 and d["label"].sum() == 64 and (d["attr_target"] == IGNORE_INDEX).all()
    with pytest.raises(InputError, match="label has no lesion voxels"):
        select({"label": torch.zeros(1, 4, 4, 4)})


def test_nifti_folder_with_table_skips_lesion_free_case_with_reason(phantom_dir, tmp_path, caplog):
    """A user dataset (imagesTr/labelsTr, no instance maps) + attribute CSV; an empty label is skipped and logged."""
    cases = json.loads((phantom_dir / "dataset.json").read_text())["training"]
    with_lesion = [c for c in cases if c["attributes"]][:4]
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    rows = ["case_id,lesion_id,shape,invasion,density,heterogeneity,surface"]
    for c in with_lesion:
        for sub in ("imagesTr", "labelsTr"):
            shutil.copy(phantom_dir / c[{"imagesTr": "image", "labelsTr": "label"}[sub]], tmp_path / sub)
        a = c["attributes"][0]
        rows.append(",".join([c["case_id"], ""] + [a[g] for g in ATTRIBUTE_NAMES]))
    empty = nib.load(tmp_path / "labelsTr" / f"{with_lesion[0]['case_id']}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(empty.shape, np.uint8), empty.affine), tmp_path / "labelsTr" / f"{with_lesion[0]['case_id']}.nii.gz")
    (tmp_path / "attrs.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="segreport.lesion_report"):
        dl = lr.load_datalists(tmp_path, attribute_table=tmp_path / "attrs.csv", ratios=(2, 1, 1))
    assert dl["skipped"] == [{"case_id": with_lesion[0]["case_id"], "reason": "label has no lesion voxels (nothing to click on, no attributes)"}]
    assert f"skipping case {with_lesion[0]['case_id']}" in caplog.text
    used = {it["case_id"] for s in ("training", "validation", "test") for it in dl[s]}
    assert used == {c["case_id"] for c in with_lesion[1:]}
    item = lr.training_transforms(32, SPACING)(dict(dl["training"][0]))
    assert item["image"].shape == (1, 32, 32, 32) and item["label"].sum() > 0
    assert (item["attr_target"] >= 0).all()  # the case-level row was matched


def test_all_lesions_gives_one_item_per_lesion_split_by_case(phantom_dir):
    largest = lr.load_datalists(phantom_dir)
    every = lr.load_datalists(phantom_dir, lesions="all", min_lesion_voxels=20)
    for split in ("training", "test"):
        assert {it["case_id"] for it in every[split]} <= {it["case_id"] for it in largest[split]}
    items = every["training"]
    assert len(items) > len(largest["training"]) and all("lesion_id" in it for it in items)
    case = json.loads((phantom_dir / "cases" / f"{items[0]['case_id']}.json").read_text())
    sizes = {les["id"]: les["voxels"] for les in case["lesions"]}
    ids = [it["lesion_id"] for it in items if it["case_id"] == case["case_id"]]
    assert ids == sorted(i for i, v in sizes.items() if v >= 20)
    smallest = min(ids, key=sizes.get)
    d = lr.load_transforms()(dict(next(it for it in items if it["lesion_id"] == smallest and it["case_id"] == case["case_id"])))
    assert int(d["label"].sum()) == sizes[smallest]  # that lesion, not the largest


def test_a_dataset_with_its_own_splits_file_is_split_by_it(phantom_dir, tmp_path):
    """The phantom's splits.json (each split with its own lesion plan) decides the 3D split, whatever the
    bundle's ratios and seed; a test-only split file serves evaluation, and fails training clearly."""
    splits = json.loads((phantom_dir / "splits.json").read_text())
    for ratios, seed in (((60, 20, 20), 0), ((0.5, 0.25, 0.25), 7)):
        dl = lr.load_datalists(phantom_dir, ratios=ratios, seed=seed)
        for name in ("training", "test"):
            assert {it["case_id"] for it in dl[name]} <= set(splits[name])
            assert dl[name]
    copy = tmp_path / "test_only"
    shutil.copytree(phantom_dir, copy)
    every = sorted(c for ids in splits.values() for c in ids)
    (copy / "splits.json").write_text(json.dumps({"training": [], "validation": [], "test": every}))
    dl = lr.load_datalists(copy, require_training=False)
    assert dl["training"] == [] and len(dl["test"]) == len(every) - len(dl["skipped"])
    with pytest.raises(InputError, match="no training case"):
        lr.load_datalists(copy)
    (copy / "splits.json").write_text(json.dumps({"training": every, "test": every[:1]}))
    with pytest.raises(InputError, match="splits.json.*both"):
        lr.load_datalists(copy)


def test_balanced_sampling_draws_rare_lesions_in_proportion_to_their_weights(phantom_dir):
    """``sampling_weights`` gives each lesion 1 / count(its value)^power (from its own attribute row),
    and the loader draws that: with power 1 every shape comes about equally often, as many
    items per epoch as the dataset holds."""
    from segreport.training.loaders import make_loader

    items = lr.load_datalists(phantom_dir, lesions="all", min_lesion_voxels=20)["training"]
    assert lr.sampling_weights(items, None) is None
    values = [lr.lesion_value(it, "shape") for it in items]
    counts = {v: values.count(v) for v in set(values)}
    assert len(counts) > 1 and len(set(counts.values())) > 1  # the phantom's shapes are imbalanced
    case = json.loads((phantom_dir / "dataset.json").read_text())["training"]
    rows = {(c["case_id"], a["id"]): a["shape"] for c in case for a in c["attributes"]}
    assert values == [rows[(it["case_id"], it["lesion_id"])] for it in items]  # the item's own lesion's
    for power in (0.5, 1.0):
        weights = lr.sampling_weights(items, "shape", power)
        assert weights == pytest.approx([counts[v] ** -power for v in values])
    torch.manual_seed(0)
    weights = lr.sampling_weights(items, "shape", 1.0)
    indexed = [{"i": i} for i in range(len(items))]
    loader = make_loader(indexed, batch_size=len(items), weights=weights)
    assert len(loader) == 1  # as many per epoch as shuffling gives
    batches = [next(iter(loader)) for _ in range(1000)]
    drawn = [values[i] for b in batches for i in b["i"].tolist()]
    assert len(drawn) == 1000 * len(items) and all(bool(b["weighted"].all()) for b in batches)
    shares = [drawn.count(v) / len(drawn) for v in counts]
    assert max(shares) - min(shares) < 0.05, shares  # shuffled, the most common would come most often
    # importance = natural / weighted probability: the importance-weighted mean of any per-item value is its
    # natural mean (here: how often each shape is drawn weighs back to its count)
    importance = torch.cat([b["importance"] for b in batches]).double()
    for v in counts:
        hit = torch.tensor([x == v for x in drawn], dtype=torch.double)
        assert float((hit * importance).mean()) == pytest.approx(counts[v] / len(items), abs=0.03)
    with pytest.raises(ValueError, match="distributed"):
        make_loader(list(range(len(items))), weights=[1.0] * len(items), distributed=True)
    with pytest.raises(ValueError, match="sampling weights for"):
        make_loader(list(range(3)), weights=[1.0, 2.0])


# ----------------------------------------------------------------------------------- click simulation
class _StubNet(torch.nn.Module):
    """Records the prompts; predicts ``fill`` everywhere (1 -> false positives, 0 -> false negatives)."""

    def __init__(self, fill: float):
        super().__init__()
        self.fill, self.calls = fill, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, image):
        return image

    def decode(self, embedding, points=None, point_labels=None, mask_prompt=None):
        self.calls.append((points, point_labels, mask_prompt))
        logits = torch.full_like(embedding, 10.0 if self.fill else -10.0) + self.w
        return {"mask_logits": logits, "low_res_logits": logits, "attr_logits": {}}

    def forward(self, image, points=None, point_labels=None, mask_prompt=None):
        return self.decode(image, points, point_labels, mask_prompt)


def _blob_batch():
    label = torch.zeros(2, 1, 12, 12, 12)
    label[:, :, 3:8, 4:9, 5:10] = 1
    return torch.rand(2, 1, 12, 12, 12), label


def test_click_simulation_first_positive_inside_then_corrections():
    image, label = _blob_batch()
    net = _StubNet(fill=1.0)  # everything predicted: the error is false positives -> negative clicks
    out = ct.SimulatedClicksInferer(train=False, n_clicks=3)(image, net, label)
    points, labels, mask_prompt = net.calls[-1]
    assert labels.tolist() == [[1, 0, 0], [1, 0, 0]]
    first = points[0, 0].long()
    assert label[0, 0][tuple(first)] == 1  # the first click is inside the lesion
    assert all(label[0, 0][tuple(p.long())] == 0 for p in points[0, 1:])  # corrections in the FP region
    assert mask_prompt is not None and out["n_clicks"].tolist() == [3, 3]

    net = _StubNet(fill=0.0)  # nothing predicted: false negatives -> positive clicks
    ct.SimulatedClicksInferer(train=False, n_clicks=2)(image, net, label)
    assert net.calls[-1][1].tolist() == [[1, 1], [1, 1]]


def test_no_click_steps_have_no_click_and_no_mask_prompt():
    """A no-click step is the automatic mode's input: no click and no mask prompt for the whole batch,
    whatever the number of correction rounds; a click step starts every sample with a positive click."""
    image, label = _blob_batch()
    for rounds in (0, 3):
        net = _StubNet(fill=1.0)
        out = ct.SimulatedClicksInferer(train=True, max_rounds=rounds)(image, net, label, clicks=False)
        assert len(net.calls) == 1 and net.calls[-1][0] is None and net.calls[-1][2] is None
        assert out["n_clicks"].tolist() == [0, 0]
        out = ct.SimulatedClicksInferer(train=True, max_rounds=rounds)(image, net, label)
        assert (out["n_clicks"] >= 1).all() and (net.calls[-1][1][:, 0] == 1).all()  # never starts negative


def test_balanced_click_steps_leave_the_no_click_steps_on_the_natural_mix():
    """``balance_steps: clicks``: the loader draws a share of its batches uniformly, and exactly those are
    the no-click steps; the weighted ones are click steps with the importance as attribute weight. A
    loader with neither weights nor tags leaves the step to ``prompt_dropout``."""
    from segreport.training.loaders import make_loader

    n, rare = 40, 3
    weights = [10.0 if i < rare else 1.0 for i in range(n)]  # items 0..2 rare, drawn 10x as often
    items = [{"image": torch.full((1, 4, 4, 4), float(i)), "label": torch.zeros(1, 4, 4, 4), "every_lesion": torch.zeros(1, 4, 4, 4),
              "attr_target": torch.zeros(5, dtype=torch.long)} for i in range(n)]
    torch.manual_seed(0)
    loader = make_loader(items, batch_size=8, weights=weights, unweighted_share=0.25)
    prep = lr.LesionBatch(4, prompt_dropout=0.25, seed=0, balanced_steps="clicks")
    steps = {True: [], False: []}
    for _ in range(60):
        for batch in loader:
            image, targets, _, kwargs = prep(batch)
            steps[kwargs["clicks"]].append(image[:, 0, 0, 0, 0].long())
            assert ("attr_weight" in targets) == kwargs["clicks"]
            if kwargs["clicks"]:
                assert torch.allclose(targets["attr_weight"], torch.tensor([0.1675 if i < rare else 1.675 for i in image[:, 0, 0, 0, 0].long()]))
    share_rare = {k: float(torch.cat(v).lt(rare).double().mean()) for k, v in steps.items()}
    assert share_rare[True] == pytest.approx(30 / 67, abs=0.06)  # weighted: 3 x 10 of 67
    assert share_rare[False] == pytest.approx(rare / n, abs=0.04)  # uniform: 3 of 40
    no_click_share = len(steps[False]) / (len(steps[False]) + len(steps[True]))
    assert no_click_share == pytest.approx(0.25, abs=0.06)
    with pytest.raises(ValueError, match="balanced_steps"):
        lr.LesionBatch(4, balanced_steps="some")
    with pytest.raises(ValueError, match="unweighted_share"):
        make_loader(items, weights=weights, unweighted_share=1.5)


def test_importance_weights_scale_each_samples_attribute_loss():
    """The attribute CE with per-sample weights is the weighted sum over the annotated samples / their
    count: all-ones weights give the plain mean, a zero weight removes a sample."""
    from segreport.losses.lesion_report import attribute_cross_entropy

    torch.manual_seed(0)
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, IGNORE_INDEX, 1])
    plain = torch.nn.functional.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
    assert torch.allclose(attribute_cross_entropy(logits, y, IGNORE_INDEX, torch.ones(4)), plain)
    each = torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none")
    w = torch.tensor([2.0, 0.0, 5.0, 1.0])
    assert torch.allclose(attribute_cross_entropy(logits, y, IGNORE_INDEX, w), (2 * each[0] + each[3]) / 3)
    # the objective takes the batch's weights from its targets (LesionBatch's attr_weight)
    objective = lr.LesionReportObjective(lambda_attr=1.0, lambda_iou=0.0)
    pred = {"attr_logits": {g: logits for g in ATTRIBUTE_NAMES}}
    targets = {"label": None, "attributes": y[:, None].expand(4, len(ATTRIBUTE_NAMES)), "attr_weight": w}
    assert torch.allclose(objective(pred, targets), len(ATTRIBUTE_NAMES) * (2 * each[0] + each[3]) / 3)
    assert not torch.allclose(objective(pred, {**targets, "attr_weight": None}), objective(pred, targets))


def test_lesion_batch_draws_no_click_windows_anywhere_with_every_lesion(phantom_dir):
    """Training steps from the cached margin: a no-click step takes a window anywhere in it, every lesion
    as the target and no attribute; a click step keeps the lesion within ``jitter`` of the centre."""
    items = lr.load_datalists(phantom_dir, lesions="all", min_lesion_voxels=20)["training"]
    tf = lr.training_transforms(16, SPACING, margin=8)
    batch = [tf(dict(it)) for it in items[:2]]
    for d in batch:  # the real transform: every lesion holds the selected one
        assert d["image"].shape == (1, 32, 32, 32) and d["every_lesion"].shape == d["label"].shape
        assert d["label"].sum() > 0 and bool((d["every_lesion"] >= d["label"]).all())
    batch = {k: torch.stack([d[k] for d in batch]) for k in ("image", "label", "every_lesion", "attr_target")}
    # an index image: a window's first voxel tells where it was cut
    index = torch.arange(32 ** 3, dtype=torch.float32).reshape(1, 1, 32, 32, 32).expand(2, 1, -1, -1, -1)
    batch["image"] = index.clone()
    for dropout, clicks in ((1.0, False), (0.0, True)):
        prep = lr.LesionBatch(16, jitter=2, prompt_dropout=dropout, seed=0)
        starts = []
        for _ in range(30):
            image, targets, (label,), kwargs = prep(batch)
            assert kwargs == {"clicks": clicks} and image.shape == (2, 1, 16, 16, 16) and label is targets["label"]
            for b in range(2):
                start = np.unravel_index(int(image[b, 0, 0, 0, 0]), (32, 32, 32))
                starts.append(start)
                window = tuple(slice(int(a), int(a) + 16) for a in start)
                source = batch["every_lesion" if not clicks else "label"][b, 0]
                assert torch.equal(label[b, 0], source[window])
            expected = torch.full_like(batch["attr_target"], IGNORE_INDEX) if not clicks else batch["attr_target"]
            assert torch.equal(targets["attributes"], expected)
        starts = np.array(starts)
        if clicks:
            assert np.abs(starts - 8).max() <= 2
        else:
            assert starts.min() <= 2 and starts.max() >= 14  # far beyond the click steps' jitter
    image, targets, _, kwargs = lr.LesionBatch()(batch)  # validation: the batch as it comes
    assert kwargs == {"clicks": True} and torch.equal(targets["label"], batch["label"]) and image.shape[2:] == (32, 32, 32)


def test_training_mirroring_flips_image_and_target_together():
    """``mirror_prob``: a sample is flipped along the axes drawn for it, its target with it (an index
    image tells which axes); at 0.5 each axis is flipped about half the time, at 0 never."""
    index = torch.arange(16 ** 3, dtype=torch.float32).reshape(1, 1, 16, 16, 16).expand(4, 1, -1, -1, -1).clone()
    batch = {"image": index, "label": index.clone(), "every_lesion": index.clone(), "attr_target": torch.zeros(4, 5, dtype=torch.long)}
    flips = []
    for prob in (0.0, 0.5):
        prep = lr.LesionBatch(16, prompt_dropout=0.0, seed=1, mirror_prob=prob)
        for _ in range(50):
            image, targets, _, _ = prep(batch)
            assert torch.equal(image, targets["label"])
            for x in image[:, 0]:
                corner = np.unravel_index(int(x[0, 0, 0]), (16, 16, 16))  # 15 along a flipped axis, else 0
                axes = [d + 1 for d in range(3) if corner[d] == 15]
                assert torch.equal(x.flip([a - 1 for a in axes]), index[0, 0])
                flips.append((prob, tuple(c == 15 for c in corner)))
    assert not any(any(f) for p, f in flips if p == 0.0)
    shares = np.mean([f for p, f in flips if p == 0.5], axis=0)
    assert np.all(np.abs(shares - 0.5) < 0.1), shares
    with pytest.raises(ValueError, match="mirror_prob"):
        lr.LesionBatch(16, mirror_prob=2.0)


def test_mirrored_search_windows_average_the_window_and_its_mirror_image():
    """Test-time mirroring along x: the probability is the mean of the window's and of its mirror image's
    (mirrored back), so an x-asymmetric network's answer changes; every window is counted once."""
    from segreport.inference.automatic import zero_click_probability

    class Ramp(torch.nn.Module):  # an x-asymmetric "network": logit grows with x and with intensity
        def forward(self, x):
            ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
            return {"mask_logits": x + ramp - x.shape[2] / 2}

    rois = torch.rand(2, 1, 8, 6, 4)
    windows: list[int] = []
    plain = zero_click_probability(Ramp(), windows)(rois)
    mirrored = zero_click_probability(Ramp(), windows, (0,))(rois)
    flipped = torch.sigmoid(Ramp()(rois.flip(2))["mask_logits"]).flip(2)
    torch.testing.assert_close(mirrored, (plain + flipped) / 2)
    assert not torch.allclose(mirrored, plain) and windows == [2, 2]


# ------------------------------------------------------------------------------------------- geometry
def test_roi_to_original_equals_monai_inverse(phantom_dir):
    """ROI -> original grid through affines == paste_back + inverting orientation/resampling (MONAI)."""
    item = {"image": str(phantom_dir / "imagesTr" / "case_0000.nii.gz"), "label": str(phantom_dir / "labelsTr" / "case_0000.nii.gz")}
    loaded = lr.load_transforms(select=False)(item)
    spatial = lr.spatial_transforms(32, [2.0, 2.0, 4.0])
    roi = spatial(dict(loaded))
    theirs = spatial.inverse({"image": roi["image"], "label": roi["label"].float()})
    shape = loaded["label"].shape[1:]
    assert theirs["image"].shape[1:] == shape
    np.testing.assert_allclose(np.asarray(theirs["image"].affine), np.asarray(loaded["image"].affine), atol=1e-6)
    # the image went in bilinear, so MONAI's inverse is bilinear too: same values
    ours = geometry.roi_to_original(roi["image"][0], roi["image"].affine, loaded["image"].affine, shape)
    np.testing.assert_allclose(ours, np.asarray(theirs["image"][0]), atol=1e-4)
    # the label went in nearest (MONAI inverts it with nearest, we interpolate): masks agree up to ties at 0.5
    ours = geometry.roi_to_original(roi["label"][0].float(), roi["label"].affine, loaded["label"].affine, shape) > 0.5
    ref = np.asarray(theirs["label"][0]) > 0.5
    assert ours.sum() > 100 and (ours != ref).sum() <= 0.01 * ref.sum()


def test_auto_roi_center_finds_dense_blob_in_lung():
    ct = np.full((70, 60, 30), -1000.0, np.float32)
    ct[5:65, 5:55, :] = 40.0  # body
    ct[10:28, 10:50, 3:27] = -850.0  # right lung
    ct[42:60, 10:50, 3:27] = -850.0  # left lung, a 14-voxel mediastinum between them
    ct[48:56, 20:28, 10:18] = -100.0  # consolidation in the left lung
    ct[12:26, 30, 5:25] = 40.0  # a vessel: thin, removed by the opening
    center, source = geometry.auto_roi_center(ct)
    np.testing.assert_allclose(center, [51.5, 23.5, 13.5], atol=1.0)
    assert "lesion-density component" in source
    assert "image centre" in geometry.auto_roi_center(np.zeros((8, 8, 8)))[1]


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def untrained_predictor():
    torch.manual_seed(0)
    return m3d.LesionReportPredictor(m3d.build_network(spacing=SPACING))


def _toy_ct(shape=(40, 44, 20)):
    ct = np.full(shape, -850.0, np.float32)
    ct[15:25, 15:25, 8:12] = -50.0
    affine = np.diag([-3.0, -3.0, 8.0, 1.0])  # LPS storage
    return ct, affine


def test_click_outside_image_names_point_and_shape(untrained_predictor):
    ct, affine = _toy_ct()
    with pytest.raises(InputError, match=r"click point \[50\.0, 2\.0, 3\.0\] lies outside the image of shape \(40, 44, 20\)"):
        untrained_predictor.predict(ct, affine, points=[[50, 2, 3]], point_labels=[1])
    session = untrained_predictor.session()
    session.set_image(ct, affine)
    with pytest.raises(InputError, match=r"world point .* lies outside the image of shape \(40, 44, 20\)"):
        session.click([1000.0, 0.0, 0.0], world=True)


def test_negative_first_click_is_refused(untrained_predictor):
    ct, affine = _toy_ct()
    with pytest.raises(InputError, match="first click must be positive"):
        untrained_predictor.predict(ct, affine, points=[[20, 20, 10]], point_labels=[0])


def test_image_smaller_than_roi_is_padded(untrained_predictor):
    ct, affine = _toy_ct((9, 7, 3))  # 27 x 21 x 24 mm, far less than the 32³ ROI at 6.4 x 6.4 x 10 mm
    ct[3:6, 3:5, 1] = -50.0
    pred = untrained_predictor.predict(ct, affine, points=[[4, 3, 1]], point_labels=[1])
    assert pred.mask.shape == (9, 7, 3) and pred.mask.dtype == np.uint8
    # no click: the automatic mode's one window is padded to the ROI (all lung here), and so is the single ROI
    auto = untrained_predictor.predict(ct, affine, lung=np.ones(ct.shape, np.uint8))
    assert auto.mask.shape == (9, 7, 3) and auto.extras["mode"] == "automatic" and auto.extras["windows"] == 1
    untrained_predictor.automatic = False
    try:
        single = untrained_predictor.predict(ct, affine)
    finally:
        untrained_predictor.automatic = True
    assert single.mask.shape == (9, 7, 3) and single.extras["roi_center_source"].startswith("auto")


def test_world_click_equals_ijk_click_and_embedding_is_cached(untrained_predictor):
    ct, affine = _toy_ct()
    a, b = untrained_predictor.session(), untrained_predictor.session()
    a.set_image(ct, affine)
    b.set_image(ct, affine)
    pa = a.click([20, 20, 10])
    world = (affine @ [20, 20, 10, 1])[:3]
    pb = b.click(world, world=True)
    np.testing.assert_array_equal(pa.mask, pb.mask)
    a.click([22, 19, 10], positive=False)
    p3 = a.click([18, 21, 9])
    assert a.n_encodes == 1 and len(p3.extras["clicks"]) == 3  # three clicks, one image encoding
    for group, att in p3.extras["attributes"].items():
        assert abs(sum(att["probs"].values()) - 1.0) < 1e-3 and att["label"] in ATTRIBUTE_GROUPS[group]


# --------------------------------------------------------------------------------- through the bundle
@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    """One epoch of `monai.bundle run training`, then `evaluating`, exactly as the bundle README says."""
    from monai.bundle import run

    out = tmp_path_factory.mktemp("lesion_report_3d")
    common = dict(bundle_root=str(BUNDLE), output_dir=str(out), ckpt_dir=str(out / "models"), dataset_dir=str(phantom_dir),
                  spacing=SPACING, max_rounds=1, batch_size=2)
    run("training", config_file=_cfg("train.yaml"), epochs=1, **common)
    run("evaluating", config_file=_cfg("train.yaml", "evaluate.yaml"), max_clicks=3, **common)
    return out


def test_training_writes_checkpoints_with_spec_and_logs(trained):
    for name in ("model.pt", "model_final.pt"):
        state = torch.load(trained / "models" / name, weights_only=True)
        assert set(state) == {"model", "spec"} and state["spec"]["preprocessing"]["spacing"] == SPACING
        assert state["spec"]["kind"] == "lesion_report_3d" and state["spec"]["network"]["args"]["spacing"] == SPACING
    assert any((trained / "logs").iterdir())
    net, _ = network_from_checkpoint(trained / "models" / "model.pt")
    assert net.spec["model"] == "lesion_prompt" and net.point_refinement and net.synergy is not None


def test_evaluation_writes_metrics_curve_and_per_case(trained):
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    test = metrics["test"]
    assert len(test["dice_per_click"]) == 4  # 0..3 clicks
    assert 0.0 <= test["dice"] <= 1.0 and test["hd95_mm"] >= 0.0
    assert set(test["attribute_accuracy"]) == set(ATTRIBUTE_NAMES)
    assert 1 <= test["noc_85"] <= 3
    assert metrics["skipped_cases"] and all(s["reason"] for s in metrics["skipped_cases"])
    rows = list(csv.DictReader(open(trained / "eval" / "per_case.csv")))
    assert len(rows) == test["n_items"] == test["n_cases"] and {"dice", "hd95_mm", "dice_roi_3", "noc_80", "shape_pred"} <= set(rows[0])
    assert (trained / "eval" / "dice_vs_clicks.png").stat().st_size > 1000
    assert list((trained / "eval" / "panels").glob("*.png"))


def test_inference_bundle_returns_mask_on_input_grid_with_attributes(trained, phantom_dir, tmp_path):
    from monai.bundle import run

    volume = phantom_dir / "imagesTr" / "case_0000.nii.gz"
    lesions = np.asarray(nib.load(phantom_dir / "lesionsTr" / "case_0000.nii.gz").dataobj)
    click = np.argwhere(lesions == 1)[len(np.argwhere(lesions == 1)) // 2].tolist()
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"case_0000": {"points": [click], "labels": [1]}}))
    run("inferring", config_file=_cfg("inference.json"), bundle_root=str(BUNDLE), checkpoint=str(trained / "models" / "model.pt"),
        input_image=str(volume), points=str(points), prediction_dir=str(tmp_path / "pred"))
    seg = nib.load(tmp_path / "pred" / "case_0000_seg.nii.gz")
    ref = nib.load(volume)
    assert seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
    report = json.loads((tmp_path / "pred" / "case_0000_report.json").read_text())
    assert report["finding"].startswith("Shape:") or report["finding"] == "No lesion segmented."


def test_evaluate_baselines_without_clicks(phantom_dir, tmp_path):
    dl = lr.load_datalists(phantom_dir)
    dl = {"test": dl["test"][:1]}
    unet = lre.evaluate(m3d.build_network("unet", spacing=SPACING), dl, tmp_path / "unet", splits=("test",))
    assert "dice" in unet["test"] and "dice_per_click" not in unet["test"] and "attribute_accuracy" not in unet["test"]
    cnn = lre.evaluate(m3d.build_network("cnn_attr", spacing=SPACING), dl, tmp_path / "cnn", splits=("test",))
    assert "dice" not in cnn["test"] and 0.0 <= cnn["test"]["attribute_accuracy_average"] <= 1.0


def test_per_case_rows_name_each_lesions_own_type(phantom_dir, tmp_path):
    """With every lesion a target, a case's lesions differ in type: each per_case.csv row carries its own
    lesion's, not the case's first lesion's (which the item's ``lesion_type`` is)."""
    items = [it for split in ("training", "validation", "test") for it in lr.load_datalists(phantom_dir, lesions="all")[split]]
    case = next(c for c in sorted({it["case_id"] for it in items})
                if len({lr.lesion_value(it, "lesion_type") for it in items if it["case_id"] == c}) > 1)
    chosen = [it for it in items if it["case_id"] == case]
    assert any(lr.lesion_value(it, "lesion_type") != it["lesion_type"] for it in chosen)  # the case the fix is for
    lre.evaluate(m3d.build_network("unet", spacing=SPACING), {"test": chosen}, tmp_path, splits=("test",), n_panels=0)
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    own = {str(it["lesion_id"]): lr.lesion_value(it, "lesion_type") for it in chosen}
    assert len(rows) == len(chosen) and all(r["lesion_type"] == own[r["lesion_id"]] for r in rows)


def test_ablation_table_reads_eval_outputs(tmp_path):
    from monai.bundle import run

    for name, d in (("vanilla", 0.5), ("refinement", 0.55), ("synergy", 0.56), ("full", 0.6)):
        folder = tmp_path / "outputs" / name / "eval"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"test": {
            "dice": d, "hd95_mm": 4.0, "dice_per_click": [0.1, d, 0.6, 0.65, 0.7, 0.72],
            "attribute_accuracy": {g: 0.7 for g in ATTRIBUTE_NAMES}, "attribute_accuracy_average": 0.7, "noc_85": 7.0}}))
    run("tabulating", config_file=_cfg("ablation_table.yaml"), bundle_root=str(tmp_path))
    rows = json.loads((tmp_path / "outputs" / "ablation" / "ablation.json").read_text())
    assert [r["method"] for r in rows] == ["vanilla", "+point refinement", "+feature synergy", "full"]
    assert rows[3]["dsc"] == 0.6 and rows[3]["dice_5_clicks"] == 0.72
    assert "| test | full | 0.600 |" in (tmp_path / "outputs" / "ablation" / "ablation.md").read_text()
    with pytest.raises(InputError, match="no metrics.json for ablation run 'missing'"):
        lre.write_ablation_table({"missing": tmp_path / "nope"}, tmp_path / "table")
