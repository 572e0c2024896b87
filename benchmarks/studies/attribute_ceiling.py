"""How far the 3D bundle's attributes can go on the quality bench's data: a ceiling, not a model.

Issue #14 asks for an average attribute accuracy of 0.85 at one click. This measures what bounds it, on
the same data (a seed's training phantom, its unseen-seed test phantom) and the same trained model as
``bench_lesion_report_quality.py --quick``:

* the classes each split holds per attribute group (a test class with no training lesion cannot be
  learned from that split);
* a random forest (scikit-learn, 300 trees) on the measured lesion descriptors
  (:func:`~segreport.networks.blocks.lesion_features.lesion_descriptors`, what the attribute head also
  reads), fitted on the training lesions and scored on the test lesions, once with the ground-truth
  masks (the ceiling of the descriptors with a perfect mask) and once with the model's one-click masks
  (what they give with the masks the report has);
* the model's own one-click attributes, as the quality bench scores them.

    python -m benchmarks.studies.attribute_ceiling                 # after the quality bench's seed-1 run
    python -m benchmarks.studies.attribute_ceiling --seed 2

Writes ``benchmarks/results/attribute_ceiling[_seedS].json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "lesion_report_3d" / "configs"
SPACING = [2.4, 2.4, 5.0]  # the quality bench's model grid


def bench_datalists(data: Path, seed: int) -> dict:
    """The quality bench's split, as its train.yaml builds it (every lesion a target)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "train.yaml"))
    parser.update({"dataset_dir": str(data), "seed": seed, "target_lesions": "all", "spacing": SPACING, "require_training": False})
    return parser.get_parsed_content("datalists")


def lesion_rows(net, items: list) -> list[dict]:
    """Per lesion: attribute targets, descriptors of the ground-truth and of the one-click mask, the
    model's one-click attributes."""
    import torch

    from segreport.networks.blocks.lesion_features import image_maps, lesion_descriptors
    from segreport.training.lesion_report import load_transforms, spatial_transforms
    from segreport.training.lesion_report_eval import _click_trajectory
    from segreport.vocab import ATTRIBUTE_NAMES

    spec = net.spec
    load, spatial = load_transforms(), spatial_transforms(spec["roi_size"], spec["spacing"], spec["window"], spec["axcodes"])
    rows = []
    with torch.inference_mode():
        for item in items:
            d = spatial(load(dict(item)))
            image = d["image"].as_tensor()[None].float()
            gt = np.asarray(d["label"][0]) > 0.5
            one = _click_trajectory(net, image, gt, 1)[1]
            truth = torch.from_numpy(gt.astype(np.float32))[None, None]
            maps = image_maps(image)  # the ROI's, for both masks
            rows.append({"targets": d["attr_target"].tolist(), "dice_1_click": one["dice"],
                         "gt": lesion_descriptors(image, truth, maps)[0].tolist(),
                         "one_click": lesion_descriptors(image, one["prob"][None, None], maps)[0].tolist(),
                         "model": [one["attr"][g] for g in ATTRIBUTE_NAMES]})
    return rows


def forest_predictions(train: list[dict], test: list[dict], key: str, n_groups: int) -> np.ndarray:
    """(test lesions, groups): one random forest per group on the descriptors ``key``; a group with one
    training class predicts it."""
    from sklearn.ensemble import RandomForestClassifier

    x, x_test = np.array([r[key] for r in train]), np.array([r[key] for r in test])
    y = np.array([r["targets"] for r in train])
    out = np.zeros((len(test), n_groups), dtype=int)
    for g in range(n_groups):
        keep = y[:, g] >= 0
        classes = np.unique(y[keep, g])
        if len(classes) == 1:
            out[:, g] = classes[0]
            continue
        forest = RandomForestClassifier(300, min_samples_leaf=2, random_state=0).fit(x[keep], y[keep, g])
        out[:, g] = forest.predict(x_test)
    return out


