"""Interactive 3D lesion report (seed 001) adapter: the network factory (the paper's model and its
baselines), its checkpoint spec, and the predictor built from it (clicks through the shared
:class:`~segreport.inference.session.PromptSession`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from ..errors import InputError
from ..inference.automatic import SearchSettings, midline_x, search as sliding_window_search
from ..inference.geometry import as_affine, auto_roi_center, map_points, roi_to_original
from ..inference.predictor import LesionAttributes, Prediction
from ..inference.session import PromptSession, attribute_probabilities, attributes_sentence, is_promptable
from ..networks.baselines3d import AttributeCNN, unet_baseline
from ..networks.lesion_prompt import LesionPromptNet
from ..transforms.crop import CropLargestLesion
from ..transforms.lung_mask import lung_mask_from_ct
from ..transforms.volume import volume_transforms
from .spec import build_network as build_from_spec, load_weights, make_spec

KIND = "lesion_report_3d"
# ROI growth for lesions larger than one ROI, when neither the run nor the checkpoint says: up to this many
# ROIs per lesion (each one more encode; the bound keeps a vessel-following mask from crossing the scan)
DEFAULT_MAX_ROIS = 4


class DictOutput(nn.Module):
    """Names a baseline's output like ``LesionPromptNet``'s (``mask_logits`` / ``attr_logits``), so the
    loss, the click inferer (which just calls a network without ``decode``) and evaluation take any model."""

    def __init__(self, net: nn.Module, key: str):
        super().__init__()
        self.net, self.key = net, key

    def forward(self, image: torch.Tensor) -> dict:
        return {self.key: self.net(image)}


# baseline sizes: "tiny" for CPU runs beside the tiny LesionPromptNet, "paper" = the modules' defaults
BASELINE_CONFIGS = {
    "unet": {"tiny": dict(features=(8, 8, 16, 32, 64, 8)), "paper": {}},
    "cnn_attr": {"tiny": dict(block_inplanes=(8, 16, 32, 64)), "paper": {}},
}


MODELS = ("lesion_prompt", "unet", "cnn_attr")
# switches of earlier specs that were measured and dropped, with the one behaviour the network kept:
# a spec that wrote the kept value rebuilds; one that asked for the dropped behaviour is refused
RETIRED_SWITCHES = {"click_affinity": False, "full_res_conv": None, "high_res_features": False}


def _check_retired(backbone: str, retired: Mapping[str, Any]) -> None:
    for key, value in retired.items():
        kept = RETIRED_SWITCHES[key]
        ignored = key == "high_res_features" and backbone != "vit"  # a ViT-only switch the U-Net never read
        if value != kept and not ignored:
            raise ValueError(f"{key}={value!r} was measured and dropped from LesionPromptNet (docs/results-history.md); "
                             "; retrain the model, or run it with the segreport version that trained it")


def build_network(
    model: str = "lesion_prompt",
    config: str = "tiny",
    roi_size: int = 32,
    point_refinement: bool = True,
    synergy: bool = True,
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    window: str | Sequence[float] = "lung",
    axcodes: str = "RAS",
    backbone: str = "vit",
    lesion_pooling: bool = False,
    attr_gradient: str = "full",
    click_components: bool = False,
    **overrides: Any,
) -> nn.Module:
    """The bundle's network: ``lesion_prompt`` (seed 001's model) or a baseline of its comparison tables,
    ``unet`` (Table 2, seg-only, no clicks) or ``cnn_attr`` (Table 3, attributes only), both from
    :mod:`segreport.networks.baselines3d`. ``backbone``, ``lesion_pooling``, ``attr_gradient`` and
    ``click_components`` select the interactive model's variant (:class:`LesionPromptNet`); their defaults
    are the paper's model, so a spec written before they existed rebuilds what it trained. Switches that
    were dropped (:data:`RETIRED_SWITCHES`) are accepted only at the value the network kept.

    The full description (model, sizes, switches AND the pre-processing: spacing, window, axcodes)
    is kept on ``network.spec`` and saved as the network part of every checkpoint's spec
    (:func:`spec_for`), so evaluation and inference rebuild the same model and pre-process exactly as
    in training.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {MODELS}")
    _check_retired(backbone, {k: overrides.pop(k) for k in RETIRED_SWITCHES if k in overrides})
    if model == "lesion_prompt":
        net = LesionPromptNet.from_config(config, img_size=int(roi_size), point_refinement=bool(point_refinement),
                                          synergy=bool(synergy), backbone=backbone, lesion_pooling=bool(lesion_pooling),
                                          attr_gradient=attr_gradient, click_components=bool(click_components), **overrides)
    elif model == "unet":
        net = DictOutput(unet_baseline(**{**BASELINE_CONFIGS[model][config], **overrides}), "mask_logits")
    else:
        net = DictOutput(AttributeCNN(**{**BASELINE_CONFIGS[model][config], **overrides}), "attr_logits")
    net.spec = {
        "model": model, "config": config, "roi_size": int(roi_size), "point_refinement": bool(point_refinement),
        "synergy": bool(synergy), "spacing": [float(s) for s in spacing],
        "window": window if isinstance(window, str) else [float(w) for w in window], "axcodes": axcodes,
        **({"backbone": backbone, "lesion_pooling": bool(lesion_pooling), "attr_gradient": attr_gradient,
            "click_components": bool(click_components)} if model == "lesion_prompt" else {}),
        **overrides,
    }  # fmt: skip
    return net


