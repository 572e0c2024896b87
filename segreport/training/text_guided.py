"""Training and evaluation pieces of the text-guided 2D models (TMC, LAPFT): augmentations that keep
the text true, batches, the paper's LR schedule, evaluation per case and the text-control check.

The data and validation score are the shared slice pieces of :mod:`.slices2d`; volume inference is
:mod:`segreport.inference.text_guided`. The bundle YAMLs (bundles/tmc, bundles/lapft) only wire these
with MONAI's SupervisedTrainer/Evaluator.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.engines import PrepareBatch
from monai.transforms import RandFlipd, RandRotate90d, RandRotated
from tqdm import tqdm

from ..data.outputs import write_csv, write_json
from ..metrics.segmentation import SegmentationScores
from ..transforms.guided_text import RandLateralFlipd, RandZoneSubsetd
from .loaders import make_dataset, make_loader
from .slices2d import build_tokenizer, intensity_augmentations, slice_transforms, summarize_slices

log = logging.getLogger("segreport.text_guided")

SPATIAL_KEYS = ("image", "label", "lesion_zones")
SPATIAL_MODES = ("bilinear", "nearest", "nearest")


def augmentations(rotate_deg: float = 20.0, rot90: bool = False, flip_ap: bool = True, lateral_flip: bool = True,
                  zone_subset_prob: float = 0.5, prob: float = 0.5) -> list:
    """The paper's training augmentation (±20°, k×90°, flips), each a switch, plus the zone subsets.

    The left-right mirror always swaps the sentence's sides (:class:`RandLateralFlipd`); there is no
    plain mirror, because it would make the text false. ``rot90`` is off by default: a quarter turn
    keeps the sentence true about the patient but puts the left lung at the top of the image, so the
    text's sides no longer say where to look (the paper's setting turns it on). A front-back flip
    keeps the sides.
    """
    steps: list = []
    if rotate_deg:
        steps.append(RandRotated(keys=SPATIAL_KEYS, range_x=np.deg2rad(rotate_deg), prob=prob, mode=SPATIAL_MODES,
                                 padding_mode="zeros", allow_missing_keys=True))
    if rot90:
        steps.append(RandRotate90d(keys=SPATIAL_KEYS, prob=prob, max_k=3, allow_missing_keys=True))
    if flip_ap:
        steps.append(RandFlipd(keys=SPATIAL_KEYS, prob=prob, spatial_axis=0, allow_missing_keys=True))
    if lateral_flip:
        steps.append(RandLateralFlipd(keys=("image", "label"), prob=prob))
    if zone_subset_prob:
        steps.append(RandZoneSubsetd(prob=zone_subset_prob))
    return steps


def build_text_tokenizer(train_items: list[dict], tokenizer_path: str | None = None, text_encoder_path: str | None = None):
    """The text encoder's own tokenizer (its folder, or ``tokenizer_path``), framed [CLS] ... [SEP] with
    no token added; with neither, a word vocabulary from the training sentences (a randomly initialised
    encoder has nothing to keep). Saved inside every checkpoint's spec."""
    from ..text.tokenizers import load_encoder_tokenizer

    folder = tokenizer_path or text_encoder_path
    return load_encoder_tokenizer(folder) if folder else build_tokenizer(train_items)


def plateau_schedule(optimizer, metric: str = "val_dice", factor: float = 0.1, patience: int = 10,
                            early_stop: int = 20) -> list:
    """The paper's schedule as validation handlers: LR × ``factor`` when ``metric`` has not improved for
    ``patience`` validations, stop after ``early_stop`` (0: never). Counted in validations (every
    ``val_interval`` epochs), as MONAI's handlers count. The early stopper gets its trainer with
    ``set_trainer`` once the trainer exists (the trainer holds the evaluator that holds these)."""
    from monai.handlers import EarlyStopHandler, LrScheduleHandler

    def score(engine):
        return engine.state.metrics[metric]

    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=factor, patience=patience)
    handlers = [LrScheduleHandler(scheduler, print_lr=False, step_transform=score)]
    if early_stop:
        handlers.append(EarlyStopHandler(patience=early_stop, score_function=score))
    return handlers


