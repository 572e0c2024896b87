"""Evaluation of the interactive 3D lesion report (seed 001): Dice per click, NoC, HD95, attribute
accuracy, zero-shot split, panels and the ablation table (Tables 2-3)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data.io import spacing_from_affine
from ..errors import InputError
from ..inference.geometry import as_affine, map_points, roi_to_original
from ..inference.session import PromptSession, is_promptable as is_interactive
from ..metrics.attributes import attribute_accuracy
from ..metrics.segmentation import dice as dice_score, hd95
from ..models.lesion_report_3d import trained
from ..models.spec import read_checkpoint
from ..transforms.attributes import IGNORE_INDEX
from ..transforms.clicks import sample_click
from ..vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES
from .click_training import ClickSet, _spacing
from .lesion_report import lesion_value, load_transforms, spatial_transforms
from ..data.outputs import write_csv, write_json

log = logging.getLogger("segreport.lesion_report")


@torch.inference_mode()
def evaluate(
    network: nn.Module | None,
    datalists: Mapping[str, list],
    output_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    splits: Sequence[str] = ("test", "zeroshot"),
    max_clicks: int = 10,
    report_clicks: int = 1,
    noc_thresholds: Sequence[float] = (0.80, 0.85, 0.90),
    device: str | torch.device = "cpu",
    n_panels: int = 4,
    growth_max_rois: int = 0,
) -> dict:
    """Seed 001's evaluation -> ``metrics.json``, ``per_case.csv``, ``dice_vs_clicks.png``, ``panels/``.

    Protocol per case (the paper's pre-processing: ROI around the largest lesion of the label):
    clicks are simulated as in training but deterministically (first at the lesion's most interior
    voxel, then corrections at the most interior voxel of the larger error region), up to
    ``max_clicks``; Dice in the ROI after 0..``max_clicks`` clicks gives the curve and the number of
    clicks to reach each threshold (NoC; ``max_clicks`` when never reached, the usual convention).
    DSC and HD95 (mm) are measured on the ORIGINAL grid against the whole target lesion, after
    ``report_clicks`` clicks (default 1: the minimal interaction; baselines have no clicks), so a
    lesion larger than the ROI costs Dice; ``dice_roi`` is the same prediction scored inside the ROI.
    The attribute accuracy per group and its average come from the same prediction. ``splits`` absent from
    ``datalists`` (no ``zeroshot`` without a hold-out) are skipped.

    ``growth_max_rois`` > 1 (interactive models): every lesion is also clicked once through a
    :class:`PromptSession` on its original image, at the same first click, with one ROI and with ROI
    growth up to that many ROIs, scored on the original grid: ``dice_cut_one_roi`` vs ``dice_cut_grown``
    for the lesions the ROI cuts (a perfect ROI mask scores under 0.99), ``dice_whole_*`` for the others.
    """
    if checkpoint:
        network = trained(*read_checkpoint(checkpoint))
    net = getattr(network, "module", network).to(device).eval()
    spec = net.spec
    interactive = is_interactive(net)
    out = Path(output_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    loader = load_transforms()
    spatial = spatial_transforms(spec["roi_size"], spec["spacing"], spec["window"], spec["axcodes"])
    metrics: dict[str, Any] = {
        "model": spec["model"], "report_clicks": report_clicks if interactive else 0, "max_clicks": max_clicks,
        "spec": spec, "skipped_cases": list(datalists.get("skipped", [])),
    }  # fmt: skip
    rows, curves, panels_left = [], {}, n_panels
    for split in splits:
        items = datalists.get(split) or []
        if not items:
            continue
        seg_rows, attr_pred, attr_true, per_click = [], {g: [] for g in ATTRIBUTE_NAMES}, [], []
        attr_acc_click: list[list[np.ndarray]] = []
        for item in tqdm(items, desc=f"evaluate {split}", leave=False):
            loaded = loader(dict(item))
            orig_affine = as_affine(loaded["image"].affine)
            orig_shape = tuple(loaded["image"].shape[1:])
            target_orig = np.asarray(loaded["label"][0]) > 0.5
            d = spatial(loaded)
            image = d["image"].as_tensor()[None].float().to(device)
            gt_roi = np.asarray(d["label"][0]) > 0.5
            row = {"split": split, "case_id": item.get("case_id"), "lesion_id": d["lesion_id"],
                   "lesion_type": lesion_value(item, "lesion_type"), "lesion_voxels": int(target_orig.sum())}
            if interactive:
                traj = _click_trajectory(net, image, gt_roi, max_clicks)
                dices = [t["dice"] for t in traj]
                per_click.append(dices)
                attr_acc_click.append(np.array([[int(t["attr"][g]) for g in ATTRIBUTE_NAMES] for t in traj]))
                chosen = traj[min(report_clicks, len(traj) - 1)]
                row.update({f"dice_roi_{k}": round(v, 4) for k, v in enumerate(dices)})
                for thr in noc_thresholds:
                    row[f"noc_{round(thr * 100)}"] = next((k for k in range(1, len(dices)) if dices[k] >= thr), max_clicks)
            else:
                chosen = _single_prediction(net, image, gt_roi)
            if chosen.get("prob") is not None:
                pred_orig = roi_to_original(chosen["prob"], d["image"].affine, orig_affine, orig_shape) > 0.5
                row["dice"] = round(dice_score(pred_orig, target_orig), 4)
                row["hd95_mm"] = round(hd95(pred_orig, target_orig, spacing_from_affine(orig_affine)), 3)
                row["dice_roi"] = round(chosen["dice"], 4)  # inside the ROI: what any ROI model can reach
                # the first simulated click (none when the ROI holds no lesion voxel)
                first_click = next((t["clicks"][0][0] for t in traj if t["clicks"]), None) if interactive else None
                if growth_max_rois > 1 and first_click is not None:
                    row.update(_growth_dices(net, loaded["image"], first_click, d["image"].affine, gt_roi,
                                             target_orig, growth_max_rois, device))
                seg_rows.append(row)
                if panels_left > 0:
                    _save_panel(out / "panels" / f"{split}_{row['case_id']}_lesion{row['lesion_id']}.png", d["image"][0], gt_roi,
                                traj if interactive else [chosen], row)
                    panels_left -= 1
            if chosen.get("attr") is not None:
                true = d["attr_target"].numpy()
                attr_true.append(true)
                for i, g in enumerate(ATTRIBUTE_NAMES):
                    attr_pred[g].append(int(chosen["attr"][g]))
                    row[f"{g}_true"] = ATTRIBUTE_GROUPS[g][true[i]] if true[i] != IGNORE_INDEX else ""
                    row[f"{g}_pred"] = ATTRIBUTE_GROUPS[g][int(chosen["attr"][g])]
            rows.append(row)
        metrics[split] = {"n_items": len(items), "n_cases": len({it.get("case_id") for it in items}),  # items = lesions
                          **_split_metrics(seg_rows, attr_pred, attr_true, per_click, attr_acc_click, noc_thresholds, max_clicks)}
        if per_click:
            curves[split] = metrics[split]["dice_per_click"]
    if not any(s in metrics for s in splits):
        raise InputError(None, f"nothing to evaluate: no case in splits {list(splits)}")
    if curves:
        _plot_curve(curves, out / "dice_vs_clicks.png", spec)
    write_csv(out / "per_case.csv", rows)
    write_json(metrics, out / "metrics.json")
    log.info("evaluation: %s", {s: {k: v for k, v in metrics[s].items() if isinstance(v, float)} for s in splits if s in metrics})
    return metrics


def _click_trajectory(net: nn.Module, image: torch.Tensor, gt: np.ndarray, max_clicks: int) -> list[dict]:
    """Prediction after 0..max_clicks deterministic simulated clicks (one encode, decode per click)."""
    embedding = net.encode_image(image)
    clicks = ClickSet(1, _spacing(net))
    prev, traj = None, []
    for k in range(max_clicks + 1):
        if k == 1:
            clicks.add(0, sample_click(gt, spacing=clicks.spacing))  # jitter 0: deterministic, the most central
        elif k > 1:
            clicks.add_next(gt[None], (traj[-1]["prob"].numpy() > 0.5)[None], 0, 0.0)
        out = net.decode(embedding, *clicks.tensors(image.device), mask_prompt=prev)
        prev = out["low_res_logits"]
        prob = torch.sigmoid(out["mask_logits"][0, 0].float()).cpu()
        traj.append({"prob": prob, "dice": dice_score(prob.numpy() > 0.5, gt),
                     "attr": {g: int(out["attr_logits"][g][0].argmax()) for g in ATTRIBUTE_NAMES},
                     "clicks": [(p, lab) for p, lab in zip(clicks.points[0], clicks.labels[0])]})
    return traj


def _growth_dices(net: nn.Module, ct, click_roi, roi_affine, gt_roi: np.ndarray, target: np.ndarray, max_rois: int,
                  device) -> dict:
    """Original-grid Dice of one click through a prompt session, with one ROI and with ROI growth; keys
    ``dice_cut_*`` for a lesion the ROI cuts, ``dice_whole_*`` for one it holds whole (where growth
    can only add false positives)."""
    orig_affine, shape = as_affine(ct.affine), tuple(target.shape)
    perfect = roi_to_original(torch.from_numpy(gt_roi.astype(np.float32)), roi_affine, orig_affine, shape) > 0.5
    perfect_dice = dice_score(perfect, target)
    kind = "cut" if perfect_dice < 0.99 else "whole"
    ijk = map_points(np.asarray(click_roi, dtype=np.float64), roi_affine, orig_affine)[0]
    hu = np.asarray(ct[0].detach().cpu() if isinstance(ct, torch.Tensor) else ct[0], dtype=np.float32)
    out = {f"dice_{kind}_perfect_roi": round(perfect_dice, 4)}
    for name, rois in (("one_roi", 1), ("grown", max_rois)):
        session = PromptSession(net, device, max_rois=rois)
        session.set_image(hu, orig_affine)
        pred = session.click(ijk)
        out[f"dice_{kind}_{name}"] = round(dice_score(pred.mask > 0, target), 4)
        out[f"rois_{kind}_{name}"] = pred.extras["rois"]
    return out


def _single_prediction(net: nn.Module, image: torch.Tensor, gt: np.ndarray) -> dict:
    out = net(image)
    res: dict[str, Any] = {"prob": None, "attr": None, "clicks": []}
    if "mask_logits" in out:
        res["prob"] = torch.sigmoid(out["mask_logits"][0, 0].float()).cpu()
        res["dice"] = dice_score(res["prob"].numpy() > 0.5, gt)
    if "attr_logits" in out:
        res["attr"] = {g: int(out["attr_logits"][g][0].argmax()) for g in ATTRIBUTE_NAMES}
    return res


def _split_metrics(seg_rows, attr_pred, attr_true, per_click, attr_acc_click, noc_thresholds, max_clicks) -> dict:
    m: dict[str, Any] = {}
    if seg_rows:
        d = np.array([r["dice"] for r in seg_rows])
        h = np.array([r["hd95_mm"] for r in seg_rows], dtype=float)
        m.update(dice=float(d.mean()), dice_std=float(d.std()), hd95_mm=float(np.nanmean(h)) if np.isfinite(h).any() else float("nan"),
                 dice_roi=float(np.mean([r["dice_roi"] for r in seg_rows])))
        for kind in ("cut", "whole"):  # ROI growth, measured: lesions the ROI cuts, and the others
            rows_k = [r for r in seg_rows if f"dice_{kind}_grown" in r]
            if rows_k:
                m[f"{kind}_lesions"] = len(rows_k)
                for key in ("perfect_roi", "one_roi", "grown"):
                    m[f"dice_{kind}_{key}"] = float(np.mean([r[f"dice_{kind}_{key}"] for r in rows_k]))
                m[f"rois_{kind}_grown"] = float(np.mean([r[f"rois_{kind}_grown"] for r in rows_k]))
    if per_click:
        curve = np.array(per_click).mean(0)
        m["dice_per_click"] = [round(float(v), 4) for v in curve]  # index = number of clicks (0 = none)
        for thr in noc_thresholds:
            key = f"noc_{round(thr * 100)}"
            nocs = [next((k for k in range(1, len(c)) if c[k] >= thr), max_clicks) for c in per_click]
            m[key] = float(np.mean(nocs))
            m[f"reached_{round(thr * 100)}"] = float(np.mean([any(v >= thr for v in c[1:]) for c in per_click]))
    if attr_true:
        true = np.stack(attr_true)
        targets = {g: true[:, i] for i, g in enumerate(ATTRIBUTE_NAMES)}
        acc = attribute_accuracy({g: np.asarray(v) for g, v in attr_pred.items()}, targets)
        m["attribute_accuracy"] = acc["accuracy"]
        m["attribute_accuracy_average"] = acc["average"]
        m["attribute_n"] = acc["n"]
        if attr_acc_click:
            preds = np.stack(attr_acc_click)  # (cases, clicks, groups)
            m["attribute_accuracy_per_click"] = [
                round(attribute_accuracy({g: preds[:, k, i] for i, g in enumerate(ATTRIBUTE_NAMES)}, targets)["average"], 4)
                for k in range(preds.shape[1])
            ]
    return m


def _plot_curve(curves: Mapping[str, Sequence[float]], path: Path, spec: Mapping) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for split, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker="o", label=split)
    ax.set_xlabel("simulated clicks")
    ax.set_ylabel("mean Dice (ROI)")
    ax.set_ylim(0, 1)
    ax.set_xticks(range(len(next(iter(curves.values())))))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Dice vs clicks ({spec['config']}, refinement={spec['point_refinement']}, synergy={spec['synergy']})", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_panel(path: Path, image: torch.Tensor, gt: np.ndarray, traj: list[dict], row: Mapping) -> None:
    """ROI slice through the lesion centre: ground truth (green) and predictions (red) after some clicks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(image)
    z = int(np.argmax(gt.sum((0, 1)))) if gt.any() else img.shape[2] // 2
    steps = sorted({1, 3, len(traj) - 1} & set(range(len(traj)))) if len(traj) > 1 else [0]
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.4), squeeze=False)
    for ax, k in zip(axes[0], steps):
        ax.imshow(img[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if gt[:, :, z].any():
            ax.contour(gt[:, :, z].T, levels=[0.5], colors="lime", linewidths=1)
        pred = traj[k]["prob"].numpy()[:, :, z] > 0.5
        if pred.any():
            ax.contour(pred.T, levels=[0.5], colors="red", linewidths=1)
        for p, lab in traj[k]["clicks"]:
            if abs(p[2] - z) <= 1:
                ax.plot(p[0], p[1], "+" if lab else "x", color="yellow" if lab else "cyan", ms=9, mew=2)
        title = f"{k} click(s): Dice {traj[k]['dice']:.2f}" if "dice" in traj[k] else "prediction"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{row['case_id']} lesion {row['lesion_id']} ({row.get('lesion_type')})", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_ablation_table(runs: Mapping[str, str | os.PathLike], output_dir: str | os.PathLike) -> list[dict]:
    """Tables 2 and 3 of the paper from several evaluation outputs -> ``ablation.{json,csv,md}``.

    ``runs``: ``{name: folder}`` where the folder holds ``metrics.json`` (or ``eval/metrics.json``),
    e.g. vanilla / +point refinement / +feature synergy / full, and baselines. One row per (split,
    run): DSC, HD95, attribute accuracy per group and average, Dice at 1 and 5 clicks, NoC@85.
    """
    rows = []
    for name, folder in runs.items():
        folder = Path(folder)
        path = folder / "metrics.json" if (folder / "metrics.json").is_file() else folder / "eval" / "metrics.json"
        if not path.is_file():
            raise InputError(path, f"no metrics.json for ablation run {name!r}: evaluate it first")
        metrics = json.loads(path.read_text())
        for split in ("test", "zeroshot"):
            m = metrics.get(split)
            if not m:
                continue
            curve = m.get("dice_per_click") or []
            row = {"split": split, "method": name, "dsc": m.get("dice"), "hd95_mm": m.get("hd95_mm")}
            row.update({g: (m.get("attribute_accuracy") or {}).get(g) for g in ATTRIBUTE_NAMES})
            row.update(attr_average=m.get("attribute_accuracy_average"),
                       dice_1_click=curve[1] if len(curve) > 1 else None,
                       dice_5_clicks=curve[5] if len(curve) > 5 else None, noc_85=m.get("noc_85"))
            rows.append(row)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(rows, out / "ablation.json")
    write_csv(out / "ablation.csv", rows)
    cols = list(rows[0]) if rows else []

    def cell(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    tmp = out / "ablation.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "ablation.md")
    return rows
