"""The 3D lesion report without a person: every lesion of held-out scans, found by the automatic mode.

The models are the quality bench's (``bench_lesion_report_quality.py --quick``: the bundle's default and
the 3D U-Net, trained on the same 40-case phantom, one pair per ``--seeds`` value); missing ones are
trained first through it. Each seed's test scans are a phantom neither saw: ``--cases`` cases of seed
S + 2000 at the default phantom geometry (192×192×48 at 1.6×1.6×5 mm, LPS). Both models run through the batch runner,
as ``segreport infer`` does (automatic mode: sliding window over the lungs; the default model then
refines each candidate with one simulated click), and are scored against the ground-truth instance maps:

* lesion-level recall and precision for lesions ≥ 1 mL (a hit: predicted lesion with IoU ≥ 0.1), recall
  by lesion type with solid (not calcified) nodules apart, and recall without them,
* case Dice on the original grid, the default model vs the U-Net with the same sliding window,
* attribute accuracy of the detected lesions (each ground-truth lesion against the predicted lesion it
  overlaps most),
* seconds per 192×192×48 volume, and per 512×512×300 volume (one phantom case at 0.7×0.7×1 mm) with the
  peak memory of that run (a fresh process, so the peak is its own).

Mean ± std over the seeds; the targets are judged on the mean. Writes ``benchmarks/results/lesion_detection.json``.

    python benchmarks/bench_lesion_detection.py --seeds 1 2 3 --skip-large   # three seeds, without the 512×512×300 run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from common import REPO, mean_std
GROUPS = ("shape", "invasion", "density", "heterogeneity", "surface")
MIN_ML, MIN_IOU = 1.0, 0.1


def overlaps(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every (ground-truth lesion, predicted lesion) pair: (G+1, P+1), row/column 0 background."""
    g, p = int(truth.max()), int(pred.max())
    inter = np.bincount(truth.ravel().astype(np.int64) * (p + 1) + pred.ravel(), minlength=(g + 1) * (p + 1)).reshape(g + 1, p + 1)
    size_t, size_p = inter.sum(1), inter.sum(0)
    union = size_t[:, None] + size_p[None, :] - inter
    return inter / np.maximum(union, 1)


def lesion_kind(attrs: dict) -> str:
    """The lesion type, with solid (not calcified) nodules apart: the lesions the automatic mode misses most."""
    kind = attrs.get("lesion_type", "unknown")
    return "solid nodule" if kind == "nodule" and attrs.get("density") != "hyperdense" else kind


def score_case(pred: np.ndarray, truth: np.ndarray, voxel_ml: float, report: dict, truth_attrs: dict) -> dict:
    """Lesion-level hits, case Dice and the attributes of detected lesions of one case."""
    iou = overlaps(pred, truth)
    t_ml = np.bincount(truth.ravel(), minlength=iou.shape[0]) * voxel_ml
    p_ml = np.bincount(pred.ravel(), minlength=iou.shape[1]) * voxel_ml
    big_t = [g for g in range(1, iou.shape[0]) if t_ml[g] >= MIN_ML]
    big_p = [p for p in range(1, iou.shape[1]) if p_ml[p] >= MIN_ML]
    hit = iou[:, 1:].max(1, initial=0) >= MIN_IOU if iou.shape[1] > 1 else np.zeros(iou.shape[0], bool)
    true_p = iou[1:].max(0, initial=0) >= MIN_IOU if iou.shape[0] > 1 else np.zeros(iou.shape[1], bool)
    a, b = pred > 0, truth > 0
    dice = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1) if (a.any() or b.any()) else 1.0
    by_id = {les["id"]: les.get("attributes") for les in report.get("lesions", [])}
    attr = {g: [] for g in GROUPS}
    for g in big_t:
        if not hit[g]:
            continue
        best = int(np.argmax(iou[g, 1:])) + 1
        predicted = by_id.get(best)
        if predicted and g in truth_attrs:
            for group in GROUPS:
                attr[group].append(predicted[group]["label"] == truth_attrs[g][group])
    kinds: dict[str, list[int]] = {}  # per kind of lesion: [lesions >= 1 mL, found]
    for g in big_t:
        k = kinds.setdefault(lesion_kind(truth_attrs.get(g, {})), [0, 0])
        k[0], k[1] = k[0] + 1, k[1] + int(hit[g])
    return {"truth": len(big_t), "found": int(sum(hit[g] for g in big_t)), "predicted": len(big_p), "kinds": kinds,
            "correct": int(sum(true_p[p] for p in big_p)), "predicted_all": iou.shape[1] - 1,
            "correct_all": int(true_p[1:].sum()), "dice": float(dice), "attributes": attr}


def summarise(rows: list[dict]) -> dict:
    truth, found = sum(r["truth"] for r in rows), sum(r["found"] for r in rows)
    pred, correct = sum(r["predicted"] for r in rows), sum(r["correct"] for r in rows)
    attr = {g: [v for r in rows for v in r["attributes"][g]] for g in GROUPS}
    per_group = {g: float(np.mean(v)) if v else None for g, v in attr.items()}
    known = [v for v in per_group.values() if v is not None]
    kinds: dict[str, list[int]] = {}
    for r in rows:
        for k, (n, f) in r["kinds"].items():
            kinds.setdefault(k, [0, 0])
            kinds[k][0] += n
            kinds[k][1] += f
    solid = kinds.get("solid nodule", [0, 0])
    return {"lesions_1ml": truth, "recall": found / truth if truth else None,
            "precision": correct / pred if pred else None, "predicted_1ml": pred,
            "recall_by_kind": {k: {"lesions": n, "recall": f / n} for k, (n, f) in sorted(kinds.items())},
            "recall_without_solid_nodules": (found - solid[1]) / (truth - solid[0]) if truth > solid[0] else None,
            "precision_all_sizes": sum(r["correct_all"] for r in rows) / max(sum(r["predicted_all"] for r in rows), 1),
            "case_dice": float(np.mean([r["dice"] for r in rows])),
            "attribute_accuracy": per_group, "attribute_accuracy_average": float(np.mean(known)) if known else None,
            "attribute_lesions": len(attr[GROUPS[0]])}


def run_model(checkpoint: Path, images: Path, out: Path, overlap: float, outline_min_ml: float) -> list[dict]:
    """The batch runner over ``images`` (automatic mode, windows overlapping by ``overlap``); its per-case rows."""
    from segreport import models
    from segreport.run.batch import run_batch

    predictor = models.load(str(checkpoint), device="cpu", kind="lesion_report_3d", overlap=overlap, outline_min_ml=outline_min_ml)
    summary = run_batch(predictor, str(images), str(out), overwrite=True, device="cpu")
    summary.raise_if_failed()
    return summary.cases


def score_model(name: str, rows: list[dict], out: Path, data: Path, truth_attrs: dict) -> dict:
    import nibabel as nib

    scored = []
    for row in rows:
        cid = row["case_id"]
        truth_img = nib.load(data / "lesionsTr" / f"{cid}.nii.gz")
        truth = np.asarray(truth_img.dataobj).astype(np.int64)
        pred = np.asarray(nib.load(out / f"{cid}_lesions.nii.gz").dataobj).astype(np.int64)
        report = json.loads((out / f"{cid}_report.json").read_text())
        voxel_ml = abs(np.linalg.det(truth_img.affine[:3, :3])) / 1000.0
        scored.append(score_case(pred, truth, voxel_ml, report, truth_attrs.get(cid, {})))
    s = summarise(scored)
    s["seconds_per_volume"] = float(np.mean([r["predict_s"] for r in rows]))
    print(f"{name}: {json.dumps({k: v for k, v in s.items() if not isinstance(v, dict)})}", flush=True)
    return s


def large_volume_run(checkpoint: Path, work: Path) -> dict:
    """One 512×512×300 phantom case through the batch runner in a fresh process: seconds and peak RSS."""
    data = work / "large"
    if not (data / "imagesTr").is_dir():
        from segreport import phantom

        phantom.generate_dataset(data, n_cases=1, seed=7, shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0), export_2d=False)
    # the peak is this process's own VmHWM: ru_maxrss survives fork + exec, so it would report the
    # parent's size at the fork (measured: 4.68 GB right after this process generated the 512³ phantom,
    # 3.63 GB in a fresh run of the same code)
    code = ("import json, time; from segreport import models; "
            "peak_gb = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 2**20; "
            "from segreport.run.batch import run_batch; p = models.load(%r, device='cpu', kind='lesion_report_3d'); "
            "t = time.perf_counter(); s = run_batch(p, %r, %r, overwrite=True, device='cpu'); s.raise_if_failed(); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'predict_s': s.cases[0]['predict_s'], "
            "'lesions': s.cases[0]['n_lesions'], 'peak_rss_gb': peak_gb()}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # this checkout's segreport
    res = subprocess.run([sys.executable, "-c", code % (str(checkpoint), str(data / "imagesTr"), str(work / "large_out"))],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


TEST_SEED_OFFSET = 2000  # each training seed's detection phantom: another unseen seed


def run_seed(seed: int, a, models_dir: Path, work_root: Path) -> dict:
    """The quality bench's models of ``seed`` (trained first when missing) over a phantom of seed + 2000."""
    from segreport import phantom

    checkpoints = {name: models_dir / f"seed{seed}" / folder / "models" / "model.pt" for name, folder in (("full", a.run), ("unet", "unet"))}
    missing = [n for n, c in checkpoints.items() if not c.is_file()]
    if missing and a.run != "full":
        raise SystemExit(f"no trained model at {checkpoints['full']}: train the variant with the quality bench's --set first")
    if missing:
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_lesion_report_quality.py"), "--quick", "--seeds",
                        str(seed), "--only", *missing, "--work-dir", str(models_dir)], check=True)
    work = work_root / f"seed{seed}"
    data = work_root / f"phantom_{a.cases}_{seed + TEST_SEED_OFFSET}"
    if not (data / "dataset.json").is_file():
        phantom.generate_dataset(data, n_cases=a.cases, seed=seed + TEST_SEED_OFFSET, export_2d=False, split_ratios=(0, 0, 1))
    dataset = json.loads((data / "dataset.json").read_text())
    truth_attrs = {c["case_id"]: {les["id"]: les for les in c["attributes"]} for c in dataset["training"]}
    results = {}
    for name, ckpt in checkpoints.items():
        out = work / f"{name}_out"
        results[name] = score_model(f"seed {seed} {name}", run_model(ckpt, data / "imagesTr", out, a.overlap, a.outline_min_ml),
                                    out, data, truth_attrs)
    results["models"] = {k: str(v) for k, v in checkpoints.items()}
    results["test_seed"] = seed + TEST_SEED_OFFSET
    return results


