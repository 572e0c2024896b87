"""Slice-wise inference of any 2D model over a 3D CT, model-free.

volume (HU, file voxel order) -> display orientation (:mod:`segreport.transforms.orientation`) -> HU
window -> batches of axial slices resized to the model's image size -> probabilities resized back ->
inverse orientation -> mask on the file's own grid. Because every slice is shown to the model in the
same radiological orientation, the answer does not depend on how the file stores its voxels.

The model side is two callables: ``forward(images (B,1,S,S) in [0,1], **prompts) -> {"seg_logits"
(B,1,S,S), optionally "tokens"}`` and, for models that write, ``decode(tokens) -> list[str]``.
A forward may also return per-slice outputs worth reporting: ``"slice_values"`` ({name: (B, ...)}),
kept per file slice index, and ``"slice_points"`` ((B, k, 2) pixel (row, col) at the model's size,
with ``"slice_points_valid"`` (B, k)), mapped through the display orientation's affine to the file's
IJK voxels and RAS mm (a LAPFT prompt point is then a place in the patient, not a pixel of a resized
slice). Both land in ``predict``'s ``Prediction.extras``.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from nibabel.affines import apply_affine
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from ..timing import stage
from ..transforms.intensity import HUWindow
from ..transforms.lung_mask import lung_label_from_ct
from ..transforms.lung_regions import slice_levels
from ..transforms.orientation import display_to_file_index, from_display, to_display
from ..transforms.slicing import axial_axis
from .geometry import map_points
from .predictor import Prediction

log = logging.getLogger("segreport.inference")


class SliceWisePredictor:
    """A :class:`~segreport.inference.predictor.Predictor` for 2D models (see the module docstring).

    ``image_size``, ``window`` and ``threshold`` come from the checkpoint's spec (the minimum lesion size
    is applied once, by the run's per-case path: :func:`segreport.run.batch.case_report`);
    ``batch_size``, ``bf16`` and ``device`` are run-time choices.
    """

    takes_points = False  # a 2D model takes no clicks: the batch report says any given were ignored

    def __init__(self, name: str, forward: Callable[..., dict], image_size: int, window: str = "lung",
                 decode: Callable[[torch.Tensor], list[str]] | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 16, threshold: float = 0.5, bf16: bool = False,
                 extras: dict | None = None, needs_lungs: bool = False, takes_levels: bool = False):
        self.name, self.forward, self.decode = name, forward, decode
        self.image_size, self.window = int(image_size), window
        self.device, self.batch_size, self.bf16 = torch.device(device), int(batch_size), bool(bf16)
        self.threshold = float(threshold)
        self.extras = dict(extras or {})
        self.needs_lungs = bool(needs_lungs)  # a lung-lesion model: the batch refuses scans without lungs
        self.takes_levels = bool(takes_levels)  # forward(images, level=...): each slice's place in the lungs
        self.checkpoint_path: str | None = None

    def probabilities(self, image: np.ndarray, affine: np.ndarray, slice_prompts: Callable[[np.ndarray], dict] | None = None,
                      collected: dict | None = None, **prompts) -> tuple[np.ndarray, dict[int, str]]:
        """Lesion probability on the file grid and the model's sentence per file axial slice index.

        ``slice_prompts(file_slice_indices) -> {name: tensor (B, ...)}``: prompts that differ per slice
        (a text-guided model's sentence for each slice's level), asked for each batch of slices.
        ``collected``: filled with the forward's per-slice outputs (module docstring), by file slice index.
        """
        with stage("preprocess"):
            # a tensor over the volume's own memory (no copy): windowing keeps its layout, and a NIfTI
            # volume's (Fortran) order is already the display slices' order, so nothing is transposed
            windowed = HUWindow(preset=self.window)(torch.from_numpy(np.asarray(image, dtype=np.float32))[None])
            shown = to_display(windowed.as_tensor() if isinstance(windowed, MetaTensor) else windowed, affine)  # (1, rows, cols, n)
            slices = shown[0].as_tensor().permute(2, 0, 1).contiguous()  # (n, rows, cols)
        n, size2d = slices.shape[0], tuple(slices.shape[1:])
        prob = torch.zeros((n, *size2d), dtype=torch.float32)
        texts: dict[int, str] = {}
        file_index = display_to_file_index(shown, affine, axial_axis(affine))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        for start in range(0, n, self.batch_size):
            with stage("preprocess"):
                chunk = slices[start:start + self.batch_size, None].to(self.device)
                x = F.interpolate(chunk, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
                per_slice = {} if slice_prompts is None else {
                    k: v.to(self.device) for k, v in slice_prompts(file_index[start:start + len(chunk)]).items()}
            with stage("model"), torch.inference_mode(), autocast:
                out = self.forward(x, **prompts, **per_slice)
            with stage("postprocess"):
                if "seg_logits" in out:
                    logits = F.interpolate(out["seg_logits"].float(), size=size2d, mode="bilinear", align_corners=False)
                    prob[start:start + len(chunk)] = torch.sigmoid(logits)[:, 0].cpu()
                if "tokens" in out and self.decode is not None:
                    for i, text in enumerate(self.decode(out["tokens"])):
                        texts[int(file_index[start + i])] = text
                if collected is not None:
                    self._collect(out, collected, start, file_index, shown, size2d, affine)
        with stage("postprocess"):
            return from_display(prob.permute(1, 2, 0)[None], shown)[0], texts

    def _collect(self, out: dict, collected: dict, start: int, file_index, shown, size2d, affine) -> None:
        for name, values in (out.get("slice_values") or {}).items():
            for i, row in enumerate(values.float().cpu().tolist()):
                collected.setdefault(name, {})[int(file_index[start + i])] = row
        if "slice_points" not in out:
            return
        pts, valid = out["slice_points"].float().cpu().numpy(), out["slice_points_valid"].cpu().numpy()
        scale = np.array(size2d, dtype=np.float64) / self.image_size
        for i in range(len(pts)):
            display = [[r * scale[0] - 0.5, c * scale[1] - 0.5, start + i] for (r, c), ok in zip(pts[i], valid[i]) if ok]
            if not display:
                continue
            ijk = map_points(np.array(display), np.asarray(shown.affine), affine)
            world = apply_affine(np.asarray(affine, np.float64), ijk)
            collected.setdefault("prompt_points", {})[int(file_index[start + i])] = [
                {"ijk": [round(float(v), 1) for v in p], "ras_mm": [round(float(v), 1) for v in w]} for p, w in zip(ijk, world)]

    @staticmethod
    def _level_prompts(image: np.ndarray, affine: np.ndarray, lung) -> Callable[[np.ndarray], dict]:
        """Each slice's level (:func:`~segreport.transforms.lung_regions.slice_levels`; the lung label is
        thresholded from the CT when not given), as a per-slice prompt."""
        if lung is None:
            lung = lung_label_from_ct(image, affine)
        levels = torch.as_tensor(slice_levels(lung, affine), dtype=torch.float32)
        return lambda file_indices: {"level": levels[np.asarray(file_indices)]}

    def predict(self, image: np.ndarray, affine: np.ndarray, points=None, point_labels=None, lung=None,
                slice_prompts: Callable[[np.ndarray], dict] | None = None, **prompts) -> Prediction:
        if points is not None and len(points):
            log.warning("%s takes no clicks: %d point(s) ignored", self.name, len(points))
        if self.takes_levels and slice_prompts is None:
            slice_prompts = self._level_prompts(image, affine, lung)
        collected: dict = {}
        prob, texts = self.probabilities(image, affine, slice_prompts=slice_prompts, collected=collected, **prompts)
        with stage("postprocess"):
            mask = (prob > self.threshold).astype(np.uint8)
        axis = axial_axis(affine)
        lesion_slices = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        return Prediction(mask=mask, slice_findings={int(k): texts[int(k)] for k in lesion_slices if int(k) in texts},
                          extras={**self.extras, **{k: {str(s): v for s, v in sorted(d.items())} for k, d in collected.items()}})
