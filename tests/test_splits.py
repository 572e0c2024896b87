"""Case-level stratified splits: no leakage, stratification, determinism, zero-shot holdout."""

from __future__ import annotations

import csv
from collections import Counter

import pytest

import json

from segreport.data.splits import read_splits, split_cases, split_datalist, write_split_json

SEVERITY_SIZES = {"CT-0": 3, "CT-1": 10, "CT-2": 4, "CT-3": 3, "CT-4": 1}


def _cases():
    cases = []
    for severity, n in SEVERITY_SIZES.items():
        for i in range(n):
            lesion_type = "cavity" if (severity, i) in {("CT-1", 0), ("CT-2", 1)} else "GGO"
            cases.append({"case_id": f"{severity}_{i:02d}", "severity": severity, "lesion_type": lesion_type})
    return cases


def _slices(cases, per_case=4):
    """2D slice items: several per case, sharing the case's metadata."""
    return [{**c, "image": f"/data/{c['case_id']}_{k}.png", "slice_index": k} for c in cases for k in range(per_case)]


def test_slices_of_a_case_never_span_two_splits():
    items = _slices(_cases())
    splits = split_cases(items)  # slice items directly: one stratum per case
    by_split = split_datalist(items, splits)
    owners = {}
    for name, subset in by_split.items():
        for item in subset:
            first = owners.setdefault(item["case_id"], name)
            assert first == name, f"{item['case_id']} in {first} and {name}"
    assert sum(len(s) for s in by_split.values()) == len(items)
    assert all(len(by_split[n]) == 4 * len(splits[n]) for n in splits)  # every slice of every case followed it

    with pytest.raises(ValueError, match="in no split, e.g. \\['ghost'\\]"):
        split_datalist(items + [{"case_id": "ghost"}], splits)
    with pytest.raises(ValueError, match="is in two splits"):
        split_datalist(items, {**splits, "test": splits["test"] + splits["training"][:1]})


def test_stratified_and_sizes_follow_ratios():
    cases = _cases()
    splits = split_cases(cases, ratios=(0.7, 0.1, 0.2), seed=3)
    assert {k: len(v) for k, v in splits.items()} == {"training": 15, "validation": 2, "test": 4}  # 21 cases
    severity = {c["case_id"]: c["severity"] for c in cases}
    training = Counter(severity[c] for c in splits["training"])
    for name, n in SEVERITY_SIZES.items():
        if n >= 3:
            assert training[name] >= 2, f"{name}: {training[name]} of {n} cases in training"
    assert training["CT-1"] == 7  # 10 cases at 7:1:2 split exactly
    assert Counter(severity[c] for c in splits["test"])["CT-1"] == 2


def test_stratification_on_real_mosmeddata_registry(shared_data):
    """All 1110 MosMedData studies by their real severity (254/684/125/45/2): each stratum lands
    within one case of its share and the totals are exact."""
    with open(shared_data / "mosmeddata_masks" / "dataset_registry.csv", newline="", encoding="utf-8-sig") as f:
        cases = [{"case_id": r["study_id"], "severity": r["category"]} for r in csv.DictReader(f)]
    splits = split_cases(cases, ratios=(60, 20, 20), seed=0)  # seed 001's 60/20/20
    assert [len(splits[n]) for n in ("training", "validation", "test")] == [666, 222, 222]
    severity = {c["case_id"]: c["severity"] for c in cases}
    sizes = Counter(severity.values())
    for name in ("training", "validation", "test"):
        got = Counter(severity[c] for c in splits[name])
        share = 0.6 if name == "training" else 0.2
        for level, n in sizes.items():
            assert abs(got[level] - n * share) <= 1, (name, level, got[level], n * share)


def test_deterministic_for_a_seed_and_independent_of_input_order():
    cases = _cases()
    first = split_cases(cases, seed=7)
    assert split_cases(list(reversed(cases)), seed=7) == first
    assert split_cases(cases, seed=8) != first
    # integer parts and fractions are the same ratios
    assert split_cases(cases, ratios=(7, 1, 2), seed=7) == first