def _unwrap(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel / DataParallel


is_interactive = is_promptable  # the paper's model takes clicks; the baselines do not


def spec_for(network: nn.Module, threshold: float = 0.5, training: Mapping | None = None) -> dict:
    """The checkpoint spec: build arguments (which hold the pre-processing too) and the threshold."""
    args = dict(_unwrap(network).spec)
    return make_spec(KIND, "segreport.models.lesion_report_3d.build_network", args,
                     preprocessing={k: args[k] for k in ("spacing", "window", "axcodes", "roi_size")},
                     inference={"threshold": float(threshold)}, training=training)


def trained(spec: Mapping, weights: Mapping) -> nn.Module:
    return load_weights(build_from_spec(spec), weights).eval()


def predictor(spec: Mapping, weights: Mapping, device: str = "cpu", threshold: float | None = None,
              bf16: bool = False, max_rois: int | None = None, automatic: bool | None = None,
              overlap: float | None = None, sw_batch_size: int | None = None, outline_min_ml: float | None = None,
              **_: Any) -> "LesionReportPredictor":
    """``bf16`` is applied by the batch runner's autocast; ``max_rois``: ROI growth for lesions larger than
    the ROI (1 = off; default the spec's); ``automatic``: without clicks, every lesion by sliding window
    (default) or one automatically placed ROI (False); ``overlap``/``sw_batch_size``/``outline_min_ml``:
    the search's (:class:`SearchSettings`). Other run-time options are ignored."""
    inference = spec["inference"]
    search = SearchSettings(**{k: v for k, v in (("overlap", overlap), ("sw_batch_size", sw_batch_size),
                                                 ("outline_min_ml", outline_min_ml)) if v is not None})
    return LesionReportPredictor(trained(spec, weights), device=device,
                                 threshold=inference["threshold"] if threshold is None else threshold,
                                 max_rois=inference.get("max_rois", DEFAULT_MAX_ROIS) if max_rois is None else max_rois,
                                 automatic=True if automatic is None else bool(automatic), search=search)


class LesionReportPredictor:
    """The ``Predictor`` (segreport.inference.predictor) of the 3D lesion-report bundle.

    With clicks, they are replayed in order through a :class:`PromptSession` (each decode sees
    the previous mask, as in training). Without, the automatic mode finds every lesion
    (:mod:`segreport.inference.automatic`: sliding window, then one simulated click per candidate);
    ``automatic=False`` keeps the single zero-click ROI (:meth:`PromptSession.auto`). The U-Net baseline
    runs the same sliding window (``automatic=False``: the automatically placed ROI); the CNN, which has
    no mask, runs once on that ROI.
    """

    name = "lesion_report_3d"

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", threshold: float = 0.5, max_rois: int = 1,
                 automatic: bool = True, search: SearchSettings | None = None):
        self.device = torch.device(device)
        self.automatic, self.search = bool(automatic), search or SearchSettings()
        self.network = _unwrap(network).to(self.device).eval()
        self.threshold = threshold
        self.max_rois = int(max_rois)
        self.checkpoint_path: str | None = None

    needs_lungs = True  # a lung-lesion model: the batch refuses scans without lungs (--allow-no-lungs)

    @property
    def takes_points(self) -> bool:
        return is_interactive(self.network)  # the baselines run on the automatic ROI only

    def session(self) -> PromptSession:
        return PromptSession(self.network, self.device, self.threshold, self.max_rois)

    def predict(self, image: np.ndarray, affine: np.ndarray, points=None, point_labels=None, lung=None) -> Prediction:
        if not is_interactive(self.network):
            return self._predict_baseline(image, affine, lung)
        session = self.session()
        session.set_image(image, affine)
        if points is None or len(points) == 0:
            return session.find_all(lung, self.search) if self.automatic else session.auto(lung)
        labels = [1] * len(points) if point_labels is None else list(point_labels)
        if len(labels) != len(points):
            raise InputError(None, f"{len(points)} points but {len(labels)} point labels")
        prediction = None
        for point, lab in zip(points, labels):
            prediction = session.click(point, positive=bool(lab))
        return prediction

    def _sliding_window_baseline(self, ct: np.ndarray, affine: np.ndarray, volume: MetaTensor, lung: np.ndarray | None) -> Prediction:
        """The U-Net over the lungs with the automatic mode's windows and candidate rules (no refinement:
        it takes no clicks): the baseline of the same search."""
        lung = lung_mask_from_ct(ct, affine) if lung is None else np.asarray(lung) > 0
        found = sliding_window_search(self.network, volume, as_affine(affine), ct.shape, lung, self.network.spec["roi_size"],
                                      self.device, self.threshold, self.search, midline_x(ct, affine))
        return Prediction(mask=found.mask(), case_finding=None,
                          extras={"mode": "automatic", "windows": found.windows, "candidates": len(found.ids),
                                  "model": self.network.spec["model"]})

    @torch.inference_mode()
    def _predict_baseline(self, image: np.ndarray, affine: np.ndarray, lung: np.ndarray | None = None) -> Prediction:
        spec = self.network.spec
        ct = np.asarray(image, dtype=np.float32)
        volume = volume_transforms(spec["spacing"], spec["window"], spec["axcodes"], keys=("image",))(
            {"image": MetaTensor(torch.from_numpy(ct[None]), affine=torch.as_tensor(as_affine(affine)))})["image"]
        if self.automatic and spec["model"] == "unet":
            return self._sliding_window_baseline(ct, affine, volume, lung)
        center, source = auto_roi_center(ct, lung)
        roi = CropLargestLesion(spec["roi_size"])(volume, center=np.rint(map_points(center, affine, volume.affine)[0]))
        out = self.network(roi.as_tensor()[None].float().to(self.device))
        mask = np.zeros(ct.shape, dtype=np.uint8)
        if "mask_logits" in out:
            prob = torch.sigmoid(out["mask_logits"][0, 0].float())
            mask = (roi_to_original(prob, roi.affine, affine, ct.shape) > self.threshold).astype(np.uint8)
        lesions, finding = [], "No lesion segmented."
        if "attr_logits" in out:  # the CNN has no mask: anchor its attributes at the ROI centre
            attrs = attribute_probabilities(out["attr_logits"])
            lesions, finding = [LesionAttributes(voxel=tuple(int(round(v)) for v in center), attributes=attrs)], attributes_sentence(attrs)
        return Prediction(mask=mask, case_finding=finding, lesion_attributes=lesions,
                          extras={"roi_center_source": f"auto: {source}", "model": spec["model"]})
