"""Quality of the interactive 3D lesion-report model against its baselines, same data and training budget,
over several data seeds, each judged on a phantom of an unseen seed.

For each ``--seeds`` value S: a phantom of seed S (its lesion plan gives every attribute class in every
split; 80/20 training/validation) trains, through the bundle's own configs (``monai.bundle.run``):

* the full model (``train.yaml``, the bundle's default: residual U-Net backbone, point refinement +
  feature synergy, lesion-pooled attributes, simulated clicks),
* the paper's model as published (``variant_vit.yaml``: ViT backbone, token-only attribute head),
* the MONAI 3D U-Net seg-only baseline (``train_unet_baseline.yaml``),
* the 3D CNN attribute baseline (``train_cnn_attr_baseline.yaml``),

each for the same epochs, batch size and cases; then each is evaluated (``evaluate.yaml``) on every lesion
of a test phantom of seed S + 1000 (``--test-cases``, 24 by default: 60 or more lesions). Reported as mean ±
std over the seeds (a target counts on the mean):

* Dice of the full model after 0..10 simulated clicks (does it rise with clicks?), NoC@80/85/90,
* Dice of the full model at 1 click vs the U-Net (no clicks), inside the ROI and on the original grid,
* attribute accuracy (per group, average) of the full model vs the CNN and the test set's majority class,
* per seed, each attribute class's recall and the accuracy and Dice by lesion type and size (printed),
* wall-clock training time of each on this CPU.

Writes ``benchmarks/results/lesion_report_quality.json``; the ``checks`` say which of the issue's targets
held. Models and evaluations are cached per seed in the work folder: two processes (one per core) can
each run some seeds, then ``--reuse`` with all seeds gathers them.

    python benchmarks/bench_lesion_report_quality.py --quick                 # 40 cases x 30 epochs, seeds 1 2 3
    python benchmarks/bench_lesion_report_quality.py --quick --seeds 1 --only full unet cnn_attr  # one core's share
    python benchmarks/bench_lesion_report_quality.py --quick --set lesion_pooling=false  # a full-model variant
    python benchmarks/bench_lesion_report_quality.py --quick --ablation     # + Tables 2-3's ablation variants
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

from common import REPO, mean_std

import numpy as np
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


SIZE_ML = (1.0, 5.0)  # lesion size bins of the breakdown: < 1 mL, 1-5 mL, >= 5 mL
TEST_SEED_OFFSET = 1000  # each training seed's test phantom: an unseen data seed
PHANTOM = dict(shape=(128, 128, 32), spacing=(2.4, 2.4, 7.5), export_2d=False)


def size_bin(ml: float) -> str:
    lo, hi = SIZE_ML
    return f"<{lo:g} mL" if ml < lo else (f"{lo:g}-{hi:g} mL" if ml < hi else f">={hi:g} mL")


def breakdown(per_case_csv: Path, voxel_ml: float) -> dict:
    """Per attribute class: recall (lesions of that true class answered with it); per lesion type and size
    bin: lesions, attribute accuracy (all groups) and Dice in the ROI at one click."""
    import csv

    rows = list(csv.DictReader(open(per_case_csv)))
    recall = {}
    for group in ("shape", "invasion", "density", "heterogeneity", "surface"):
        truth = {r[f"{group}_true"] for r in rows if r.get(f"{group}_true")}
        recall[group] = {c: _mean([r[f"{group}_pred"] == c for r in rows if r.get(f"{group}_true") == c]) | {"n": sum(r.get(f"{group}_true") == c for r in rows)}
                         for c in sorted(truth)}
    by = {}
    for key, value_of in (("lesion_type", lambda r: r["lesion_type"] or "unknown"),
                          ("size", lambda r: size_bin(int(r["lesion_voxels"]) * voxel_ml))):
        groups: dict = {}
        for r in rows:
            groups.setdefault(value_of(r), []).append(r)
        by[key] = {k: {"n": len(rs),
                       "attribute_accuracy": _mean([r[f"{g}_pred"] == r[f"{g}_true"] for r in rs
                                                    for g in ("shape", "invasion", "density", "heterogeneity", "surface") if r.get(f"{g}_true")])["value"],
                       "dice_roi": _mean([float(r["dice_roi"]) for r in rs if r.get("dice_roi")])["value"]}
                   for k, rs in sorted(groups.items())}
    return {"class_recall": recall, **{f"by_{k}": v for k, v in by.items()}}


def _mean(values) -> dict:
    values = list(values)
    return {"value": round(float(sum(values)) / len(values), 4) if values else None}


def run_seed(seed: int, a, cases: int, epochs: int, runs: dict, full_overrides: dict, work_root: Path) -> dict:
    """Train each run on phantom ``seed``'s training/validation cases, evaluate on the unseen test phantom
    (seed + :data:`TEST_SEED_OFFSET`); models and evaluations are cached in the work folder (``--reuse``)."""
    from monai.bundle import run

    from segreport import phantom

    work = work_root / f"seed{seed}"
    data = work_root / f"phantom_{cases}_{seed}"
    test_data = work_root / f"phantom_test_{a.test_cases}_{seed + TEST_SEED_OFFSET}"
    # a full chest on a coarse grid (2.4 x 2.4 x 7.5 mm) keeps generation and resampling quick on a CPU;
    # the model sees it at 2.4 x 2.4 x 5 mm, so the 32³ ROI spans 77 x 77 x 160 mm
    spacing = [2.4, 2.4, 5.0]
    for folder, n, s, ratios in ((data, cases, seed, (0.8, 0.2, 0.0)), (test_data, a.test_cases, seed + TEST_SEED_OFFSET, (0.0, 0.0, 1.0))):
        if not (folder / "dataset.json").is_file():
            phantom.generate_dataset(folder, n_cases=n, seed=s, split_ratios=ratios, **PHANTOM)
    run_dirs = {name: work / (overlays[0].removesuffix(".yaml") if name in ABLATION else name) for name, overlays in runs.items()}
    if full_overrides:  # a variant of the full model must not overwrite the default's outputs
        # only [\w.=-] in the folder name: MONAI reads "#" in a config value as an id separator
        name = "_".join(f"{k}-{v}" for k, v in full_overrides.items())
        run_dirs["full"] = work / ("full_" + re.sub(r"[^\w.=-]+", "_", name))
    voxel_ml = float(np.prod(PHANTOM["spacing"])) / 1000.0
    results = {}
    for name, overlays in runs.items():
        out = run_dirs[name]
        common = dict(bundle_root=str(CONFIGS.parent), output_dir=str(out), ckpt_dir=str(out / "models"), spacing=spacing,
                      batch_size=a.batch_size, seed=seed, target_lesions=a.lesions)
        if name == "full":
            common.update(full_overrides)
        timing = out / "train_seconds.json"
        if a.reuse and timing.is_file() and (out / "models" / "model.pt").is_file():
            train_s = json.loads(timing.read_text())["train_seconds"]
        else:
            t = time.perf_counter()
            run("training", config_file=_configs(*overlays), epochs=epochs, dataset_dir=str(data), **common)
            train_s = time.perf_counter() - t
            timing.write_text(json.dumps({"train_seconds": round(train_s, 1), "epochs": epochs}))
            (out / "eval" / "metrics.json").unlink(missing_ok=True)
        if not (a.reuse and (out / "eval" / "metrics.json").is_file()):
            run("evaluating", config_file=_configs("evaluate.yaml", *overlays), max_clicks=a.max_clicks, eval_splits=["test"],
                dataset_dir=str(test_data), **common)
        metrics = json.loads((out / "eval" / "metrics.json").read_text())["test"]
        results[name] = {"train_seconds": round(train_s, 1), "test": metrics,
                         "breakdown": breakdown(out / "eval" / "per_case.csv", voxel_ml)}
        print(f"seed {seed} {name}: trained in {train_s:.0f} s; test {json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)})}", flush=True)
    if "full" in results:
        results["majority_class"] = majority_class_reference(run_dirs["full"] / "eval" / "per_case.csv")
    results["data"] = {"training": str(data), "test": str(test_data),
                       "test_lesion_counts": json.loads((test_data / "dataset.json").read_text())["lesion_counts"]["measured"]["test"]}
    return results


def summarise(per_seed: dict) -> tuple[dict, dict]:
    """Mean ± std over seeds of each headline number, and the issue's targets judged on the means."""
    seeds = list(per_seed)

    def over(model: str, key, fn=None):
        vals = [(fn or (lambda m: m[key]))(per_seed[s][model]["test"]) for s in seeds if model in per_seed[s]]
        return mean_std(vals) if vals else None

    summary = {
        "seeds": seeds,
        "test_lesions": [per_seed[s]["full"]["test"]["n_items"] for s in seeds if "full" in per_seed[s]],
        "full_dice_roi_by_clicks": {str(k): over("full", None, lambda m, k=k: m["dice_per_click"][k])
                                    for k in range(len(per_seed[seeds[0]]["full"]["test"]["dice_per_click"]))},
        "full_dice_roi_1_click": over("full", "dice_roi"),
        "vit_dice_roi_1_click": over("vit", "dice_roi"),
        "unet_dice_roi": over("unet", "dice_roi"),
        "full_dice_1_click_original_grid": over("full", "dice"),
        "unet_dice_original_grid": over("unet", "dice"),
        "full_attribute_accuracy_average": over("full", "attribute_accuracy_average"),
        "vit_attribute_accuracy_average": over("vit", "attribute_accuracy_average"),
        "cnn_attribute_accuracy_average": over("cnn_attr", "attribute_accuracy_average"),
        "majority_class_attribute_accuracy": mean_std([per_seed[s]["majority_class"]["average"] for s in seeds]),
        "full_attribute_accuracy": {g: mean_std([per_seed[s]["full"]["test"]["attribute_accuracy"][g] for s in seeds])
                                    for g in per_seed[seeds[0]]["full"]["test"]["attribute_accuracy"]},
        "train_seconds": {m: mean_std([per_seed[s][m]["train_seconds"] for s in seeds])
                          for m in per_seed[seeds[0]] if isinstance(per_seed[seeds[0]][m], dict) and "train_seconds" in per_seed[seeds[0]][m]},
    }
    curve = summary["full_dice_roi_by_clicks"]
    last = str(min(5, len(curve) - 1))
    mean = lambda key: (summary[key] or {}).get("mean", float("nan"))  # noqa: E731
    checks = {  # the targets, on the mean over seeds
        "dice_rises_by_0.10_from_1_to_5_clicks": curve[last]["mean"] - curve["1"]["mean"] >= 0.10,
        "full_beats_unet_by_0.03_at_1_click": mean("full_dice_roi_1_click") - mean("unet_dice_roi") >= 0.03,
        "attributes_at_least_0.85": mean("full_attribute_accuracy_average") >= 0.85,
        "attributes_beat_cnn_and_majority": mean("full_attribute_accuracy_average") > max(mean("cnn_attribute_accuracy_average"),
                                                                                           mean("majority_class_attribute_accuracy")),
        "at_least_60_test_lesions_per_seed": min(summary["test_lesions"]) >= 60,
    }
    return summary, checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller phantom and budget (40 training cases, 30 epochs)")
    p.add_argument("--cases", type=int, default=None, help="training phantom cases (default 60, quick 40)")
    p.add_argument("--test-cases", type=int, default=24, help="cases of each seed's unseen test phantom (about 3.5 lesions each)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs for every model (default 60, quick 30)")
    p.add_argument("--lesions", default="all", choices=("all", "largest"),
                   help="targets: every lesion (default; ~4x more, more varied attribute targets) or each scan's largest")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-clicks", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="data and training seeds (test phantoms: seed + 1000)")
    p.add_argument("--ablation", action="store_true",
                   help="also train the vanilla / +refinement / +synergy variants and write the ablation table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="train.yaml override for the full model only (VALUE is JSON), e.g. lesion_pooling=false")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a run folder's trained model, training time and evaluation")
    p.add_argument("--only", nargs="+", choices=sorted({*MODELS, *ABLATION}), default=None,
                   help="train and evaluate only these runs (a summary needs 'full'; the others' rows are left out)")
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

    # one thread: on a shared 2-core machine two threads contending with other work were several times slower
    torch.set_num_threads(1)
    work = Path(a.work_dir).resolve()
    runs = dict(MODELS)
    if a.ablation:
        runs.update({name: [overlay] for name, overlay in ABLATION.items()})
    if a.only:
        runs = {name: runs.get(name, [ABLATION.get(name)]) for name in a.only}
    per_seed = {seed: run_seed(seed, a, cases, epochs, runs, full_overrides, work) for seed in a.seeds}
    if "full" not in runs:
        return 0
    summary, checks = summarise(per_seed)
    ablation = None
    if a.ablation:
        from segreport.training.lesion_report_eval import write_ablation_table

        ablation = {seed: write_ablation_table({n: work / f"seed{seed}" / ABLATION.get(n, n).removesuffix(".yaml") for n in (*ABLATION, "full")},
                                               work / f"seed{seed}" / "ablation") for seed in a.seeds}
    report = {
        "benchmark": "lesion_report_quality",
        "command": "python benchmarks/bench_lesion_report_quality.py" + (" --quick" if a.quick else "")
                   + (f" --only {' '.join(a.only)}" if a.only else "")
                   + ("" if a.cases is None else f" --cases {a.cases}") + ("" if a.epochs is None else f" --epochs {a.epochs}")
                   + ("" if a.test_cases == 24 else f" --test-cases {a.test_cases}")
                   + ("" if a.lesions == "all" else f" --lesions {a.lesions}") + f" --seeds {' '.join(map(str, a.seeds))}"
                   + (" --ablation" if a.ablation else "") + "".join(f" --set {kv}" for kv in a.set),
        "settings": {"cases": cases, "test_cases": a.test_cases, "epochs": epochs, "batch_size": a.batch_size, "max_clicks": a.max_clicks,
                     "seeds": a.seeds, "test_seed_offset": TEST_SEED_OFFSET, "target_lesions": a.lesions, "full_model_overrides": full_overrides,
                     "phantom": {k: list(v) if isinstance(v, tuple) else v for k, v in PHANTOM.items()},
                     "model_spacing_mm": [2.4, 2.4, 5.0], "roi": 32, "model_config": "tiny", "size_bins_ml": list(SIZE_ML)},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "summary": summary,
        "checks": checks,
        "ablation": ablation,
        "per_seed": per_seed,
    }
    out_path = Path(a.out or REPO / "benchmarks" / "results" / f"lesion_report_quality{'' if a.lesions == 'all' else '_' + a.lesions}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, out_path)
    print(json.dumps({"summary": summary, "checks": checks}, indent=2, default=float))
    print_breakdown(per_seed)
    print(f"written: {out_path}")
    return 0


def print_breakdown(per_seed: dict) -> None:
    """Each class's recall and the accuracy by lesion type and size, per seed, for the full model."""
    for seed, res in per_seed.items():
        b = res.get("full", {}).get("breakdown")
        if not b:
            continue
        print(f"seed {seed}: class recall (n)")
        for group, classes in b["class_recall"].items():
            print(f"  {group:14s} " + "  ".join(f"{c}: {v['value']} ({v['n']})" for c, v in classes.items()))
        for key in ("by_lesion_type", "by_size"):
            print(f"  {key}: " + "  ".join(f"{k}: n={v['n']} attr={v['attribute_accuracy']} dice={v['dice_roi']}" for k, v in b[key].items()))


if __name__ == "__main__":
    sys.exit(main())