def test_stratify_options_and_two_way_split():
    cases = _cases()
    both = split_cases(cases, stratify_by=("severity", "lesion_type"))
    assert sorted(sum(both.values(), [])) == sorted(c["case_id"] for c in cases)
    none = split_cases(cases, ratios=(0.8, 0.2), stratify_by=None)
    assert (len(none["training"]), len(none["validation"]), len(none["test"])) == (17, 0, 4)
    with pytest.raises(ValueError, match="has items in two strata"):
        split_cases([{"case_id": "a", "severity": "CT-1"}, {"case_id": "a", "severity": "CT-2"}])


def test_zero_shot_holdout():
    cases = _cases()
    splits = split_cases(cases, holdout={"key": "lesion_type", "values": ["cavity"]})
    assert splits["zeroshot"] == ["CT-1_00", "CT-2_01"]
    assert not set(splits["zeroshot"]) & set(splits["training"] + splits["validation"] + splits["test"])
    assert sum(len(v) for v in splits.values()) == len(cases)
    with pytest.raises(ValueError, match="no case has 'lesion_type' in \\['nodule'\\]"):
        split_cases(cases, holdout={"key": "lesion_type", "values": ["nodule"]})
    with pytest.raises(ValueError, match="holdout must be"):
        split_cases(cases, holdout={"lesion_type": ["cavity"]})


@pytest.mark.parametrize(
    "ratios, message",
    [
        ((0.7, 0.1, 0.1), "must sum to 1 \\(got 0.9"),
        ((0.5, 0.6), "must sum to 1"),
        ((1.0,), "2 or 3 values"),
        ((0.8, -0.1, 0.3), "non-negative"),
        ((0, 0, 0), "not all zero"),
        ((float("nan"), 0.5, 0.5), "finite"),
    ],
)
def test_bad_ratios_are_clear_errors(ratios, message):
    with pytest.raises(ValueError, match=message):
        split_cases(_cases(), ratios=ratios)


def test_write_split_json_loads_with_monai(tmp_path):
    from monai.data import load_decathlon_datalist

    items = _slices(_cases(), per_case=2)
    splits = split_cases(items, holdout={"key": "lesion_type", "values": ["cavity"]})
    path = write_split_json(tmp_path / "splits" / "datalist.json", items, splits, metadata={"seed": 0})
    for name in ("training", "validation", "test", "zeroshot"):
        loaded = load_decathlon_datalist(path, data_list_key=name)
        assert sorted({it["case_id"] for it in loaded}) == splits[name]
        assert all(it["image"].startswith("/data/") for it in loaded)
    two_way = split_cases(items, ratios=(0.8, 0.2))
    path = write_split_json(tmp_path / "two_way.json", items, two_way)
    assert len(load_decathlon_datalist(path, data_list_key="test")) == 2 * len(two_way["test"])
    assert "validation" not in path.read_text()  # empty splits are left out


def test_a_datasets_own_split_file_is_read_validated_and_restricted(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"training": ["a", "b", "c"], "validation": ["d"], "test": ["e", "f"]}))
    cases = [{"case_id": c, "lesion_type": "cavity" if c == "b" else "GGO"} for c in "abcdef" if c != "c"]
    assert read_splits(path, cases) == {"training": ["a", "b"], "validation": ["d"], "test": ["e", "f"]}
    held = read_splits(path, cases, holdout={"key": "lesion_type", "values": ["cavity"]})
    assert held["training"] == ["a"] and held["zeroshot"] == ["b"]
    for bad, match in (({"training": ["a"], "test": ["a"]}, "both"), ({"train": ["a"]}, "expected"), ([1, 2], "expected")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match) as err:
            read_splits(path, cases)
        assert str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON"):
        read_splits(path, cases)