def main(argv: list[str] | None = None) -> int:
    from segreport.inference.automatic import SearchSettings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=16, help="test cases per seed (about 4 lesions of 1 mL or more each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="the quality bench's seeds whose models run; each on a phantom of seed + 2000")
    p.add_argument("--models-dir", default="outputs/bench_lesion_report", help="the quality bench's --work-dir")
    p.add_argument("--run", default="full", help="the default model's folder in each seed's runs (a --set variant: full_KEY-VALUE)")
    p.add_argument("--work-dir", default="outputs/bench_lesion_detection")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--overlap", type=float, default=SearchSettings.overlap, help="of the sliding windows (default: the bundle's)")
    p.add_argument("--outline-min-ml", type=float, default=SearchSettings.outline_min_ml,
                   help="candidates under this keep the windows' outline (default: the bundle's)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lesion_detection.json"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as the quality bench: comparable on a shared 2-core machine
    models_dir, work = Path(a.models_dir).resolve(), Path(a.work_dir).resolve()
    per_seed = {seed: run_seed(seed, a, models_dir, work) for seed in a.seeds}
    large = None if a.skip_large else large_volume_run(Path(per_seed[a.seeds[0]]["models"]["full"]), work)

    def over(model, key):
        return mean_std([per_seed[s][model][key] for s in a.seeds])

    kinds = sorted({k for s in a.seeds for k in per_seed[s]["full"]["recall_by_kind"]})
    summary = {
        "seeds": a.seeds, "lesions_1ml": [per_seed[s]["full"]["lesions_1ml"] for s in a.seeds],
        **{f"full_{k}": over("full", k) for k in ("recall", "precision", "recall_without_solid_nodules", "case_dice",
                                                  "attribute_accuracy_average", "seconds_per_volume")},
        "unet_case_dice": over("unet", "case_dice"),
        "full_recall_by_kind": {k: mean_std([per_seed[s]["full"]["recall_by_kind"].get(k, {}).get("recall") for s in a.seeds]) for k in kinds},
        "lesions_by_kind": {k: [per_seed[s]["full"]["recall_by_kind"].get(k, {}).get("lesions", 0) for s in a.seeds] for k in kinds},
    }
    mean = lambda key: (summary[key] or {}).get("mean", 0.0)  # noqa: E731
    report = {
        "benchmark": "lesion_detection",
        "command": "python benchmarks/bench_lesion_detection.py" + (" --skip-large" if a.skip_large else "")
                   + f" --seeds {' '.join(map(str, a.seeds))}" + ("" if a.cases == 16 else f" --cases {a.cases}")
                   + ("" if str(models_dir).endswith("outputs/bench_lesion_report") else f" --models-dir {a.models_dir}")
                   + ("" if a.run == "full" else f" --run {a.run}")
                   + ("" if a.overlap == SearchSettings.overlap else f" --overlap {a.overlap}")
                   + ("" if a.outline_min_ml == SearchSettings.outline_min_ml else f" --outline-min-ml {a.outline_min_ml}"),
        "settings": {"test_cases": a.cases, "test_seed_offset": TEST_SEED_OFFSET, "phantom_shape": [192, 192, 48], "phantom_spacing_mm": [1.6, 1.6, 5.0],
                     "min_lesion_ml": MIN_ML, "hit_iou": MIN_IOU, "overlap": a.overlap, "outline_min_ml": a.outline_min_ml},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
        "summary": summary,
        "per_seed": per_seed,
        "large_volume_512x512x300": large,
        "checks": {  # the targets, on the mean over seeds
            "recall_at_least_0.85": mean("full_recall") >= 0.85,
            "precision_at_least_0.85": mean("full_precision") >= 0.85,
            "recall_without_solid_nodules_at_least_0.85": mean("full_recall_without_solid_nodules") >= 0.85,
            "full_case_dice_vs_unet": round(mean("full_case_dice") - mean("unet_case_dice"), 4),
            "peak_memory_at_most_4gb": None if large is None else large["peak_rss_gb"] <= 4.0,
        },
    }
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": summary, "checks": report["checks"]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
