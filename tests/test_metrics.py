"""Metrics against values worked out by hand (comments show the arithmetic) and against the
reference libraries (MONAI, scipy, nltk) where a hand value would only restate them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import stats as scipy_stats

from segreport.metrics import (
    SegmentationScores,
    attribute_accuracy,
    binarize,
    dice,
    hd95,
    iou,
    mean_std,
    mean_std_over_seeds,
    paired_t_test,
    text_metrics,
    tokenize,
)
from segreport.vocab import ATTRIBUTE_NAMES


def square(shape, rows, cols):
    m = np.zeros(shape, dtype=np.uint8)
    m[rows[0] : rows[1], cols[0] : cols[1]] = 1
    return m


# ---------------------------------------------------------------- segmentation


def test_dice_iou_by_hand():
    gt = square((4, 4), (0, 2), (0, 3))  # rows 0-1, cols 0-2: 6 voxels
    pred = np.zeros((4, 4), np.uint8)
    pred[1, 0:3] = 1  # 3 voxels inside gt
    pred[2, 0] = 1  # 1 outside
    assert dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))  # 0.6
    assert iou(pred, gt) == pytest.approx(3 / (4 + 6 - 3))  # 3/7


def test_binarize_kinds_threshold_at_half():
    assert binarize([0.2, 0.5, 0.7], "probs").tolist() == [False, True, True]
    assert binarize([-1.0, 0.0, 2.0], "logits").tolist() == [False, True, True]  # sigmoid(0) = 0.5
    with pytest.raises(ValueError, match="kind='probs'"):
        binarize([0.0, 0.4, 1.0], "mask")
    with pytest.raises(ValueError, match="logits"):
        binarize([-2.0, 3.0], "probs")


def test_hd95_squares_offset_anisotropic_in_mm():
    # 3x3 squares, the second 4 rows lower. Edge voxels of A (all but the centre) lie 2, 3 or 4 rows
    # from B's facing edge row: distances {2,2,2,3,3,4,4,4} rows each way; the 95th percentile of 8
    # values (linear, index 6.65) is 4 rows.
    a = square((12, 12), (2, 5), (2, 5))
    b = square((12, 12), (6, 9), (2, 5))
    assert hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(4 * 2.0)  # rows are 2 mm apart
    assert hd95(a.T, b.T, spacing=(2.0, 0.5)) == pytest.approx(4 * 0.5)  # same offset along 0.5 mm columns


def test_hd95_cubes_offset_3d_in_mm():
    # 3x3x3 cubes 4 slices apart along axis 2 (2.5 mm): 26 surface voxels at 2 (9), 3 (8), 4 (9)
    # slices from the other cube's face; 95th percentile (index 23.75 of 26) is 4 slices = 10 mm.
    a = np.zeros((8, 8, 12), np.uint8)
    b = np.zeros_like(a)
    a[2:5, 2:5, 2:5] = 1
    b[2:5, 2:5, 6:9] = 1
    assert hd95(a, b, spacing=(0.7, 0.7, 2.5)) == pytest.approx(10.0)


def test_hd95_is_a_percentile_not_the_maximum():
    # a one-voxel-thick line (every voxel is an edge) plus one stray voxel 10 mm away: 22 pred->gt
    # distances, 21 of them 0; the 95th percentile (index 19.95) is 0 while the maximum is 10.
    gt = np.zeros((12, 21), np.uint8)
    gt[0] = 1
    pred = gt.copy()
    pred[10, 5] = 1
    assert hd95(pred, gt, spacing=(1.0, 1.0)) == pytest.approx(0.0)
    full = compute_hausdorff_distance(torch.tensor(pred)[None, None], torch.tensor(gt)[None, None], include_background=True)
    assert float(full) == pytest.approx(10.0)


def test_hd95_equals_monai_compute_hausdorff_distance():
    rng = np.random.default_rng(0)
    pred = rng.random((14, 12, 6)) > 0.7
    gt = rng.random((14, 12, 6)) > 0.6
    spacing = (0.7, 0.9, 2.5)
    ref = compute_hausdorff_distance(
        torch.tensor(pred)[None, None], torch.tensor(gt)[None, None], include_background=True, percentile=95, spacing=spacing
    )
    assert hd95(pred, gt, spacing) == pytest.approx(float(ref), rel=1e-5)


def test_empty_mask_rules():
    empty = np.zeros((3, 4), np.uint8)
    lesion = square((3, 4), (1, 2), (1, 3))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert math.isnan(hd95(empty, empty, spacing=(2.0, 2.0)))
    # one side empty: Dice/IoU 0, HD95 = field-of-view diagonal = sqrt((3*2)^2 + (4*2)^2) = 10 mm
    for pred, gt in ((lesion, empty), (empty, lesion)):
        assert dice(pred, gt) == 0.0 and iou(pred, gt) == 0.0
        assert hd95(pred, gt, spacing=(2.0, 2.0)) == pytest.approx(10.0)


def test_case_pooling_differs_from_slice_mean():
    big_gt = square((10, 10), (0, 10), (0, 10))  # 100 voxels
    big_pred = square((10, 10), (0, 9), (0, 10))  # 90 of them: Dice 180/190
    tiny_gt = square((10, 10), (2, 3), (2, 3))
    tiny_pred = square((10, 10), (7, 8), (7, 8))  # misses: Dice 0
    empty = np.zeros((10, 10), np.uint8)  # lesion-free slice: Dice 1
    scores = SegmentationScores()
    for k, (p, g) in enumerate([(big_pred, big_gt), (tiny_pred, tiny_gt), (empty, empty)]):
        scores.add(p, g, case_id="c1", spacing=(1.0, 1.0), slice_index=k)
    items, (case,) = scores.item_rows(), scores.case_rows()
    assert [r["dice"] for r in items] == pytest.approx([180 / 190, 0.0, 1.0])
    slice_mean = np.mean([r["dice"] for r in items])  # 0.649
    # pooled: TP 90, FP 1, FN 10 + 1 -> 2*90 / (180 + 1 + 11) = 0.9375, the Dice of the stacked volume
    assert case["dice"] == pytest.approx(180 / 192)
    assert case["iou"] == pytest.approx(90 / 102)
    volume = dice(np.stack([big_pred, tiny_pred, empty], -1), np.stack([big_gt, tiny_gt, empty], -1))
    assert case["dice"] == pytest.approx(volume)
    assert abs(case["dice"] - slice_mean) > 0.25
    assert case["n_items"] == 3 and case["gt_voxels"] == 101 and case["pred_voxels"] == 91


def test_case_hd95_pools_surface_distances():
    # slice 0: identical 10x10 squares, 36 edge voxels at distance 0 each way. slice 1: the 3x3
    # squares 4 rows apart, {2,2,2,3,3,4,4,4} each way. Pooled 44 values per direction: the 95th
    # percentile (index 40.85) falls between 3 and 4 -> 3.85 mm; the mean of slice HD95s would be 2.
    scores = SegmentationScores()
    sq = square((12, 12), (1, 11), (1, 11))
    scores.add(sq, sq, "c", spacing=(1.0, 1.0), slice_index=0)
    scores.add(square((12, 12), (2, 5), (2, 5)), square((12, 12), (6, 9), (2, 5)), "c", spacing=(1.0, 1.0), slice_index=1)
    assert [r["hd95_mm"] for r in scores.item_rows()] == pytest.approx([0.0, 4.0])
    assert scores.case_rows()[0]["hd95_mm"] == pytest.approx(3.85)


def test_accumulator_batch_logits_and_nan_aware_summary():
    logits = torch.full((3, 1, 6, 6), -5.0)
    logits[0, 0, 1:4, 1:4] = 5.0  # 9 voxels
    logits[2, 0, 0, 0] = 5.0  # a false positive on an empty slice
    gt = torch.zeros((3, 1, 6, 6))
    gt[0, 0, 1:4, 1:3] = 1  # 6 voxels, all predicted
    scores = SegmentationScores(kind="logits")
    rows = scores.add_batch(logits, gt, ["a", "b", "b"], spacings=(0.8, 0.8), slice_indices=[4, 0, 1])
    assert [r["dice"] for r in rows] == pytest.approx([12 / 15, 1.0, 0.0])
    assert math.isnan(rows[1]["hd95_mm"])  # both empty
    assert rows[2]["hd95_mm"] == pytest.approx(math.hypot(6 * 0.8, 6 * 0.8))
    summary = scores.summary()
    assert summary["item"]["dice"]["mean"] == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    assert summary["item"]["dice"]["std"] == pytest.approx(np.std([0.8, 1.0, 0.0], ddof=1))
    assert summary["item"]["hd95_mm"]["n"] == 2  # the nan is left out
    assert summary["case"]["dice"]["n"] == 2 and len(scores) == 3
    assert [r["dice"] for r in scores.case_rows()] == pytest.approx([0.8, 0.0])  # case b: TP 0, FP 1


def test_without_spacing_hd95_is_nan_not_unitless():
    scores = SegmentationScores()
    sq = square((8, 8), (1, 4), (1, 4))
    scores.add(sq, sq, "a", spacing=(1.0, 1.0))
    row = scores.add(sq, np.roll(sq, 2, 0), "a")  # e.g. resized PNG slices: no mm
    assert math.isnan(row["hd95_mm"]) and row["dice"] == pytest.approx(2 * 1 / 6)
    assert math.isnan(scores.case_rows()[0]["hd95_mm"])  # a case with any unitless item has no mm HD95
    assert scores.summary()["item"]["hd95_mm"]["n"] == 1


def test_bad_segmentation_input_is_refused():
    scores = SegmentationScores()
    with pytest.raises(ValueError, match="shape"):
        scores.add(np.zeros((4, 4)), np.zeros((4, 5)), "c", spacing=1.0)
    with pytest.raises(ValueError, match="spacing"):
        scores.add(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), "c", spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="kind"):
        SegmentationScores(kind="softmax")


# ---------------------------------------------------------------- text

REF = "infection in the upper left lung"
FINDING = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Two infected areas,lower LEFT lung.") == ["two", "infected", "areas", ",", "lower", "left", "lung", "."]


def test_identical_text_scores_one():
    out = text_metrics([FINDING, REF], [FINDING, REF])
    for n in range(1, 5):
        assert out[f"bleu{n}"] == pytest.approx(1.0) and out[f"sentence_bleu{n}"] == pytest.approx(1.0)
    assert out["rouge_l"] == pytest.approx(1.0)
    assert out["per_sample"][0]["meteor"] >= 0.99  # 16 tokens, one chunk: 1 - 0.5 / 16**3
    assert out["n"] == 2 and len(out["per_sample"]) == 2
    assert "per_sample" not in text_metrics([REF], [REF], per_sample=False)


def test_bleu_by_hand():
    # hyp "infection in the lower left lung" vs REF: matched 1..4-grams 5/6, 3/5, 1/4, 0/3; BP = 1
    out = text_metrics([REF], ["infection in the lower left lung"])
    assert out["bleu1"] == pytest.approx(5 / 6)
    assert out["bleu2"] == pytest.approx((5 / 6 * 3 / 5) ** (1 / 2))
    assert out["bleu3"] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))  # 0.5
    assert out["bleu4"] == pytest.approx(0.0, abs=1e-12)  # unsmoothed: no 4-gram match -> 0 (nltk: ~1e-77)
    # sentence BLEU, method1: the zero 4-gram count becomes 0.1 -> (1/8 * 0.1/3) ** (1/4)
    assert out["sentence_bleu4"] == pytest.approx((1 / 8 * 0.1 / 3) ** 0.25)
    # corpus BLEU sums counts over samples (11/12, 8/10, 5/8, 3/6), unlike the mean of sentence BLEUs
    two = text_metrics([REF, REF], ["infection in the lower left lung", REF])
    assert two["bleu4"] == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25)
    assert two["sentence_bleu4"] == pytest.approx(((1 / 240) ** 0.25 + 1.0) / 2)


def test_rouge_l_by_hand():
    # LCS "infection in the left lung" = 5: P = 5/5, R = 5/6, F1 = 10/11
    assert text_metrics([REF], ["infection in the left lung"])["rouge_l"] == pytest.approx(10 / 11)
    # reordered: LCS "left lung" = 2: P = 2/3, R = 2/6, F1 = 4/9
    assert text_metrics([REF], ["left lung infection"])["rouge_l"] == pytest.approx(4 / 9)


def test_meteor_uses_wordnet_synonyms():
    from nltk.translate.meteor_score import meteor_score

    class NoSynonyms:  # exact and stem matches only
        def synsets(self, word):
            return []

    ref = "bilateral pulmonary infection, two infected areas, lower left lung"
    hyp = "bilateral pulmonary infection, two infected regions, lower left lung"
    got = text_metrics([ref], [hyp])["meteor"]
    without_wordnet = meteor_score([tokenize(ref)], tokenize(hyp), wordnet=NoSynonyms())
    assert without_wordnet < 0.92  # "regions" unmatched: 11/12 matches in 3 chunks
    assert got > 0.99  # WordNet matches "regions" with "areas": one chunk, all 12 tokens


def test_text_metrics_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        text_metrics([REF, REF], [REF])


# ---------------------------------------------------------------- attributes


def test_attribute_accuracy_by_hand():
    targets = {"shape": [0, 1, 2, 0, -100], "density": [2, 2, 0, 1, 1], "surface": [-100] * 5}
    preds = {
        "shape": [0, 1, 2, 3, 1],  # 3 of the 4 annotated right
        "density": torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.9, 0.0, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7]]),  # -> 2, 0, 0, 1, 2: 3/5
        "surface": [0, 1, 0, 1, 0],
    }
    out = attribute_accuracy(preds, targets)
    assert out["accuracy"]["shape"] == pytest.approx(3 / 4) and out["n"]["shape"] == 4
    assert out["accuracy"]["density"] == pytest.approx(3 / 5)
    assert math.isnan(out["accuracy"]["surface"]) and out["n"]["surface"] == 0
    assert out["average"] == pytest.approx((3 / 4 + 3 / 5) / 2)  # the unannotated group is left out
    expected = np.zeros((4, 4), int)
    for t, p in [(0, 0), (1, 1), (2, 2), (0, 3)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(out["confusion"]["shape"], expected)


def test_attribute_accuracy_from_concatenated_head_output():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6, 13))  # shape 4 | invasion 2 | density 3 | heterogeneity 2 | surface 2
    targets = np.stack([rng.integers(0, n, 6) for n in (4, 2, 3, 2, 2)], 1)
    targets[0, 2] = -100
    split = {"shape": scores[:, 0:4], "invasion": scores[:, 4:6], "density": scores[:, 6:9], "heterogeneity": scores[:, 9:11], "surface": scores[:, 11:13]}
    by_group = attribute_accuracy(split, {g: targets[:, i] for i, g in enumerate(ATTRIBUTE_NAMES)})
    concatenated = attribute_accuracy(scores, targets)
    assert concatenated["accuracy"] == by_group["accuracy"] and concatenated["n"]["density"] == 5
    with pytest.raises(ValueError, match="outside"):
        attribute_accuracy({"invasion": [0, 2]}, {"invasion": [0, 1]})


# ---------------------------------------------------------------- stats


def test_paired_t_test_by_hand_and_against_scipy():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, float("nan")]
    b = [1.5, 2.5, 2.5, 4.5, 5.5, 1.0]
    # d = a - b on the 5 complete pairs = [-.5, -.5, .5, -.5, -.5]: mean -0.3, sd sqrt(0.2), se 0.2, t -1.5
    out = paired_t_test(a, b)
    assert out["n"] == 5 and out["mean_diff"] == pytest.approx(-0.3) and out["t"] == pytest.approx(-1.5)
    assert out["p"] == pytest.approx(scipy_stats.ttest_rel(a[:5], b[:5]).pvalue)
    half = scipy_stats.t.ppf(0.975, df=4) * 0.2
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((-0.3 - half, -0.3 + half))


def test_mean_std_over_seeds():
    runs = [{"dice": 0.7, "bleu4": 0.8}, {"dice": 0.8, "bleu4": float("nan")}, {"dice": 0.9}]
    out = mean_std_over_seeds(runs)
    assert out["dice"] == pytest.approx({"mean": 0.8, "std": 0.1, "n": 3})
    assert out["bleu4"]["mean"] == pytest.approx(0.8) and out["bleu4"]["n"] == 1 and math.isnan(out["bleu4"]["std"])
    assert math.isnan(mean_std([])["mean"])
