"""Metrics shared by every bundle: segmentation (Dice, IoU, HD95 in mm), report text (BLEU-1..4,
METEOR, ROUGE-L), lesion attributes (accuracy per group), and paired / multi-seed statistics."""

from segreport.metrics.attributes import attribute_accuracy, split_by_group
from segreport.metrics.segmentation import SegmentationScores, binarize, dice, hd95, iou
from segreport.metrics.stats import mean_std, mean_std_over_seeds, paired_t_test
from segreport.metrics.text import text_metrics, tokenize

__all__ = [
    "SegmentationScores",
    "attribute_accuracy",
    "binarize",
    "dice",
    "hd95",
    "iou",
    "mean_std",
    "mean_std_over_seeds",
    "paired_t_test",
    "split_by_group",
    "text_metrics",
    "tokenize",
]
