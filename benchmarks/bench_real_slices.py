"""The 2D models on real COVID-19 CT slices (shared/data/covid19_ct_seg_slices): MedSegText (joint) and its
seg-only baseline, a MONAI U-Net (TMC's train_unet_baseline.yaml), TMC and LAPFT, each through its own
bundle configs, on one case-level split (stratified by infection burden), the same image size and
epochs, at least two training seeds.

Each model is trained with ``python -m monai.bundle run training`` and scored with ``evaluating`` twice:
on the test split, and on the test split re-rendered as another site would show it (another contrast
curve and noise, written as a folder of the same layout and scored with ``--eval_split all``, the
interface another hospital's folder is judged through). Reported, mean ± std over seeds: Dice and mIoU
per slice (as the LViT papers) and per case; MedSegText's BLEU-4, ROUGE-L, METEOR against the sentences
derived from the masks and its consistency rate (its sentences that agree with its own mask); the
text-control ratio of TMC and LAPFT (left-out lung's share of the predicted lesion with a one-lung
sentence over that share with the true sentence, on bilateral test slices). ``--ablate-intensity`` adds
the seg-only MedSegText trained without the intensity augmentation, the check that it helps on the
re-rendered split.
Writes benchmarks/results/real_slices[_TAG].json.

    python benchmarks/bench_real_slices.py --threads 1          # CPU protocol (64 px, 20 epochs, seeds 0 1 2)
    python benchmarks/bench_real_slices.py --paper --tag paper  # paper protocol (224 px, paper configs): a GPU job
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from common import REPO
DATA = REPO.parent / "shared" / "data" / "covid19_ct_seg_slices"
BUNDLES = REPO / "bundles"
# name -> (bundle, overlays, overrides, paper overlays)
MODELS = {
    "medsegtext": ("medsegtext", [], {}, ["train_paper.yaml"]),
    "medsegtext_seg_only": ("medsegtext", ["train_seg_only.yaml"], {}, ["train_paper.yaml", "train_seg_only.yaml"]),
    "unet": ("tmc", ["train_unet_baseline.yaml"], {}, ["train_paper.yaml", "train_unet_baseline.yaml"]),
    "tmc": ("tmc", [], {}, ["train_paper.yaml"]),
    "lapft": ("lapft", [], {}, ["train_paper.yaml"]),
    "medsegtext_seg_only_no_intensity_aug": ("medsegtext", ["train_seg_only.yaml"], {"intensity_augmentation": False},
                                             ["train_paper.yaml", "train_seg_only.yaml"]),
}
ABLATION = "medsegtext_seg_only_no_intensity_aug"  # --ablate-intensity: against medsegtext_seg_only
TEXT_GUIDED = ("tmc", "lapft")


def rerender_other_site(ct: np.ndarray, seed: int) -> np.ndarray:
    """An 8-bit slice as another scanner and site might show it: a sigmoid contrast curve (flatter in the
    soft tissue, harsher in the lung than this data's CLAHE rendering) and noise. Not one of the training
    augmentations' curves (gamma, piecewise-linear)."""
    x = ct.astype(np.float64) / 255.0
    curve = 1.0 / (1.0 + np.exp(-(x - 0.45) / 0.12))
    lo, hi = 1.0 / (1.0 + np.exp(0.45 / 0.12)), 1.0 / (1.0 + np.exp(-0.55 / 0.12))
    y = (curve - lo) / (hi - lo) + np.random.default_rng(seed).normal(0.0, 0.03, x.shape)
    return (np.clip(y, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_rerendered_test(data: Path, test_cases: list[str], dest: Path) -> Path:
    """The test cases of ``data`` in the same layout under ``dest``, their CT slices re-rendered."""
    from PIL import Image

    from segreport.data.slice_folder import read_png_gray

    if (dest / "cases.csv").is_file():
        return dest
    for sub in ("ct", "infection", "lungs"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    with open(data / "cases.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["case_id"] in test_cases]
    for n, row in enumerate(rows):
        Image.fromarray(rerender_other_site(read_png_gray(data / "ct" / row["file"]), n)).save(dest / "ct" / row["file"])
        for sub in ("infection", "lungs"):
            (dest / sub / row["file"]).write_bytes((data / sub / row["file"]).read_bytes())
    with open(dest / "cases.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (dest / "cases.csv.tmp").rename(dest / "cases.csv")
    return dest


def run_model(name: str, seed: int, a, work_root: Path, shifted: Path) -> dict:
    """Train one model with its bundle's configs, evaluate it on the test split and on the re-rendered
    one; cached in its work folder (an interrupted benchmark resumes)."""
    from monai.bundle import run

    bundle, overlays, overrides, paper = MODELS[name]
    configs = BUNDLES / bundle / "configs"
    files = [str(configs / "train.yaml")] + [str(configs / f) for f in (paper if a.paper else overlays)]
    work = work_root / f"{name}_seed{seed}"
    done = work / "bench_result.json"
    if done.is_file():
        return json.loads(done.read_text())
    common = dict(bundle_root=str(configs.parent), output_dir=str(work), ckpt_dir=str(work / "models"),
                  dataset_dir=str(a.data), image_size=a.image_size, seed=seed, split_seed=a.split_seed,
                  split_ratios=a.split_ratios, num_threads=a.threads, **overrides)
    if a.paper:
        common.pop("image_size")
    t = time.perf_counter()
    run("training", config_file=files, epochs=a.epochs, val_interval=a.val_interval, **common)
    train_s = time.perf_counter() - t
    evaluate = files + [str(configs / "evaluate.yaml")]
    run("evaluating", config_file=evaluate, **common)
    result = {"train_seconds": round(train_s, 1), **json.loads((work / "eval" / "metrics.json").read_text())}
    shifted_out = work / "other_site"
    run("evaluating", config_file=evaluate, **{**common, "dataset_dir": str(shifted), "output_dir": str(shifted_out)},
        eval_split="all")
    result["other_site"] = json.loads((shifted_out / "eval" / "metrics.json").read_text())["test"]
    done.write_text(json.dumps(result))
    return result


KEYS = ("dice_slice_mean", "miou_slice_mean", "dice_case_mean", "miou_case_mean", "bleu4", "rouge_l", "meteor",
        "consistency_rate")


def summarize(runs: list[dict]) -> dict:
    """Mean ± std over seeds of every reported number."""
    from segreport.metrics.stats import mean_std

    row = {k: mean_std([r["test"][k] for r in runs]) for k in KEYS if k in runs[0]["test"]}
    row["other_site_dice_slice_mean"] = mean_std([r["other_site"]["dice_slice_mean"] for r in runs])
    row["train_seconds"] = mean_std([r["train_seconds"] for r in runs])
    if "text_control" in runs[0]:
        for k in ("share_ratio", "left_out_share_true_text", "left_out_share_one_lung_text"):
            row[f"text_control_{k}"] = mean_std([r["text_control"][k] for r in runs])
        row["text_control_n_slices"] = runs[0]["text_control"]["n_slices"]
    return row


def targets(table: dict) -> dict:
    """The issue's targets, each with its numbers and whether it is met."""
    def m(name, key="dice_slice_mean"):
        return table[name][key]["mean"] if name in table and key in table[name] else None

    out = {}
    unet = m("unet")
    for name in TEXT_GUIDED:
        if m(name) is not None and unet is not None:
            out[f"{name}_dice_at_least_unet"] = {"model": m(name), "unet": unet, "met": m(name) >= unet}
        ratio = m(name, "text_control_share_ratio")
        if ratio is not None:
            out[f"{name}_text_control_ratio_at_most_0.5"] = {"ratio": ratio, "met": ratio <= 0.5}
    if m("medsegtext") is not None and m("medsegtext_seg_only") is not None:
        out["medsegtext_within_0.02_of_seg_only"] = {"joint": m("medsegtext"), "seg_only": m("medsegtext_seg_only"),
                                                     "met": m("medsegtext") >= m("medsegtext_seg_only") - 0.02}
    if m(ABLATION) is not None and m("medsegtext_seg_only") is not None:  # a check, not a target
        out["intensity_augmentation_other_site"] = {
            "with": m("medsegtext_seg_only", "other_site_dice_slice_mean"), "without": m(ABLATION, "other_site_dice_slice_mean"),
            "with_test": m("medsegtext_seg_only"), "without_test": m(ABLATION)}
    rate = m("medsegtext", "consistency_rate")
    if rate is not None:
        out["medsegtext_consistency_at_least_0.8"] = {"rate": rate, "met": rate >= 0.8}
    return out


def sentence_figure(data: Path, dest: Path) -> str:
    """Twenty slices spread over the cases and levels (every 48th, from the 8th) beside their derived
    sentences, as a picture at ``dest`` and a Markdown table (returned): what docs/results.md shows."""
    from segreport.data.slice_folder import read_slice_folder
    from segreport.training.panels import save_sentence_grid
    from segreport.training.slice_sentences import describe_slices

    picked = describe_slices(read_slice_folder(data))[7::48][:20]
    save_sentence_grid(dest, picked, columns=5)
    rows = ["| file | case | slice (caudal→cranial) | level | derived sentence |", "|---|---|---|---|---|"]
    for it in picked:
        level = (it["slice_index"] + 0.5) / it["slices_in_case"]
        name = "upper" if level >= 2 / 3 else "middle" if level >= 1 / 3 else "lower"
        rows.append(f"| {it['file']} | {it['case_id']} | {it['slice_index'] + 1} / {it['slices_in_case']} | {name} | {it['text']} |")
    return "\n".join(rows)


PAPERS = {"medsegtext": 0.728, "tmc": 0.784, "lapft": 0.798}  # the seed papers' Dice on MosMedData+ (224 px, GPU)


def markdown_table(table: dict) -> str:
    """The results as a Markdown table (mean ± std over seeds), for docs/results.md and the README."""
    def cell(row, key, digits=3):
        v = row.get(key)
        return "–" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    lines = ["| model | Dice / slice | mIoU / slice | Dice / case | Dice, other site | BLEU-4 | ROUGE-L | METEOR "
             "| consistency | text control | paper Dice (MosMedData+) | train s |", "|" + "---|" * 12]
    for name, row in table.items():
        lines.append(" | ".join([f"| {name}", cell(row, "dice_slice_mean"), cell(row, "miou_slice_mean"),
                                 cell(row, "dice_case_mean"), cell(row, "other_site_dice_slice_mean"), cell(row, "bleu4"),
                                 cell(row, "rouge_l"), cell(row, "meteor"), cell(row, "consistency_rate", 2),
                                 cell(row, "text_control_share_ratio", 2), str(PAPERS.get(name, "–")),
                                 cell(row, "train_seconds", 0)]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="a folder in the slice layout (ct/, infection/, lungs/, cases.csv)")
    p.add_argument("--models", nargs="+", default=[m for m in MODELS if m != ABLATION], choices=list(MODELS))
    p.add_argument("--ablate-intensity", action="store_true", help="also seg-only MedSegText without intensity augmentation")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--val-interval", type=int, default=2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split-ratios", type=float, nargs=3, default=[0.6, 0.15, 0.25],
                   help="training / validation / test share of the cases (8 cases: 5 / 1 / 2)")
    p.add_argument("--paper", action="store_true", help="the paper configurations (train_paper.yaml, 224 px): a GPU job")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_real_slices")
    p.add_argument("--tag", default="")
    p.add_argument("--sentence-figure", type=Path, metavar="PNG",
                   help="only draw twenty slices beside their derived sentences (docs/real_slice_sentences.png)")
    a = p.parse_args()
    if a.sentence_figure:
        print(sentence_figure(a.data, a.sentence_figure))
        return
    if a.ablate_intensity and ABLATION not in a.models:
        a.models.append(ABLATION)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from segreport.training.slice_sentences import slice_folder_datalists

    torch.set_num_threads(a.threads)
    setting = f"{'paper' if a.paper else f's{a.image_size}'}_e{a.epochs}_split{a.split_seed}"
    work_root = a.out / setting
    splits = slice_folder_datalists(a.data, a.split_ratios, a.split_seed)
    case_split = {k: sorted({it["case_id"] for it in v}) for k, v in splits.items()}
    shifted = write_rerendered_test(a.data, case_split["test"], work_root / "test_other_site")
    runs: dict[str, list[dict]] = {}
    for name in a.models:
        for seed in a.seeds:
            r = run_model(name, seed, a, work_root, shifted)
            runs.setdefault(name, []).append(r)
            print(name, seed, json.dumps({"test": r["test"], "other_site": r["other_site"].get("dice_slice_mean"),
                                          "text_control": r.get("text_control", {}).get("share_ratio"),
                                          "train_seconds": r["train_seconds"]}), flush=True)
    table = {name: summarize(rs) for name, rs in runs.items()}
    summary = {"data": str(a.data), "setting": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}},
               "split": case_split, "n_slices": {k: len(v) for k, v in splits.items()},
               "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
               "table": table, "targets": targets(table), "runs": runs}
    dest = REPO / "benchmarks" / "results" / f"real_slices{'_' + a.tag if a.tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    print(markdown_table(table))


if __name__ == "__main__":
    main()