def train_transforms(tokenizer, image_size: int, max_length: int, zone_labels: bool = False,
                     intensity_augmentation: bool = True, **augment_kwargs):
    """Training slice transforms with :func:`augmentations` (and, with ``intensity_augmentation``, the
    other-site changes of :func:`.slices2d.intensity_augmentations`); ``zone_labels`` adds ``zones``, the
    six-zone multi-hot of the (augmented) sentence, LAPFT's location targets."""
    extra = intensity_augmentations() if intensity_augmentation else []
    return slice_transforms(tokenizer, image_size, max_length, train=True, zone_labels=zone_labels,
                            augment=extra + augmentations(**augment_kwargs))


class TextGuidedBatch(PrepareBatch):
    """Batch -> (image, {"label", "tokens"[, "zones"]}, (tokens, tokens_mask), {}) for the engines."""

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        def to(key):
            return batchdata[key].to(device=device, non_blocking=non_blocking)

        tokens = to("tokens")
        targets = {"label": to("label"), "tokens": tokens}
        if "zones" in batchdata:
            targets["zones"] = to("zones")
        return to("image"), targets, (tokens, to("tokens_mask")), {}


@torch.inference_mode()
def evaluate(checkpoint: str | os.PathLike, items: list[dict], output_dir: str | os.PathLike, batch_size: int = 8,
             device: str = "cpu", observers: Sequence = ()) -> dict:
    """Dice and IoU per slice, and per case as the paper reports them (the mean over a case's slices)
    plus pooled over the case's slices -> metrics.json (its ``test`` block: :func:`.slices2d.summarize_slices`;
    for slices with zone maps also ``text_control``, :func:`slice_text_control`), per_case.csv, per_sample.csv.

    The model, its image size, text length and tokenizer come from the checkpoint's spec. ``observers``
    see every batch and the network's whole output in the same pass (``update(batch, out)``) and write
    their own results at the end (``finish(output_dir)``): a model's further outputs are scored without
    running it twice (LAPFT's GPFC zones, :class:`segreport.training.lapft.ZoneEvaluation`).
    """
    from ..models import adapter
    from ..models.spec import read_checkpoint

    spec, weights = read_checkpoint(checkpoint)
    network, tokenizer = adapter(spec["kind"], checkpoint).trained(spec, weights)
    network = network.to(device)
    image_size, max_length = spec["preprocessing"]["image_size"], spec["inference"]["max_length"]
    loader = make_loader(make_dataset(items, slice_transforms(tokenizer, image_size, max_length), cache=False), batch_size)
    seg = SegmentationScores()
    rows = []
    for batch in tqdm(loader, desc="evaluate", leave=False):
        images = batch["image"].to(device)
        out = network(images, batch["tokens"].to(device), batch["tokens_mask"].to(device))
        for observer in observers:
            observer.update(batch, out)
        masks = (torch.sigmoid(out["seg_logits"][:, 0]) > spec["inference"]["threshold"]).cpu().numpy()
        for i in range(len(images)):
            case_id, sl = batch["case_id"][i], int(batch["slice_index"][i]) if "slice_index" in batch else -1
            scored = seg.add(masks[i], batch["label"][i, 0].numpy() > 0.5, case_id=case_id, slice_index=sl)
            rows.append({"case_id": case_id, "slice_index": sl, "text": batch["text"][i], "dice": scored["dice"],
                         "iou": scored["iou"]})
    metrics, case_rows = summarize_slices(rows, {r["case_id"]: r for r in seg.case_rows()})
    result: dict = {"test": metrics}
    if items and "lung_zones" in items[0]:  # slice folders carry each slice's zone map
        result["text_control"] = slice_text_control(network, tokenizer, spec, items, batch_size, device)
    out = Path(output_dir)
    for observer in observers:
        observer.finish(out)
    write_json(result, out / "metrics.json")
    write_csv(out / "per_case.csv", case_rows)
    write_csv(out / "per_sample.csv", rows)
    log.info("evaluation: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    return metrics


MASK_OUTPUTS = {"seg_logits": "", "coarse_logits": "coarse_"}  # a prompt-making model's coarse mask is scored too


@torch.inference_mode()
def slice_text_control(network, tokenizer, spec: dict, items: list[dict], batch_size: int = 8, device: str = "cpu") -> dict:
    """Does the text steer the mask, on 2D slices? Every slice whose sentence names both lungs is given
    that sentence and, for each lung, the sentence restricted to that lung alone. Returned: the share of
    the predicted lesion that lies in the lung the sentence leaves out, pooled over slices and sides, with
    the true and with the one-lung text, and their ratio (the target: at most 0.5). A predicted pixel's
    lung is the report's rule on the slice's zone map (pixels outside the lungs: the nearest lung zone).
    A model that also outputs ``coarse_logits`` (LAPFT's text-made coarse mask, its prompt) gets the same
    numbers for it under ``coarse_*``: where the text is lost, before or inside the mask decoder."""
    from ..text.findings import parse_finding, restrict_finding
    from ..vocab import SIDES, ZONES

    bilateral = [it for it in items if {z.split("_")[1] for z in parse_finding(it["text"]).zones} == set(SIDES)]
    variants = [(i, None) for i in range(len(bilateral))] + [(i, kept) for i in range(len(bilateral)) for kept in SIDES]
    inputs = [{**bilateral[i], "text": bilateral[i]["text"] if kept is None else
               restrict_finding(bilateral[i]["text"], [z for z in ZONES if z.endswith(kept)])} for i, kept in variants]
    image_size, max_length = spec["preprocessing"]["image_size"], spec["inference"]["max_length"]
    loader = make_loader(make_dataset(inputs, slice_transforms(tokenizer, image_size, max_length), cache=False), batch_size)
    volumes: dict[str, list[dict]] = {}  # output -> {side: predicted pixels} per input, in input order
    for batch in loader:
        out = network(batch["image"].to(device), batch["tokens"].to(device), batch["tokens_mask"].to(device))
        zone_maps = batch["lung_zones"][:, 0].numpy()
        for key in MASK_OUTPUTS:
            if key in out:
                masks = (torch.sigmoid(out[key][:, 0]) > spec["inference"]["threshold"]).cpu().numpy()
                volumes.setdefault(key, []).extend(_side_pixels(m, z) for m, z in zip(masks, zone_maps))
    result: dict = {"n_slices": len(bilateral)}
    for key, per_input in volumes.items():
        true = {i: vols for (i, kept), vols in zip(variants, per_input) if kept is None}
        pairs = [(kept, true[i], vols) for (i, kept), vols in zip(variants, per_input) if kept is not None]
        result.update({MASK_OUTPUTS[key] + k: v for k, v in _pooled_shares(pairs).items()})
    return result


def _side_pixels(mask: np.ndarray, zone_map: np.ndarray) -> dict[str, float]:
    """Predicted pixels per patient side, by the report's rule (outside the lungs: the nearest lung zone)."""
    from ..transforms.findings import FindingsFromMask
    from ..vocab import SIDES

    if not (mask.any() and zone_map.any()):
        return {side: 0.0 for side in SIDES}
    return _side_counts(FindingsFromMask(min_size=1).describe(mask, affine=np.eye(4), zone_map=zone_map).voxel_zones)


def _side_counts(voxel_zones: np.ndarray) -> dict[str, float]:
    """Voxels per patient side of a zone-code map (values 1..6 in vocab.ZONES order)."""
    from ..vocab import SIDES, ZONES

    return {side: float(np.isin(voxel_zones, [i + 1 for i, z in enumerate(ZONES) if z.endswith(side)]).sum())
            for side in SIDES}


def _pooled_shares(pairs: list[tuple[str, dict, dict]]) -> dict:
    """The left-out lung's share of the prediction, pooled over ``(kept side, side counts with the true
    sentence, side counts with the one-lung sentence)``: with each sentence, their ratio, and the ratio of
    the left-out volumes themselves."""
    from ..vocab import SIDES

    left_out = {"true_text": 0.0, "one_lung_text": 0.0}
    total = {"true_text": 0.0, "one_lung_text": 0.0}
    for kept, true, one in pairs:
        other = SIDES[1 - SIDES.index(kept)]
        for key, v in (("true_text", true), ("one_lung_text", one)):
            left_out[key] += v[other]
            total[key] += sum(v.values())
    share = {k: left_out[k] / total[k] if total[k] else float("nan") for k in left_out}
    return {"left_out_share_true_text": share["true_text"], "left_out_share_one_lung_text": share["one_lung_text"],
            "share_ratio": share["one_lung_text"] / share["true_text"] if share["true_text"] else float("nan"),
            "left_out_volume_ratio": left_out["one_lung_text"] / left_out["true_text"] if left_out["true_text"]
            else float("nan")}


def text_control(checkpoint: str | os.PathLike, items: list[dict], device: str = "cpu") -> dict:
    """Does the text steer the mask? For every test volume whose reference mask has lesions in both
    lungs, the same model is given the true sentence and, for each lung, the sentence restricted to
    that lung alone. Returned: the share of predicted lesion volume that lies in the lung the
    sentence leaves out (pooled over cases and sides), with the true text and with the one-lung text,
    and their ratio; the issue's target is a ratio of at most 0.5. Voxels are given a side by the
    report's rule (nearest lung zone, :class:`FindingsFromMask`).
    """
    from ..data.io import load_volume
    from ..inference.predictor import min_lesion_ml_of
    from ..models import load
    from ..text.findings import parse_finding, restrict_finding
    from ..transforms.findings import FindingsFromMask
    from ..transforms.lung_mask import lung_label_from_ct
    from ..transforms.postprocess import remove_small_lesions
    from ..vocab import SIDES, ZONES
    from .evaluation import reference_sentence

    predictor = load(checkpoint, device=device)
    min_ml = min_lesion_ml_of(predictor)  # the masks the report would count
    describe = FindingsFromMask().describe
    pairs, cases = [], []
    for item in items:
        sentence = reference_sentence(item)
        named_sides = {z.split("_")[1] for z in parse_finding(sentence).zones}
        if named_sides != set(SIDES):
            continue
        image, affine, _ = load_volume(item["image"])
        lung = lung_label_from_ct(image, affine)

        def side_volumes(text: str) -> dict[str, float]:
            mask = remove_small_lesions(predictor.predict(image, affine, lung=lung, text=text).mask, affine, min_ml)
            return _side_counts(describe(mask, lung=lung, affine=affine, image=image).voxel_zones)

        true = side_volumes(sentence)
        for kept in SIDES:
            other = SIDES[1 - SIDES.index(kept)]
            one = side_volumes(restrict_finding(sentence, [z for z in ZONES if z.endswith(kept)]))
            pairs.append((kept, true, one))
            cases.append({"case_id": item["case_id"], "kept": kept, "left_out_voxels_true": true[other],
                          "left_out_voxels_one_lung": one[other], "total_true": sum(true.values()),
                          "total_one_lung": sum(one.values())})
    return {"n_cases": len({c["case_id"] for c in cases}), **_pooled_shares(pairs), "cases": cases}


def write_parameter_counts(network, output_dir: str | os.PathLike) -> dict:
    """``parameters.json`` in the output folder: trainable and total parameters, and for a model that says
    so (``trainable_summary``) which pretrained towers are frozen."""
    net = getattr(network, "module", network)
    summary = net.trainable_summary() if hasattr(net, "trainable_summary") else {
        "trainable_parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in net.parameters())}
    write_json(summary, Path(output_dir) / "parameters.json")
    return summary
