"""Quality of the interactive 3D lesion-report model against its baselines, same data and training budget.

Trains, through the bundle's own configs (``monai.bundle.run``), on one synthetic chest-CT phantom:

* the full model (``train.yaml``, the bundle's default: residual U-Net backbone, point refinement +
  feature synergy, lesion-pooled attributes, simulated clicks),
* the paper's model as published (``variant_vit.yaml``: ViT backbone, token-only attribute head),
* the MONAI 3D U-Net seg-only baseline (``train_unet_baseline.yaml``),
* the 3D CNN attribute baseline (``train_cnn_attr_baseline.yaml``),

each for the same epochs, batch size and cases, then evaluates them on the same test split
(``evaluate.yaml``) and reports, measured in this one run:

* Dice of the full model after 0..10 simulated clicks (does it rise with clicks?), NoC@80/85/90,
* Dice of the full model at 1 click vs the U-Net (no clicks), inside the ROI and on the original grid
  (where lesions larger than the ROI cost both alike),
* attribute accuracy (per group, average) of the full model vs the CNN,
* original-grid Dice of the lesions larger than the ROI at one click: one ROI vs ROI growth,
* wall-clock training time of each on this CPU.

Writes ``benchmarks/results/lesion_report_quality.json``. Numbers are reported as they come out; the
``checks`` say which of the issue's expectations held in this run.

    python benchmarks/bench_lesion_report_quality.py --quick     # 40 cases x 30 epochs: ~11 min on 1 CPU thread
    python benchmarks/bench_lesion_report_quality.py             # 60 cases x 60 epochs
    python benchmarks/bench_lesion_report_quality.py --quick --set lesion_pooling=false  # a full-model variant
    python benchmarks/bench_lesion_report_quality.py --quick --ablation  # + Tables 2-3's ablation variants
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

from common import REPO
CONFIGS = REPO / "bundles" / "lesion_report_3d" / "configs"
MODELS = {  # name -> overlays on train.yaml
    "full": [],
    "vit": ["variant_vit.yaml"],
    "unet": ["train_unet_baseline.yaml"],
    "cnn_attr": ["train_cnn_attr_baseline.yaml"],
}
ABLATION = {  # --ablation: Tables 2-3's other variants (row name -> overlay); "full" is the run above
    "vanilla": "ablation_vanilla.yaml",
    "+point refinement": "ablation_refinement.yaml",
    "+feature synergy": "ablation_synergy.yaml",
}


def _configs(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in ("train.yaml", *names)]


def majority_class_reference(per_case_csv: Path) -> dict:
    """Attribute accuracy of always answering each group's most frequent TEST class (an optimistic
    reference: a real majority predictor would have to guess it from the training split)."""
    import csv
    from collections import Counter

    rows = list(csv.DictReader(open(per_case_csv)))
    acc = {}
    for group in ("shape", "invasion", "density", "heterogeneity", "surface"):
        truth = [r[f"{group}_true"] for r in rows if r.get(f"{group}_true")]
        if truth:
            acc[group] = Counter(truth).most_common(1)[0][1] / len(truth)
    return {"per_group": acc, "average": sum(acc.values()) / len(acc) if acc else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller phantom and budget: about 11 minutes on one CPU thread")
    p.add_argument("--cases", type=int, default=None, help="phantom cases (default 60, quick 40)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs for every model (default 60, quick 30)")
    p.add_argument("--lesions", default="all", choices=("all", "largest"),
                   help="targets: every lesion (default; ~4x more, more varied attribute targets) or each scan's largest")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-clicks", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ablation", action="store_true",
                   help="also train the vanilla / +refinement / +synergy variants and write the ablation table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train.yaml override for the full model only (VALUE is JSON), e.g. lesion_pooling=false")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a run folder's trained model and recorded training time (re-evaluate only)")
    p.add_argument("--only", nargs="+", choices=sorted({*MODELS, *ABLATION}), default=None,
                   help="train and evaluate only these runs, no summary (e.g. two processes on two cores; then --reuse)")
    p.add_argument("--work-dir", default="outputs/bench_lesion_report")
    p.add_argument("--out", default=None, help="default benchmarks/results/lesion_report_quality[_largest].json")
    a = p.parse_args(argv)
    full_overrides = {}
    for kv in a.set:
        key, sep, value = kv.partition("=")
        if not sep:
            p.error(f"--set wants KEY=VALUE, got {kv!r}")
        full_overrides[key] = json.loads(value)
    cases = a.cases or (40 if a.quick else 60)
    epochs = a.epochs or (30 if a.quick else 60)

    import torch
    from monai.bundle import run

    from segreport import phantom

    # one thread: on a shared 2-core machine two threads contending with other work were several times slower
    torch.set_num_threads(1)
    work = Path(a.work_dir).resolve()
    data = work / f"phantom_{cases}_{a.seed}"
    # a full chest on a coarse grid (2.4 x 2.4 x 7.5 mm) keeps generation and resampling quick on a CPU;
    # the model sees it at 2.4 x 2.4 x 5 mm, so the 32³ ROI spans 77 x 77 x 160 mm
    spacing = [2.4, 2.4, 5.0]
    t = time.perf_counter()
    if not (data / "dataset.json").is_file():
        phantom.generate_dataset(data, n_cases=cases, seed=a.seed, shape=(128, 128, 32), spacing=(2.4, 2.4, 7.5), export_2d=False)
    print(f"phantom: {cases} cases in {data} ({time.perf_counter() - t:.0f} s)", flush=True)

    results: dict = {}
    runs = dict(MODELS)
    if a.ablation:
        runs.update({name: [overlay] for name, overlay in ABLATION.items()})
    run_dirs = {name: work / (overlays[0].removesuffix(".yaml") if name in ABLATION else name) for name, overlays in runs.items()}
    if full_overrides:  # a variant of the full model must not overwrite the default's outputs
        # only [\w.=-] in the folder name: MONAI reads "#" in a config value as an id separator
        # (``--set network_def#unet_blocks=...`` had trained into ".../full_network_def::unet_blocks-...")
        name = "_".join(f"{k}-{v}" for k, v in full_overrides.items())
        run_dirs["full"] = work / ("full_" + re.sub(r"[^\w.=-]+", "_", name))
    if a.only:
        runs = {name: runs.get(name, [ABLATION.get(name)]) for name in a.only}
    for name, overlays in runs.items():
        out = run_dirs[name]
        common = dict(bundle_root=str(CONFIGS.parent), output_dir=str(out), ckpt_dir=str(out / "models"), dataset_dir=str(data), spacing=spacing,
                      batch_size=a.batch_size, seed=a.seed, target_lesions=a.lesions)
        t = time.perf_counter()
        if name == "full":
            common.update(full_overrides)
        timing = out / "train_seconds.json"
        if a.reuse and timing.is_file() and (out / "models" / "model.pt").is_file():
            train_s = json.loads(timing.read_text())["train_seconds"]
        else:
            run("training", config_file=_configs(*overlays), epochs=epochs, **common)
            train_s = time.perf_counter() - t
            timing.write_text(json.dumps({"train_seconds": round(train_s, 1), "epochs": epochs}))
        run("evaluating", config_file=_configs("evaluate.yaml", *overlays), max_clicks=a.max_clicks, eval_splits=["test"], **common)
        metrics = json.loads((out / "eval" / "metrics.json").read_text())["test"]
        results[name] = {"train_seconds": round(train_s, 1), "test": metrics}
        print(f"{name}: trained in {train_s:.0f} s; test {json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)})}", flush=True)
    if a.only:
        return 0

    full, vit, unet, cnn = (results[k]["test"] for k in ("full", "vit", "unet", "cnn_attr"))
    curve = full["dice_per_click"]
    summary = {
        "full_dice_roi_by_clicks": {str(k): curve[k] for k in range(len(curve))},
        "vit_dice_roi_by_clicks": {str(k): v for k, v in enumerate(vit["dice_per_click"])},
        "full_noc": {t: full[f"noc_{t}"] for t in (80, 85, 90)},
        "vit_noc": {t: vit[f"noc_{t}"] for t in (80, 85, 90)},
        "full_reached": {t: full[f"reached_{t}"] for t in (80, 85, 90)},
        "full_dice_roi_1_click": full["dice_roi"],
        "vit_dice_roi_1_click": vit["dice_roi"],
        "unet_dice_roi": unet["dice_roi"],
        "full_dice_1_click_original_grid": full["dice"],
        "unet_dice_original_grid": unet["dice"],
        "full_hd95_mm_1_click": full["hd95_mm"],
        "unet_hd95_mm": unet["hd95_mm"],
        "full_attribute_accuracy": full["attribute_accuracy"],
        "cnn_attribute_accuracy": cnn["attribute_accuracy"],
        "full_attribute_accuracy_average": full["attribute_accuracy_average"],
        "vit_attribute_accuracy_average": vit["attribute_accuracy_average"],
        "cnn_attribute_accuracy_average": cnn["attribute_accuracy_average"],
        "majority_class_attribute_accuracy": majority_class_reference(run_dirs["full"] / "eval" / "per_case.csv"),
        # lesions larger than the ROI, one click through the prompt session: one ROI vs ROI growth (evaluate.yaml)
        **{f"{kind}_lesions": {"n": full.get(f"{kind}_lesions", 0), "rois_grown": full.get(f"rois_{kind}_grown"),
                               **{f"dice_{k}": full.get(f"dice_{kind}_{k}") for k in ("perfect_roi", "one_roi", "grown")}}
           for kind in ("cut", "whole")},
        "train_seconds": {k: v["train_seconds"] for k, v in results.items()},
        "train_time_ratio_full_vs_unet": round(results["full"]["train_seconds"] / results["unet"]["train_seconds"], 2),
    }
    last = min(5, len(curve) - 1)
    majority = summary["majority_class_attribute_accuracy"]["average"]
    checks = {  # the targets
        "dice_rises_by_0.10_from_1_to_5_clicks": curve[last] - curve[1] >= 0.10,
        "full_beats_unet_by_0.03_at_1_click": full["dice_roi"] - unet["dice_roi"] >= 0.03,
        "attributes_at_least_0.85": full["attribute_accuracy_average"] >= 0.85,
        "attributes_beat_cnn_and_majority": full["attribute_accuracy_average"] > max(cnn["attribute_accuracy_average"], majority),
    }
    ablation = None
    if a.ablation:
        from segreport.training.lesion_report_eval import write_ablation_table

        ablation = write_ablation_table({n: run_dirs[n] / "eval" for n in (*ABLATION, "full")}, work / "ablation")
    report = {
        "benchmark": "lesion_report_quality",
        "command": "python benchmarks/bench_lesion_report_quality.py" + (" --quick" if a.quick else "")
                   + ("" if a.cases is None else f" --cases {a.cases}") + ("" if a.epochs is None else f" --epochs {a.epochs}")
                   + ("" if a.lesions == "all" else f" --lesions {a.lesions}") + ("" if a.seed == 1 else f" --seed {a.seed}")
                   + (" --ablation" if a.ablation else "")
                   + "".join(f" --set {kv}" for kv in a.set),
        "settings": {"cases": cases, "epochs": epochs, "batch_size": a.batch_size, "max_clicks": a.max_clicks,
                     "seed": a.seed, "target_lesions": a.lesions, "full_model_overrides": full_overrides, "phantom_shape": [128, 128, 32], "phantom_spacing_mm": [2.4, 2.4, 7.5],
                     "model_spacing_mm": spacing, "roi": 32, "model_config": "tiny",
                     "test_lesions": full["n_items"], "test_cases": full["n_cases"]},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "summary": summary,
        "checks": checks,
        "ablation": ablation,
        "results": results,
    }
    out_path = Path(a.out or REPO / "benchmarks" / "results" / f"lesion_report_quality{'' if a.lesions == 'all' else '_' + a.lesions}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out_path)
    print(json.dumps({"summary": summary, "checks": checks}, indent=2, default=float))
    print(f"written: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
