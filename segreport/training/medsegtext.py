"""MedSegText pipeline pieces: data, batches, loss, validation metric and evaluation.

Volume inference is the shared slice-wise predictor (segreport.inference.slicewise), built from a
checkpoint by segreport.models.medsegtext.

The bundle YAMLs (bundles/medsegtext/configs) only wire these with MONAI's SupervisedTrainer,
SupervisedEvaluator and handlers; everything with logic lives here so it is importable and tested.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.engines import PrepareBatch
from tqdm import tqdm

from ..metrics.segmentation import SegmentationScores
from ..metrics.text import text_metrics
from ..transforms.text import decode_tokens
from ..data.outputs import write_csv, write_json
from ..losses.joint import MedSegTextLoss  # noqa: F401  (the bundle's loss)
from .slice_sentences import sentence_agrees
from .loaders import make_dataset, make_loader  # noqa: F401  (re-exported for the bundle YAMLs)
# the slice data and validation score are shared with the other slice models; re-exported for the YAMLs
from .slices2d import (  # noqa: F401
    SegTextScore, build_tokenizer, engine_output, eval_items, intensity_augmentations, load_datalists, slice_transforms, summarize_slices,
    volume_to_slice_items,
)

log = logging.getLogger("segreport.medsegtext")

# ------------------------------------------------------------------------------- engine pieces
class MedSegTextBatch(PrepareBatch):
    """Batch -> (image, targets, (input tokens,), {}) for SupervisedTrainer/Evaluator.

    Teacher forcing: the decoder reads tokens[:, :-1] and is scored on tokens[:, 1:], and it reads the
    reference mask (``mask``) it is to describe. The slices' ``level`` goes along when the data has it.
    """

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        targets = {"label": batchdata["label"].to(device=device, non_blocking=non_blocking)}
        if "lung_zones" in batchdata:  # validation on slice folders: the consistency check's zone maps
            targets["lung_zones"] = batchdata["lung_zones"]
        args: tuple = ()
        options = {"mask": targets["label"]}
        if "level" in batchdata:
            options["level"] = torch.as_tensor(batchdata["level"], dtype=torch.float32).to(device)
        if "tokens" in batchdata:
            tokens = batchdata["tokens"].to(device=device, non_blocking=non_blocking)
            targets["tokens"] = tokens
            args = (tokens[:, :-1],)
        return image, targets, args, options


class MedSegTextInferer:
    """Evaluator inferer: segmentation logits plus generated token ids for one batch."""

    def __init__(self, max_length: int | None = None, beam_size: int = 1):
        self.max_length, self.beam_size = max_length, beam_size

    def __call__(self, inputs: torch.Tensor, network, *args, level=None, **kwargs) -> dict:
        # the reference mask (kwargs["mask"]) is for teacher forcing: the sentence describes the model's own
        return predict_slices(network, inputs, max_length=self.max_length, beam_size=self.beam_size, level=level)


def predict_slices(network, images: torch.Tensor, max_length: int | None = None, beam_size: int = 1,
                   level: torch.Tensor | None = None) -> dict:
    """Seg logits and/or generated ids for a batch of slices, from ONE encoder pass."""
    return getattr(network, "module", network).predict(images, max_length=max_length, beam_size=beam_size, level=level)


# ------------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(
    checkpoint: str | os.PathLike,
    items: list[dict],
    output_dir: str | os.PathLike,
    beam_size: int = 1,
    batch_size: int = 8,
    device: str = "cpu",
    n_panels: int = 8,
) -> dict:
    """Dice/IoU (per slice and per case), BLEU-1..4, METEOR, ROUGE-L -> metrics.json (its ``test`` block),
    per_case.csv, per_sample.csv, panels. Slices that carry a zone map (slice folders) also get the
    ``consistency_rate``: the share of generated sentences that agree with the model's own mask.

    The model, its image size, decoding length and tokenizer all come from the checkpoint's spec.
    """
    from ..models.medsegtext import trained
    from ..models.spec import read_checkpoint
    from .panels import save_panel

    spec, weights = read_checkpoint(checkpoint)
    network, tokenizer = trained(spec, weights)
    network = network.to(device)
    image_size, max_length = spec["preprocessing"]["image_size"], spec["inference"]["max_length"]
    out = Path(output_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    loader = make_loader(make_dataset(items, slice_transforms(tokenizer, image_size, max_length), cache=False), batch_size)
    seg = SegmentationScores()
    rows, refs, hyps, shown = [], [], [], 0
    for batch in tqdm(loader, desc="evaluate", leave=False):
        images = batch["image"].to(device)
        level = batch["level"].float().to(device) if "level" in batch else None
        pred = predict_slices(network, images, max_length=max_length, beam_size=beam_size, level=level)
        gen = decode_tokens(tokenizer, pred["tokens"]) if "tokens" in pred else [""] * len(images)
        ref = decode_tokens(tokenizer, batch["tokens"]) if "tokens" in batch else [""] * len(images)
        for i in range(len(images)):
            case_id, sl = batch["case_id"][i], int(batch.get("slice_index", [-1] * len(images))[i])
            row = {"case_id": case_id, "slice_index": sl, "reference": ref[i], "generated": gen[i]}
            mask = None
            if "seg_logits" in pred:
                mask = (torch.sigmoid(pred["seg_logits"][i, 0]) > 0.5).cpu().numpy()
                gt = batch["label"][i, 0].cpu().numpy() > 0.5
                scored = seg.add(mask, gt, case_id=case_id, slice_index=sl)
                row.update(dice=scored["dice"], iou=scored["iou"])
                if gen[i] and "lung_zones" in batch:  # does the sentence say what its own mask shows?
                    row["consistent"] = sentence_agrees(gen[i], mask, batch["lung_zones"][i, 0].cpu().numpy())
            rows.append(row)
            refs.append(ref[i])
            hyps.append(gen[i])
            if shown < n_panels:
                save_panel(out / "panels" / f"{case_id}_s{sl:03d}.png", images[i, 0].cpu().numpy(), batch["label"][i, 0].cpu().numpy(),
                           mask, ref[i], gen[i], row.get("dice"))
                shown += 1
    metrics: dict = {"n_slices": len(rows)}
    if len(seg):
        metrics, case_rows = summarize_slices(rows, {r["case_id"]: r for r in seg.case_rows()})
        write_csv(out / "per_case.csv", case_rows)
    if any(hyps):
        scores = text_metrics(refs, hyps, per_sample=True)
        per_sample = scores.pop("per_sample")
        metrics.update(scores)
        for row, s in zip(rows, per_sample):
            row.update(s)
    checked = [r["consistent"] for r in rows if "consistent" in r]
    if checked:
        metrics["consistency_rate"] = float(np.mean(checked))
    write_json({"test": metrics}, out / "metrics.json")
    write_csv(out / "per_sample.csv", rows)
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics
