"""Score a folder of predictions against a folder of ground truth, model-free (in the spirit of
nnU-Net's ``compute_metrics_on_folder``).

Predictions are what ``segreport infer`` writes: ``<case>_seg.nii.gz`` and ``<case>_report.json``.
Ground truth is a folder of ``<case>.nii.gz`` label files (or a case -> path mapping), and
optionally a dataset JSON (MSD layout, as the phantom writes) whose items carry the reference finding
``text``, an instance map ``lesions`` and per-lesion ``attributes``. Every case with a prediction or a label is a row: a label without a prediction, a prediction without a
label and a volume with values other than 0 and 1 are failed rows with the reason. Per case: Dice, IoU and HD95 (mm)
on the prediction's own grid (which must be the label's: same shape and affine), the report's finding
against the reference text (BLEU-1..4, METEOR, ROUGE-L over the cohort) and, where attributes are
annotated, the accuracy of each ground-truth lesion's attributes as the report gives them for the
predicted lesion overlapping it most (lesion ids: the report's own labelling). A case that cannot be
scored is a row with its error; the others are still scored. Writes ``metrics.json`` and ``per_case.csv``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..data.io import load_volume, spacing_from_affine, strip_nifti_suffix
from ..data.outputs import write_csv, write_json
from ..errors import InputError
from ..metrics.segmentation import dice, hd95, iou
from ..metrics.stats import mean_std
from ..transforms.attributes import IGNORE_INDEX, encode_attribute
from ..transforms.findings import label_components
from ..vocab import ATTRIBUTE_NAMES

log = logging.getLogger("segreport.evaluate")


def _references(dataset_json: str | os.PathLike | None) -> dict[str, dict]:
    if not dataset_json:
        return {}
    from ..data.readers import read_msd

    items = read_msd(dataset_json, check_files=False)
    return {str(it["case_id"]): it for it in items}


def _gt_files(gt_dir) -> dict[str, Path]:
    if isinstance(gt_dir, dict):  # {case id: label path}
        return {str(k): Path(v) for k, v in gt_dir.items()}
    # labels are named by case id alone (nnU-Net's _0000 channel suffix is for images, not labels)
    return {strip_nifti_suffix(p.name): p for p in sorted(Path(gt_dir).glob("*.nii*"))}


def _attribute_pairs(pred_mask, affine, report: dict, ref: dict) -> list[tuple[dict, dict]]:
    """(predicted attributes, annotated attributes) for every annotated ground-truth lesion."""
    if not ref.get("lesions") or not ref.get("attributes"):
        return []
    gt_instances = load_volume(ref["lesions"])[0].astype(np.int64)
    pred_instances, _ = label_components(pred_mask, 1, affine)  # the report's own lesion ids
    by_id = {les["id"]: les.get("attributes") for les in report.get("lesions", [])}
    pairs = []
    for annotated in ref["attributes"]:
        inside = pred_instances[gt_instances == int(annotated["id"])]
        hits = np.bincount(inside[inside > 0]) if inside.any() else np.zeros(1, int)
        predicted = by_id.get(int(hits.argmax())) if hits.any() else None
        pairs.append((predicted or {}, annotated))
    return pairs


def _attribute_accuracy(pairs: list[tuple[dict, dict]]) -> dict:
    """Per group and on average; a ground-truth lesion no predicted lesion overlaps (or one given no
    attributes) counts as wrong: detection failures are not hidden by scoring only the hits."""
    acc, n = {}, {}
    for group in ATTRIBUTE_NAMES:
        hits = []
        for predicted, annotated in pairs:
            truth = encode_attribute(group, annotated.get(group)) if annotated.get(group) is not None else IGNORE_INDEX
            if truth != IGNORE_INDEX:
                name = (predicted.get(group) or {}).get("label")
                hits.append(name is not None and encode_attribute(group, name) == truth)
        if hits:
            acc[group], n[group] = float(np.mean(hits)), len(hits)
    return {**acc, "average": float(np.mean(list(acc.values()))) if acc else None, "n_lesions": n}


def _check_binary(path, volume: np.ndarray) -> None:
    """A lesion label or mask holds 0 and 1 only: anything else (-1, a lung class 2, a lesion id map) would
    be scored as lesion, or push HD95 to the edge of the image."""
    values = np.unique(volume)
    other = values[~np.isin(values, (0, 1))]
    if other.size:
        shown = ", ".join(f"{v:g}" for v in other[:5]) + (" ..." if other.size > 5 else "")
        raise InputError(path, f"values {shown} outside {{0, 1}}: a lesion label is binary (a lung class, an "
                               "instance map or a signed type cannot be scored as lesion)")


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike | dict, output_dir: str | os.PathLike | None = None,
                    dataset_json: str | os.PathLike | None = None) -> dict:
    """Per-case and summary metrics (module docstring); written to ``output_dir`` (default ``pred_dir``).
    ``gt_dir``: a label folder, or ``{case id: label path}``."""
    from ..metrics.text import text_metrics

    pred_dir = Path(pred_dir)
    out = Path(output_dir) if output_dir else pred_dir
    gt = _gt_files(gt_dir)
    preds = {p.name[: -len("_seg.nii.gz")]: p for p in sorted(pred_dir.glob("*_seg.nii.gz"))}
    if not preds:
        raise InputError(pred_dir, "no <case>_seg.nii.gz predictions found")
    refs = _references(dataset_json)
    attributing = False  # does the model predict attributes at all? (MedSegText does not: no accuracy then)
    rows, texts, pairs = [], ([], []), []
    for case in sorted(set(preds) | set(gt)):
        row: dict = {"case_id": case}
        pred_path = preds.get(case)
        try:
            if pred_path is None:  # a label nobody predicted is a failed case, not one to leave out
                raise InputError(gt[case], f"no prediction {case}_seg.nii.gz in {pred_dir}")
            if case not in gt:
                raise InputError(pred_path, f"no ground truth {case}.nii.gz in {gt_dir}")
            pred, p_aff, _ = load_volume(pred_path)
            label, g_aff, _ = load_volume(gt[case])
            for path, volume in ((gt[case], label), (pred_path, pred)):
                _check_binary(path, volume)
            if pred.shape != label.shape or not np.allclose(p_aff, g_aff, atol=1e-3):
                raise InputError(pred_path, f"prediction grid {pred.shape} does not match the label's {label.shape} "
                                 "(shape and affine must be equal: predictions are written on the input grid)")
            p, g = pred > 0, label > 0
            row.update(dice=round(dice(p, g), 4), iou=round(iou(p, g), 4),
                       hd95_mm=round(hd95(p, g, spacing_from_affine(p_aff)), 3),
                       pred_voxels=int(p.sum()), gt_voxels=int(g.sum()))
            report_path = pred_dir / f"{case}_report.json"
            report = json.loads(report_path.read_text()) if report_path.is_file() else {}
            ref = refs.get(case, {})
            if report.get("finding") and ref.get("text"):
                row.update(finding=report["finding"], reference=ref["text"])
                texts[0].append(ref["text"])
                texts[1].append(report["finding"])
            attributing = attributing or any(les.get("attributes") for les in report.get("lesions", []))
            pairs += _attribute_pairs(p, p_aff, report, ref)
        except InputError as exc:
            row["error"] = str(exc)
            log.warning("evaluate: %s", exc)
        rows.append(row)

    scored = [r for r in rows if "dice" in r]
    metrics: dict = {"n_cases": len(rows), "n_scored": len(scored), "n_failed": len(rows) - len(scored)}
    for key in ("dice", "iou", "hd95_mm"):
        values = [r[key] for r in scored if np.isfinite(r[key])]
        metrics[key] = mean_std(values) if values else None
    if texts[1]:
        metrics["text"] = text_metrics(texts[0], texts[1], per_sample=False)
    if attributing and pairs:
        metrics["attribute_accuracy"] = _attribute_accuracy(pairs)
    write_csv(out / "per_case.csv", rows)
    write_json(metrics, out / "metrics.json")
    return metrics

