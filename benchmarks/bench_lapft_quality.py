"""LAPFT vs TMC vs the U-Net baseline, GPFC zone accuracy vs the frequency baseline, and the prompt (Table 5),
top-k (Table 4), query-length (Table 3) and QGAF/GPFC (Table 2) ablations, on one phantom.

Same data, split, image size and epochs as ``bench_tmc_quality.py`` (whose cached TMC and U-Net runs are
reused when present, else trained here); each model is trained with its bundle's own configs. Reported:
Dice and mIoU per case (mean ± std over seeds), a paired t-test on per-case Dice against the U-Net,
trainable / total parameters and CPU training time, GPFC six-zone accuracy and macro F1 per stage on the
test slices against always predicting each zone's training frequency, text control. Targets (issue 12):
LAPFT not below the U-Net; GPFC above the frequency baseline. Writes benchmarks/results/lapft_quality.json.

    python benchmarks/bench_lapft_quality.py --quick      # 32 cases, 8 epochs, 3 seeds; ablations on seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_tmc_quality import CONFIGS as TMC_CONFIGS, VARIANTS as TMC_VARIANTS, prepare, train_and_evaluate  # noqa: E402

CONFIGS = REPO / "bundles" / "lapft" / "configs"
VARIANTS = {
    "lapft": ([], {}),
    "no_qgaf": (["ablation_no_qgaf.yaml"], {}),
    "no_gpfc": (["ablation_no_gpfc.yaml"], {}),
    "prompts_none": (["ablation_prompts_none.yaml"], {}),
    "prompts_mask": (["ablation_prompts_mask.yaml"], {}),
    "prompts_mask_points": (["ablation_prompts_mask_points.yaml"], {}),
    **{f"top_k_{k}": (["ablation_topk.yaml"], {"top_k": k}) for k in (1, 2, 4)},
    **{f"queries_{t}": (["ablation_queries.yaml"], {"n_queries": t}) for t in (5, 15, 20)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="32 cases, 8 epochs (the quoted setting)")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--ablations", nargs="*", default=[v for v in VARIANTS if v != "lapft"], choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_tmc"), help="shared with bench_tmc_quality")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    data, out = prepare(a)
    from segreport.metrics.stats import mean_std, paired_t_test

    runs: dict[str, list[dict]] = {}
    plan = [("unet", s, TMC_CONFIGS, TMC_VARIANTS) for s in a.seeds] + [("tmc", s, TMC_CONFIGS, TMC_VARIANTS) for s in a.seeds]
    plan += [("lapft", s, CONFIGS, VARIANTS) for s in a.seeds]
    plan += [(v, s, CONFIGS, VARIANTS) for v in a.ablations for s in a.ablation_seeds]
    for name, seed, configs, variants in plan:
        guided = [] if name == "unet" else [name]
        r = train_and_evaluate(name, seed, data, out, a, configs=configs, variants=variants, text_guided=guided)
        runs.setdefault(name, []).append(r)
        print(name, seed, json.dumps({k: v for k, v in r.items() if k not in ("per_case_dice", "zones")}), flush=True)

    def case_means(name):
        cases = sorted(runs[name][0]["per_case_dice"])
        return cases, [float(np.mean([r["per_case_dice"][c] for r in runs[name]])) for c in cases]

    table = {}
    for name, rs in runs.items():
        row = {"n_seeds": len(rs), "dice": mean_std([r["dice"] for r in rs]), "miou": mean_std([r["miou"] for r in rs]),
               "train_seconds": mean_std([r["train_seconds"] for r in rs])}
        if "parameters" in rs[0]:
            row["parameters"] = rs[0]["parameters"]
        if "text_control" in rs[0]:
            row["text_control_share_ratio"] = mean_std([r["text_control"]["share_ratio"] for r in rs])
        if "zones" in rs[0] and rs[0]["zones"]["stages"]:
            row["gpfc_accuracy_per_stage"] = [mean_std([r["zones"]["stages"][s]["accuracy"] for r in rs])["mean"]
                                              for s in range(len(rs[0]["zones"]["stages"]))]
            row["gpfc_macro_f1_per_stage"] = [mean_std([r["zones"]["stages"][s]["macro_f1"] for r in rs])["mean"]
                                              for s in range(len(rs[0]["zones"]["stages"]))]
            row["frequency_baseline"] = rs[0]["zones"]["frequency_baseline"]
        if name != "unet" and len(rs) == len(runs["unet"]):
            try:
                row["paired_t_vs_unet"] = paired_t_test(case_means(name)[1], case_means("unet")[1])
            except ValueError as err:
                row["paired_t_vs_unet"] = str(err)
        table[name] = row
    lapft = table["lapft"]
    summary = {"setup": vars(a) | {"device": "cpu", "model_config": "tiny"}, "table": table, "runs": runs,
               "targets": {"lapft_not_below_unet": lapft["dice"]["mean"] >= table["unet"]["dice"]["mean"],
                           "gpfc_above_frequency_baseline": bool(lapft.get("gpfc_accuracy_per_stage")) and min(
                               lapft["gpfc_accuracy_per_stage"]) > lapft["frequency_baseline"]["accuracy"]}}
    dest = REPO / "benchmarks" / "results" / f"lapft_quality{'_' + a.tag if a.tag else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
