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
from pathlib import Path


from common import BUNDLES, REPO, prepare, table_row, train_and_evaluate, write_results

CONFIGS = BUNDLES / "lapft" / "configs"
TMC_CONFIGS = BUNDLES / "tmc" / "configs"
TMC_VARIANTS = {"tmc": ([], {}), "unet": (["train_unet_baseline.yaml"], {})}  # the comparison's rows, as bench_tmc_quality runs them
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


def parameter_counts(checkpoint: Path) -> dict:
    """Trainable and total parameters of a trained model (for those whose training does not write them)."""
    from segreport.models import network_from_checkpoint

    net, _ = network_from_checkpoint(checkpoint)
    return {"trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in net.parameters())}


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
    from segreport.metrics.stats import mean_std

    runs: dict[str, list[dict]] = {}
    plan = [("unet", s, TMC_CONFIGS, TMC_VARIANTS) for s in a.seeds] + [("tmc", s, TMC_CONFIGS, TMC_VARIANTS) for s in a.seeds]
    plan += [("lapft", s, CONFIGS, VARIANTS) for s in a.seeds]
    plan += [(v, s, CONFIGS, VARIANTS) for v in a.ablations for s in a.ablation_seeds]
    for name, seed, configs, variants in plan:
        guided = [] if name == "unet" else [name]
        r = train_and_evaluate(name, seed, data, out, a, configs=configs, variants=variants, text_guided=guided)
        runs.setdefault(name, []).append(r)
        print(name, seed, json.dumps({k: v for k, v in r.items() if k not in ("per_case_dice", "zones")}), flush=True)

    table = {}
    for name, rs in runs.items():
        row = {"n_seeds": len(rs), **table_row(name, runs)}
        row["parameters"] = rs[0].get("parameters") or parameter_counts(
            out / f"{name}_seed{a.seeds[0]}_e{a.epochs}_s{a.image_size}" / "models" / "model.pt")
        if "zones" in rs[0] and rs[0]["zones"]["stages"]:
            stages = range(len(rs[0]["zones"]["stages"]))
            row["gpfc_accuracy_per_stage"] = [mean_std([r["zones"]["stages"][s]["accuracy"] for r in rs])["mean"] for s in stages]
            row["gpfc_macro_f1_per_stage"] = [mean_std([r["zones"]["stages"][s]["macro_f1"] for r in rs])["mean"] for s in stages]
            row["frequency_baseline"] = rs[0]["zones"]["frequency_baseline"]
        table[name] = row
    lapft = table["lapft"]
    summary = {"setup": vars(a) | {"device": "cpu", "model_config": "tiny"}, "table": table, "runs": runs,
               "targets": {"lapft_not_below_unet": lapft["dice"]["mean"] >= table["unet"]["dice"]["mean"],
                           "gpfc_above_frequency_baseline": bool(lapft.get("gpfc_accuracy_per_stage")) and min(
                               lapft["gpfc_accuracy_per_stage"]) > lapft["frequency_baseline"]["accuracy"]}}
    write_results("lapft_quality", summary, a.tag)


if __name__ == "__main__":
    main()