def accuracy(pred: np.ndarray, truth: np.ndarray, names) -> dict:
    per = {}
    for g, name in enumerate(names):
        keep = truth[:, g] >= 0
        per[name] = round(float(np.mean(pred[keep, g] == truth[keep, g])), 4)
    return {"per_group": per, "average": round(float(np.mean(list(per.values()))), 4)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1, help="the quality bench's --seed")
    p.add_argument("--work-dir", default="outputs/bench_lesion_report", help="the quality bench's --work-dir")
    p.add_argument("--run", default="full", help="the model's folder in the work dir")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from segreport.models.lesion_report_3d import trained
    from segreport.models.spec import read_checkpoint
    from segreport.vocab import ATTRIBUTE_GROUPS, ATTRIBUTE_NAMES

    torch.set_num_threads(1)
    work = Path(a.work_dir).resolve()
    # the quality bench's layout: training phantom, its unseen-seed test phantom, one folder of runs per seed
    data, test_data = work / f"phantom_40_{a.seed}", work / f"phantom_test_24_{a.seed + 1000}"
    checkpoint = work / f"seed{a.seed}" / a.run / "models" / "model.pt"
    if not checkpoint.is_file() or not (test_data / "dataset.json").is_file():
        p.error(f"no trained model at {checkpoint} or no phantom at {test_data}: run bench_lesion_report_quality.py --quick first")
    net = trained(*read_checkpoint(checkpoint)).eval()
    train = lesion_rows(net, bench_datalists(data, a.seed)["training"])
    test = lesion_rows(net, bench_datalists(test_data, a.seed)["test"])
    truth = np.array([r["targets"] for r in test])
    counts = {split: {name: {ATTRIBUTE_GROUPS[name][c]: n for c, n in sorted(Counter(r["targets"][g] for r in rows if r["targets"][g] >= 0).items())}
                      for g, name in enumerate(ATTRIBUTE_NAMES)} for split, rows in (("training", train), ("test", test))}
    unseen = {name: sorted(set(counts["test"][name]) - set(counts["training"][name])) for name in ATTRIBUTE_NAMES}
    n = len(ATTRIBUTE_NAMES)
    result = {
        "benchmark": "attribute_ceiling",
        "command": " ".join(["python -m benchmarks.studies.attribute_ceiling", *(argv if argv is not None else sys.argv[1:])]),
        "model": str(checkpoint.relative_to(work.parent)),
        "seed": a.seed,
        "lesions": {"training": len(train), "test": len(test)},
        "test_dice_1_click": round(float(np.mean([r["dice_1_click"] for r in test])), 4),
        "class_counts": counts,
        "test_classes_without_a_training_lesion": unseen,
        "best_possible_if_unseen_classes_are_missed": round(float(np.mean(
            [np.mean([ATTRIBUTE_GROUPS[name][t] not in unseen[name] for t in truth[truth[:, g] >= 0, g]]) for g, name in enumerate(ATTRIBUTE_NAMES)])), 4),
        "model_1_click": accuracy(np.array([r["model"] for r in test]), truth, ATTRIBUTE_NAMES),
        "forest_ground_truth_masks": accuracy(forest_predictions(train, test, "gt", n), truth, ATTRIBUTE_NAMES),
        "forest_1_click_masks": accuracy(forest_predictions(train, test, "one_click", n), truth, ATTRIBUTE_NAMES),
    }
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"attribute_ceiling{'' if a.seed == 1 else f'_seed{a.seed}'}.json"
    out.write_text(json.dumps(result, indent=2))
    for key in ("model_1_click", "forest_ground_truth_masks", "forest_1_click_masks"):
        print(f"{key}: {result[key]['average']} {result[key]['per_group']}")
    print(f"unseen test classes: {unseen}; best possible then {result['best_possible_if_unseen_classes_are_missed']}; wrote {out}")
    return result


if __name__ == "__main__":
    main()
