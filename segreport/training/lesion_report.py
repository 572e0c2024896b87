"""Interactive 3D lesion report pipeline (seed 001): data, click-simulation training, evaluation, inference.

The bundle YAMLs (``bundles/lesion_report_3d/configs``) only wire these pieces into MONAI's
SupervisedTrainer / SupervisedEvaluator and handlers; everything with logic lives here.

Stages (nnU-Net style, each callable on its own):

* **data** (:mod:`.lesion_report_data`): the shared default phantom (:func:`segreport.phantom.ensure_default`),
  :func:`read_attribute_table` (user CSV/JSON per lesion), :func:`load_datalists` (lesion-free cases skipped
  with a logged reason, 60/20/20 case split as the paper, optional zero-shot hold-out of lesion types);
* **pre-processing**: :func:`load_transforms` + :func:`spatial_transforms` — load CT/label/instance
  map, :class:`SelectLesiond` (the largest lesion becomes the target and its attributes the
  attribute targets), orientation, MONAI ``Spacingd`` to a common spacing, HU window, a fixed ROI
  around the lesion (``CropLargestLesiond``);
* **training**: :class:`LesionBatch`, the loss (:class:`~segreport.losses.lesion_report.LesionReportObjective`) and
  key metric (:class:`~segreport.metrics.lesion_report.LesionReportScore`); the
  expert-click simulation is the shared :mod:`.click_training` inferer;
* **evaluation**: :mod:`.lesion_report_eval`; **network and checkpoint spec**:
  :mod:`segreport.models.lesion_report_3d`; **inference**: the shared prompt session
  (:mod:`segreport.inference.session`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.engines import PrepareBatch
from monai.transforms import Compose, EnsureTyped, SelectItemsd

from ..data.reader import LoadVolumed
from ..transforms.attributes import IGNORE_INDEX
from ..transforms.crop import CropLargestLesiond
from ..transforms.lesion_select import EVERY_LESION, SelectLesiond, attribute_targets  # noqa: F401  (re-exported)
from ..transforms.volume import volume_transforms
from ..losses.lesion_report import LesionReportObjective  # noqa: F401  (the bundle's loss)
from ..metrics.lesion_report import LesionReportScore  # noqa: F401  (the bundle's key metric)
from .lesion_report_data import (  # noqa: F401  (re-exported for the bundle YAMLs)
    LESION_TARGETS, PAPER_RATIOS, drop_lesion_free, expand_lesions, lesion_ids, lesion_row, lesion_value,
    load_datalists, read_attribute_table, sampling_weights,
)
from .loaders import engine_loss, make_dataset, make_loader  # noqa: F401  (re-exported for the bundle YAMLs)

log = logging.getLogger("segreport.lesion_report")



# ================================================================================ pre-processing
def load_transforms(select: bool = True) -> Compose:
    """Load CT, label and instance map channel-first in their file voxel order (+ :class:`SelectLesiond`)."""
    # the project's one reader (data.reader): inference's checks and DICOM handling apply to training too
    steps = [LoadVolumed(keys=["image", "label", "lesions"], image_only=True, ensure_channel_first=True, allow_missing_keys=True)]
    if select:
        steps.append(SelectLesiond("label"))
    return Compose(steps)


def spatial_transforms(roi_size: int | Sequence[int], spacing: Sequence[float], window: str | Sequence[float] = "lung",
                       axcodes: str = "RAS", margin: int = 0) -> Compose:
    """:func:`volume_transforms`, then the fixed ROI centred on the (selected) lesion.

    ``margin`` > 0 crops ``roi_size + 2 * margin``, from which :class:`LesionBatch` takes the
    training step's ``roi_size`` window. Parts of the ROI outside the image (small images, lesions at
    the border) are padded: image with 0, i.e. the window minimum (air in the lung window), labels
    with background.
    """
    roi = np.broadcast_to(np.asarray(roi_size, dtype=int), (3,)) + 2 * int(margin)
    keys = ["image", "label", EVERY_LESION]
    return Compose([
        volume_transforms(spacing, window, axcodes, keys=keys),
        CropLargestLesiond(keys=keys, roi_size=tuple(int(r) for r in roi), label_key="label", on_empty="raise",
                           allow_missing_keys=True),
    ])


def training_transforms(roi_size: int | Sequence[int], spacing: Sequence[float], window: str | Sequence[float] = "lung",
                        axcodes: str = "RAS", margin: int = 0) -> Compose:
    """Items -> ``image`` (1, *roi) in [0, 1], ``label`` (1, *roi) target lesion, ``every_lesion``
    (1, *roi) all lesions, ``attr_target`` (5,). With ``margin``: ``roi_size + 2 * margin`` around the
    lesion, from which :class:`LesionBatch` crops each step's window.

    Deterministic (so ``CacheDataset`` caches all of it): the random window is the batch's, where the
    step's kind (clicks or none) is drawn.
    """
    roi = tuple(int(r) for r in np.broadcast_to(np.asarray(roi_size, dtype=int), (3,)))
    keys = ["image", "label", EVERY_LESION]
    steps = [load_transforms(), spatial_transforms(roi, spacing, window, axcodes, margin),
             EnsureTyped(keys=keys, track_meta=False),
             SelectItemsd(keys=[*keys, "attr_target", "lesion_id", "case_id"])]
    return Compose(steps).flatten()  # flat: CacheDataset caches up to the first nested transform


# ===================================================================================== training
class LesionBatch(PrepareBatch):
    """Batch -> ``(image, {"label", "attributes"}, (label,), {"clicks": bool})``: one training step.

    The label also travels as an inferer argument: the click simulator needs the ground truth.

    Training (``roi_size`` given, items cached with a margin, :func:`training_transforms`): with
    probability ``prompt_dropout`` the step is a **no-click step**, as the automatic mode's sliding
    windows run the model: each sample's window lies anywhere in the cached margin (the lesion may sit
    at its border or partly outside), the target is every lesion in it (``every_lesion``) and the
    attributes are not asked (no click says which lesion). Measured before: trained on lesion-centred
    windows only, the search saw 15-20 % of a diffuse lesion's voxels, in fragments. Otherwise a
    **click step**: the lesion shifted by up to ``jitter`` voxels from the window's centre (at
    inference the ROI is centred on a click, not on the lesion's bounding box), its own mask the
    target. Validation (no ``roi_size``): the batch as it comes, a click step.

    ``balanced_steps``, for a batch drawn by a weighted loader (``make_loader(weights=...)``, its items
    tagged ``weighted``): ``"all"``, the step is drawn as above; ``"clicks"``, the loader's draw decides
    it: weighted batches are click steps, unweighted ones no-click steps (give the loader
    ``unweighted_share = prompt_dropout``), so the windows keep the natural mix of lesions while the
    clicks see the rare ones more often. Either way a weighted click step passes the items'
    ``importance`` as ``attr_weight``: the attribute CE of the natural mix, not of the balanced one.

    ``mirror_prob``: each training sample's window is mirrored along each spatial axis with this
    probability (nnU-Net's mirroring; image and target together). Nothing the model predicts depends
    on the side: left/right and zones come from the affine, after the network.
    """

    def __init__(self, roi_size: int | Sequence[int] | None = None, jitter: int = 0, prompt_dropout: float = 0.0, seed: int = 0,
                 balanced_steps: str = "all", mirror_prob: float = 0.0):
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        if balanced_steps not in ("all", "clicks"):
            raise ValueError(f"balanced_steps must be 'all' or 'clicks', got {balanced_steps!r}")
        if not 0.0 <= mirror_prob <= 1.0:
            raise ValueError(f"mirror_prob must be in [0, 1], got {mirror_prob}")
        self.balanced_steps, self.mirror_prob = balanced_steps, float(mirror_prob)
        self.roi = None if roi_size is None else tuple(int(r) for r in np.broadcast_to(np.asarray(roi_size, dtype=int), (3,)))
        self.jitter, self.prompt_dropout = int(jitter), float(prompt_dropout)
        self.rng = np.random.default_rng(seed)

    def __call__(self, batchdata, device=None, non_blocking=False, **kwargs):
        image, label, attrs = batchdata["image"], batchdata["label"], batchdata["attr_target"]
        clicks, weighted = True, batchdata.get("weighted")
        if self.roi is not None:
            clicks = not (self.rng.random() < self.prompt_dropout)
            if weighted is not None and self.balanced_steps == "clicks":
                clicks = bool(torch.as_tensor(weighted).all())
            margin = (np.asarray(image.shape[2:]) - self.roi) // 2
            if (margin < 0).any() or (clicks and (margin < self.jitter).any()):
                raise ValueError(f"batch of spatial size {tuple(image.shape[2:])} holds no {self.roi} window with jitter {self.jitter}")
            if not clicks:
                label, attrs = batchdata[EVERY_LESION], torch.full_like(attrs, IGNORE_INDEX)
            starts = [self.rng.integers(0, 2 * margin + 1) if not clicks else margin + self.rng.integers(-self.jitter, self.jitter + 1, 3)
                      for _ in range(len(image))]
            image, label = self._windows(image, starts), self._windows(label, starts)
            if self.mirror_prob > 0:
                image, label = self._mirror(image, label)
        image = image.to(device=device, non_blocking=non_blocking)
        label = label.to(device=device, non_blocking=non_blocking)
        targets = {"label": label, "attributes": attrs.to(device=device, non_blocking=non_blocking)}
        if clicks and weighted is not None:
            targets["attr_weight"] = torch.as_tensor(batchdata["importance"], dtype=torch.float32).to(device=device)
        return image, targets, (label,), {"clicks": clicks}

    def _mirror(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample flipped along each spatial axis with probability ``mirror_prob``."""
        out_image, out_label = [], []
        for x, y in zip(image, label):
            axes = [d for d in (1, 2, 3) if self.rng.random() < self.mirror_prob]
            out_image.append(x.flip(axes) if axes else x)
            out_label.append(y.flip(axes) if axes else y)
        return torch.stack(out_image), torch.stack(out_label)

    def _windows(self, batch: torch.Tensor, starts) -> torch.Tensor:
        """Each sample's ``roi`` window starting at its ``starts`` entry (channel-first samples)."""
        return torch.stack([x[(slice(None), *(slice(int(a), int(a) + r) for a, r in zip(s, self.roi)))] for x, s in zip(batch, starts)])


def engine_output(output: Mapping) -> tuple[dict, dict]:
    """Engine output (not decollated) -> ``(pred, targets)`` for :class:`LesionReportScore`."""
    return output["pred"], output["label"]
