"""LAPFT pipeline pieces beyond the shared text-guided ones (:mod:`.text_guided`): the warm-up cosine
schedule, the GPFC location evaluation against a frequency baseline, and the prompt panels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.outputs import write_json
from ..text.findings import parse_finding
from ..vocab import ZONES
from .loaders import make_dataset, make_loader
from .slices2d import slice_transforms


def warmup_cosine(optimizer, warmup_iterations: int, total_iterations: int) -> list:
    """The paper's schedule as a trainer handler: linear warm-up, then cosine decay, stepped per iteration."""
    from monai.handlers import LrScheduleHandler
    from monai.optimizers import WarmupCosineSchedule

    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=min(int(warmup_iterations), max(1, total_iterations - 1)),
                                     t_total=max(1, int(total_iterations)))
    return [LrScheduleHandler(scheduler, print_lr=False, epoch_level=False)]


def _f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Macro F1 over the six zones (a zone never present nor predicted counts as 1)."""
    scores = []
    for z in range(true.shape[1]):
        tp = float((pred[:, z] & true[:, z]).sum())
        denom = float(pred[:, z].sum() + true[:, z].sum())
        scores.append(2 * tp / denom if denom else 1.0)
    return float(np.mean(scores))


@torch.inference_mode()
def evaluate_zones(checkpoint: str | os.PathLike, test_items: list[dict], train_items: list[dict],
                   output_dir: str | os.PathLike, batch_size: int = 8, device: str = "cpu", n_panels: int = 8) -> dict:
    """GPFC six-zone accuracy and macro F1 per stage on the test slices, against the zones of each slice's
    reference sentence, and the same for always predicting each zone's TRAINING frequency (a zone is
    predicted when it is present in more than half of the training slices) -> zones.json; panels of the
    coarse mask, the chosen points and the final mask -> panels/."""
    from ..models.lapft import trained
    from ..models.spec import read_checkpoint
    from .panels import save_prompt_panel

    spec, weights = read_checkpoint(checkpoint)
    network, tokenizer = trained(spec, weights)
    network = network.to(device)
    size, length = spec["preprocessing"]["image_size"], spec["inference"]["max_length"]
    loader = make_loader(make_dataset(test_items, slice_transforms(tokenizer, size, length), cache=False), batch_size)
    truth, preds, shown = [], [], 0
    out = Path(output_dir)
    for batch in loader:
        result = network(batch["image"].to(device), batch["tokens"].to(device), batch["tokens_mask"].to(device))
        truth += [parse_finding(t).multi_hot for t in batch["text"]]
        if result["zone_logits"].shape[1]:
            preds.append((torch.sigmoid(result["zone_logits"]) > 0.5).cpu().numpy())
        for i in range(len(batch["image"])):
            if shown >= n_panels:
                break
            save_prompt_panel(out / "panels" / f"{batch['case_id'][i]}_s{int(batch['slice_index'][i]):03d}.png",
                              batch["image"][i, 0].numpy(), batch["label"][i, 0].numpy(),
                              torch.sigmoid(result["coarse_logits"][i, 0]).cpu().numpy(),
                              result["points"][i][result["points_valid"][i]].cpu().numpy(),
                              (torch.sigmoid(result["seg_logits"][i, 0]) > 0.5).cpu().numpy(), batch["text"][i])
            shown += 1
    truth = np.array(truth, dtype=bool)
    freq = np.array([parse_finding(it["text"]).multi_hot for it in train_items], dtype=float).mean(0)
    baseline = np.broadcast_to(freq > 0.5, truth.shape)
    metrics = {"n_slices": int(len(truth)), "zones": list(ZONES), "training_frequency": freq.round(4).tolist(),
               "frequency_baseline": {"accuracy": float((baseline == truth).mean()), "macro_f1": _f1(baseline, truth)},
               "stages": []}
    if preds:
        stages = np.concatenate(preds)  # (N, 4, 6)
        for s in range(stages.shape[1]):
            p = stages[:, s]
            metrics["stages"].append({"stage": s + 1, "accuracy": float((p == truth).mean()), "macro_f1": _f1(p, truth)})
    write_json(metrics, out / "zones.json")
    return metrics
