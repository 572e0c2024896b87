"""MedSegText: joint model vs the seg-only and text-only baselines after equal training budgets.

All three are trained with the bundle's own configs (train.yaml + the baseline overlays) on the same
synthetic phantom, same epochs, image size and seed, and evaluated on the same held-out test split
(cases never seen in training). Targets (issue 3): joint Dice within 0.02 of seg-only and joint BLEU-4
at least 0.9x text-only, i.e. no collapse of either task. Writes benchmarks/results/medsegtext_quality.json.

    python benchmarks/bench_medsegtext_quality.py [--epochs 15] [--cases 24] [--image-size 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from common import REPO
CONFIGS = REPO / "bundles" / "medsegtext" / "configs"
VARIANTS = {"joint": [], "seg_only": ["train_seg_only.yaml"], "text_only": ["train_text_only.yaml"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    # one thread: on a small shared CPU two threads oversubscribe and ran 20x slower (measured)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_medsegtext"))
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from monai.bundle import run

    from segreport.phantom import DATASET_MARKERS, ensure_dataset

    out = Path(a.out)
    # the benchmark's own work folder: generated here once, as the default phantom is
    data = ensure_dataset(out / "phantom", DATASET_MARKERS, n_cases=a.cases, seed=a.seed, slice_filter="lung")
    results = {}
    for name, overlay in VARIANTS.items():
        files = [str(CONFIGS / "train.yaml")] + [str(CONFIGS / f) for f in overlay]
        common = dict(bundle_root=str(CONFIGS.parent), output_dir=str(out / name), ckpt_dir=str(out / name / "models"), dataset_dir=data,
                      image_size=a.image_size, seed=a.seed, num_threads=a.threads)
        t = time.perf_counter()
        run("training", config_file=files, epochs=a.epochs, val_interval=max(1, a.epochs // 3), **common)
        train_s = time.perf_counter() - t
        run("evaluating", config_file=files + [str(CONFIGS / "evaluate.yaml")], **common)
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())["test"]
        results[name] = {"train_seconds": round(train_s, 1), **{k: metrics.get(k) for k in (
            "dice_slice_mean", "dice_case_mean", "miou_slice_mean", "bleu1", "bleu4", "meteor", "rouge_l", "n_slices")}}
        print(name, json.dumps(results[name]), flush=True)

    joint, seg, text = results["joint"], results["seg_only"], results["text_only"]
    summary = {
        "setup": vars(a) | {"device": "cpu", "model_config": "tiny"},
        "results": results,
        "joint_minus_seg_only_dice_case": round(joint["dice_case_mean"] - seg["dice_case_mean"], 4),
        "joint_over_text_only_bleu4": round(joint["bleu4"] / max(text["bleu4"], 1e-8), 3),
        "targets": {"dice_within_0.02": joint["dice_case_mean"] >= seg["dice_case_mean"] - 0.02,
                    "bleu4_at_least_0.9x": joint["bleu4"] >= 0.9 * text["bleu4"]},
    }
    dest = REPO / "benchmarks" / "results" / "medsegtext_quality.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
