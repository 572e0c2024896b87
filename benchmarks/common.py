"""What the benchmarks share: the repository's paths, a record of the machine, result files, and the
"train a bundle variant, evaluate it on its test split" loop of the 2D quality benchmarks.

Run as ``python benchmarks/<name>.py``, this folder is on ``sys.path``, so a benchmark imports ``common``
first, and this module puts this checkout ahead of the venv's ``segreport`` (the venv is shared between
checkouts and its editable install points at whichever ran ``make`` last): the one place that does.
Investigations that are not benchmarks live in ``studies/`` and run as modules from the repository root
(``python -m benchmarks.studies.<name>``).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """Where a number was measured: platform, CPU count, torch and its thread count."""
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def mean_std(values) -> dict | None:
    """Mean and standard deviation over seeds (None values left out), with each seed's value; None if none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {"mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4), "by_seed": [round(float(x), 4) for x in v]} if v.size else None


def write_results(stem: str, summary: dict, tag: str = "") -> Path:
    """benchmarks/results/<stem>[_<tag>].json, and the summary without the per-run details on stdout."""
    dest = RESULTS / f"{stem}{'_' + tag if tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return dest


def train_and_evaluate(name: str, seed: int, data: str, out: Path, a, configs: Path, variants: dict, text_guided) -> dict:
    """Train one variant (``variants[name]``: overlay files, overrides) of a 2D bundle with its own configs,
    evaluate it on the test split (and, for a text-guided model, run the text-control check); the result
    is cached in its work folder, so an interrupted benchmark resumes."""
    from monai.bundle import run

    from segreport.training.evaluation import test_volumes
    from segreport.training.text_guided import text_control

    overlay, overrides = variants[name]
    files = [str(configs / "train.yaml")] + [str(configs / f) for f in overlay]
    work = out / f"{name}_seed{seed}_e{a.epochs}_s{a.image_size}"
    done = work / "bench_result.json"
    if done.is_file():
        return json.loads(done.read_text())
    common = dict(bundle_root=str(configs.parent), output_dir=str(work), ckpt_dir=str(work / "models"), dataset_dir=data,
                  image_size=a.image_size, seed=seed, split_seed=a.data_seed, num_threads=a.threads, **overrides)
    t = time.perf_counter()
    run("training", config_file=files, epochs=a.epochs, val_interval=1, **common)
    train_s = time.perf_counter() - t
    run("evaluating", config_file=files + [str(configs / "evaluate.yaml")], **common)
    metrics = json.loads((work / "eval" / "metrics.json").read_text())["test"]
    with open(work / "eval" / "per_case.csv", newline="") as f:
        per_case = {r["case_id"]: r for r in csv.DictReader(f)}
    result = {"train_seconds": round(train_s, 1), "dice": metrics["dice_case_mean"], "miou": metrics["miou_case_mean"],
              "per_case_dice": {k: float(r["dice"]) for k, r in per_case.items()}}
    for extra in ("zones.json", "../parameters.json"):  # LAPFT: GPFC zone accuracy, parameter counts
        path = work / "eval" / extra
        if path.is_file():
            result[Path(extra).stem] = json.loads(path.read_text())
    if name in text_guided:
        control = text_control(work / "models" / "model.pt", test_volumes(data))
        result["text_control"] = {k: v for k, v in control.items() if k != "cases"}
    done.write_text(json.dumps(result))
    return result


def table_row(name: str, runs: dict[str, list[dict]]) -> dict:
    """One model's row over its seeds: Dice, mIoU, training time (mean ± std), text control, and a paired
    t-test of its per-case Dice (averaged over seeds) against the U-Net's, when both have the same seeds."""
    from segreport.metrics.stats import mean_std, paired_t_test

    def case_means(model):  # per-case Dice averaged over seeds, in one case order
        cases = sorted(runs[model][0]["per_case_dice"])
        return cases, [float(np.mean([r["per_case_dice"][c] for r in runs[model]])) for c in cases]

    rs = runs[name]
    row = {"dice": mean_std([r["dice"] for r in rs]), "miou": mean_std([r["miou"] for r in rs]),
           "train_seconds": mean_std([r["train_seconds"] for r in rs])}
    if "text_control" in rs[0]:
        row["text_control_share_ratio"] = mean_std([r["text_control"]["share_ratio"] for r in rs])
        row["text_control_left_out_share_one_lung"] = mean_std([r["text_control"]["left_out_share_one_lung_text"] for r in rs])
    if "unet" in runs and name != "unet" and len(rs) == len(runs["unet"]):
        cases, mine = case_means(name)
        base_cases, base = case_means("unet")
        assert cases == base_cases
        try:
            row["paired_t_vs_unet"] = paired_t_test(mine, base)
        except ValueError as err:  # fewer than two test cases
            row["paired_t_vs_unet"] = str(err)
    return row


def prepare(a) -> tuple[str, Path]:
    """The 2D quality benches' --quick setting, logging, torch threads, and their phantom (generated once):
    ``(dataset folder, work folder)``."""
    import logging

    import torch

    from segreport.phantom import DATASET_MARKERS, ensure_dataset

    if a.quick:
        a.cases, a.epochs = 32, 8
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(a.threads)
    out = Path(a.out) / f"data{a.data_seed}_cases{a.cases}"
    return ensure_dataset(out / "phantom", DATASET_MARKERS, n_cases=a.cases, seed=a.data_seed), out
