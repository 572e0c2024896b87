"""LAPFT pipeline pieces beyond the shared text-guided ones (:mod:`.text_guided`): the warm-up cosine
schedule, and the GPFC location evaluation against a frequency baseline with the prompt panels (an
observer of the shared evaluation, so the test slices go through the network once)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..data.outputs import write_json
from ..text.findings import parse_finding
from ..vocab import ZONES


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


class ZoneEvaluation:
    """An observer of :func:`segreport.training.text_guided.evaluate`: GPFC six-zone accuracy and macro F1
    per stage on the test slices, against the zones of each slice's reference sentence, and the same for
    always predicting each zone's TRAINING frequency (a zone is predicted when it is present in more than
    half of the training slices) -> zones.json; panels of the coarse mask, the chosen points and the
    final mask -> panels/."""

    def __init__(self, train_items: list[dict], n_panels: int = 8):
        self.frequency = np.array([parse_finding(it["text"]).multi_hot for it in train_items], dtype=float).mean(0)
        self.n_panels = int(n_panels)
        self.truth: list[list[int]] = []
        self.preds: list[np.ndarray] = []
        self.panels: list[tuple] = []

    def update(self, batch: dict, out: dict) -> None:
        self.truth += [parse_finding(t).multi_hot for t in batch["text"]]
        if out["zone_logits"].shape[1]:
            self.preds.append((torch.sigmoid(out["zone_logits"]) > 0.5).cpu().numpy())
        for i in range(min(len(batch["image"]), self.n_panels - len(self.panels))):
            self.panels.append((f"{batch['case_id'][i]}_s{int(batch['slice_index'][i]):03d}.png",
                                batch["image"][i, 0].numpy(), batch["label"][i, 0].numpy(),
                                torch.sigmoid(out["coarse_logits"][i, 0]).cpu().numpy(),
                                out["points"][i][out["points_valid"][i]].cpu().numpy(),
                                (torch.sigmoid(out["seg_logits"][i, 0]) > 0.5).cpu().numpy(), batch["text"][i]))

    def finish(self, output_dir: str | os.PathLike) -> dict:
        from .panels import save_prompt_panel

        out = Path(output_dir)
        for name, *panel in self.panels:
            save_prompt_panel(out / "panels" / name, *panel)
        truth = np.array(self.truth, dtype=bool).reshape(-1, len(ZONES))
        baseline = np.broadcast_to(self.frequency > 0.5, truth.shape)
        metrics = {"n_slices": int(len(truth)), "zones": list(ZONES), "training_frequency": self.frequency.round(4).tolist(),
                   "frequency_baseline": {"accuracy": float((baseline == truth).mean()), "macro_f1": _f1(baseline, truth)},
                   "stages": []}
        if self.preds:
            stages = np.concatenate(self.preds)  # (N, 4, 6)
            for s in range(stages.shape[1]):
                p = stages[:, s]
                metrics["stages"].append({"stage": s + 1, "accuracy": float((p == truth).mean()), "macro_f1": _f1(p, truth)})
        write_json(metrics, out / "zones.json")
        return metrics
