"""MONAI Label infer tasks over segreport's predictors (the model seam, :func:`segreport.models.load`).

``BundleInferTask`` cannot serve these bundles (their inference is a predictor, not network_def /
pre-processing / inferer), so each task is a small ``InferTask`` that loads the bundle's predictor and
returns what ``segreport infer`` writes for one case: the mask on the image's own grid (a NIfTI with the
image's affine) and, as the result JSON, the batch report (finding, lesions with volume, centroid, side,
zone and attributes, the ``consistency`` block) plus latencies.

- :class:`InteractiveTask` (the 3D lesion report): clicks as 3D Slicer sends them (``foreground`` /
  ``background`` IJK lists) or as OHIF does (``points`` + ``point_labels``). A
  :class:`~segreport.inference.session.PromptSession` per image lives on the task (a bounded LRU cache,
  ``reset_state`` starts over), so a further click reruns only the prompt side.
- :class:`AutomaticTask`: MedSegText (whole volume -> mask + findings) and the text-guided TMC / LAPFT
  (``text`` in the request, or the finding of the served MedSegText: two tasks chained).

Bad requests become ``HTTPException(4xx)`` with a ``detail`` that names the problem; anything else a
500 that still says what failed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy

from ..data.outputs import to_jsonable
from ..errors import InputError
from ..inference.clicks import MAX_CLICKS, parse_clicks
from ..inference.predictor import min_lesion_ml_of
from ..run.batch import RunSettings, case_report
from ..run.bundles import checkpoint_info, load_bundle_predictor
from ..run.cases import Case, LoadedCase, load_case
from ..run.guide_texts import finding_of
from ..run.report_box import image_context
from ..vocab import MIN_LUNG_ML
from .server import weight_paths

log = logging.getLogger("segreport.label")
LABELS = {"lesion": 1}


class BadRequest(InputError):
    """A request the task cannot run (HTTP 422): malformed params, a negative first click ..."""


class BundleWeights:
    """The checkpoint a task serves, and its predictor, reloaded when the file changes.

    The app's own weights (``<app>/model/<name>/model.pt``, written by MONAI Label training) come
    first, then the bundle's (``<bundle>/models/model.pt``, where its train config writes them)."""

    def __init__(self, bundle: str | os.PathLike, app_dir: str | os.PathLike, device: str):
        self.bundle, self.device = Path(bundle), device
        self.paths = weight_paths(self.bundle, Path(app_dir))
        self._key: tuple | None = None
        self._predictor = None
        self._settings: RunSettings | None = None

    def current(self) -> Path | None:
        return next((p for p in self.paths if p.is_file()), None)

    def predictor(self):
        path = self.current()
        if path is None:
            raise HTTPException(503, detail=f"no trained weights at {' or '.join(map(str, self.paths))}")
        key = (str(path), path.stat().st_mtime_ns)
        if key != self._key:
            self._predictor, _ = load_bundle_predictor(self.bundle, checkpoint=str(path), device=self.device)
            self._key, self._settings = key, None
            log.info("%s: serving %s", self.bundle.name, path)
        return self._predictor

    def settings(self, name: str) -> RunSettings:
        """What the batch would record for the served checkpoint (its sha256 hashed once per checkpoint)."""
        predictor = self.predictor()
        if self._settings is None:
            self._settings = RunSettings(name, (checkpoint_info(self.current()) or {}).get("sha256"),
                                         bool(getattr(predictor, "takes_points", True)), min_lesion_ml_of(predictor),
                                         (getattr(predictor, "spec", None) or {}).get("training"))
        return self._settings

    @property
    def version(self) -> tuple | None:
        """Changes whenever a new checkpoint is loaded (cached per-image state is then stale)."""
        return self._key


def _case(request: dict) -> Case:
    """The request's image as a batch case: its datastore id, or its file name without extensions."""
    path = str(request.get("image"))
    return Case(str(request.get("image_id") or Path(path).name.split(".")[0]), path)


class ReportTask(InferTask):
    """What every segreport task shares: the weights, reading the image as the batch does, the report."""

    def __init__(self, name: str, weights: BundleWeights, type: InferType, description: str, config: dict | None = None):
        super().__init__(type=type, labels=LABELS, dimension=3, description=description, config=config or {})
        self.name, self.weights = name, weights

    def is_valid(self) -> bool:
        return self.weights.current() is not None

    def get_path(self, validate: bool = True):
        path = self.weights.current()
        return None if path is None else str(path)

    def __call__(self, request: dict) -> tuple[str, dict]:
        try:
            return self.run(request)
        except HTTPException:
            raise
        except InputError as exc:  # the request or the image: the caller's to fix
            raise HTTPException(422, detail=str(exc)) from exc
        except Exception as exc:  # ours: still a message, never a bare 500
            log.exception("%s failed", self.name)
            raise HTTPException(500, detail=f"{self.name} failed on {request.get('image')}: {type(exc).__name__}: {exc}") from exc

    def run(self, request: dict) -> tuple[str, dict]:
        raise NotImplementedError

    def load(self, request: dict, predictor) -> LoadedCase:
        """The image as the batch reads it: a plausible CT in HU, its lung label and zones."""
        path = request.get("image")
        if not path or not os.path.exists(path):
            raise HTTPException(404, detail=f"image {request.get('image_id', path)!r} not found")
        min_lung = MIN_LUNG_ML if getattr(predictor, "needs_lungs", False) else None
        return load_case(_case(request), min_lung_ml=min_lung)

    def result(self, request: dict, loaded: LoadedCase, prediction, timings: dict, **extra) -> tuple[str, dict]:
        """The label file (the image's grid and affine) and, as the result JSON, the report the batch writes
        for the same case and mask (:func:`segreport.run.batch.case_report`), plus latencies."""
        t = perf_counter()
        report, _, _ = case_report(_case(request), loaded, prediction, self.weights.settings(self.name),
                                   points=extra.pop("points", None))
        fd, label = tempfile.mkstemp(suffix=".nii.gz", prefix=f"segreport_{self.name}_")
        os.close(fd)  # MONAI Label sends the file, then deletes it
        loaded.save_mask(prediction.mask, label)
        timings["report_s"] = perf_counter() - t  # the batch report and the label file
        timings["total_s"] = perf_counter() - timings.pop("_start")
        report.update(extra, latency_s={k: round(v, 4) for k, v in timings.items()},
                      checkpoint=str(self.weights.current()), label_names=LABELS)  # label_names: Slicer names the segment
        return label, to_jsonable(report)


# ------------------------------------------------------------------------------------ clicks
MAX_TEXT_CHARS = 2000


def request_clicks(request: dict) -> tuple[list[tuple[tuple[float, float, float], int]], bool]:
    """``([(ijk, label), ...], ordered)`` from a request: OHIF's ``points`` + ``point_labels`` (in click
    order) or 3D Slicer's ``foreground`` / ``background`` lists (order between the two lists unknown).
    At most :data:`MAX_CLICKS`, counted before any is read; each click checked by the one parser
    (:func:`~segreport.inference.clicks.parse_clicks`; inside the image: by the session)."""
    given = sum(len(request.get(k) or []) for k in ("points", "foreground", "background")
                if isinstance(request.get(k), (list, tuple)))
    if given > MAX_CLICKS:
        raise BadRequest(None, f"{given} clicks in one request; at most {MAX_CLICKS}")
    try:
        if request.get("points") is not None:
            ijk, labels = parse_clicks(request["points"], request.get("point_labels"), what="points")
            return [(tuple(p), v) for p, v in zip(ijk.tolist(), labels)], True
        fg = parse_clicks(request.get("foreground"), what="foreground")[0].tolist()
        bg = parse_clicks(request.get("background"), what="background")[0].tolist()
    except InputError as exc:
        raise BadRequest(None, exc.problem) from None
    return [(tuple(p), 1) for p in fg] + [(tuple(p), 0) for p in bg], False


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() in ("1", "true", "yes")


@dataclass
class ImageState:
    """One image's prompt session and the case it was made from, valid for one checkpoint."""

    loaded: LoadedCase
    session: Any
    version: tuple | None


class InteractiveTask(ReportTask):
    """Clicks -> the lesion's mask, attributes and sentence (a :class:`PromptSession` per image).

    Slicer and OHIF send every click of the image so far with each request: the clicks the session has
    not seen are the new ones. The first click places the ROI and encodes it; a further click only
    decodes. When a click the session has seen is missing from the request (the user removed it), or on
    ``reset_state``, the session starts over with the clicks sent. With no click at all the ROI is placed
    automatically, as in a batch run."""

    def __init__(self, name: str, weights: BundleWeights, max_images: int = 4):
        super().__init__(name, weights, InferType.DEEPGROW,
                         "Click a lesion: its outline, attributes with probabilities and the structured report",
                         config={"reset_state": False})
        self.max_images = max(1, int(max_images))
        self.states: OrderedDict[str, ImageState] = OrderedDict()

    def reset_state(self, image: str | None = None) -> None:
        """Forget one image's session (or all): the next click places a new ROI."""
        if image is None:
            self.states.clear()
        else:
            self.states.pop(image, None)

    def _state(self, request: dict, predictor) -> tuple[ImageState, float]:
        key = str(request["image"])
        if _flag(request.get("reset_state")):
            self.reset_state(key)
        state = self.states.get(key)
        load_s = 0.0
        if state is None or state.version != self.weights.version:
            t = perf_counter()
            loaded = self.load(request, predictor)
            # what a report needs of the image, once: each further click rebuilds only the lesion part
            loaded.report_context = image_context(loaded.image, loaded.affine, loaded.lung, loaded.zones)
            session = predictor.session()
            session.set_image(loaded.image, loaded.affine, source=request.get("image_id") or key)
            state = ImageState(loaded, session, self.weights.version)
            load_s = perf_counter() - t
        self.states[key] = state
        self.states.move_to_end(key)
        while len(self.states) > self.max_images:  # bounded: the least recently clicked image goes
            self.states.popitem(last=False)
        return state, load_s

    def run(self, request: dict) -> tuple[str, dict]:
        timings = {"_start": perf_counter()}
        clicks, ordered = request_clicks(request)
        predictor = self.weights.predictor()
        if not getattr(predictor, "takes_points", False):
            raise HTTPException(409, detail=f"{self.name}'s checkpoint takes no clicks")
        state, timings["load_s"] = self._state(request, predictor)
        session = state.session
        seen = [(tuple(round(v, 3) for v in p), lab) for p, lab in session.clicks]
        seen += [(tuple(round(v, 3) for v in c["ijk"]), c["label"]) for c in session.ignored]
        sent = [(tuple(round(v, 3) for v in p), lab) for p, lab in clicks]
        new = list(sent)
        for click in seen:
            if click not in new:  # a click was taken back: start over with what was sent
                session.reset()
                new = list(sent)
                break
            new.remove(click)
        if not session.clicks and not ordered:
            new.sort(key=lambda c: -c[1])  # Slicer: positives first (the first click says "this lesion")
        encodes, t = session.n_encodes, perf_counter()
        if not sent:  # as a batch run: every lesion (automatic mode), or the one automatic ROI
            automatic = getattr(predictor, "automatic", False)
            prediction = session.find_all(state.loaded.lung, predictor.search) if automatic else session.auto(state.loaded.lung)
        elif not new and session.last is not None:
            prediction = session.last  # nothing new: the same answer
        else:
            prediction = None
            for point, label in new:
                prediction = session.click(point, positive=bool(label))
        timings["predict_s"] = perf_counter() - t
        points = {"ijk": [list(p) for p, _ in session.clicks], "labels": [lab for _, lab in session.clicks]}
        return self.result(request, state.loaded, prediction, timings, points=points,
                           image_encoded=session.n_encodes > encodes, n_encodes=session.n_encodes,
                           cached_images=len(self.states))


class AutomaticTask(ReportTask):
    """The whole volume -> mask + findings (MedSegText), or guided by a sentence (TMC, LAPFT): the
    request's ``text``, else the finding of ``text_from`` (the served MedSegText task)."""

    def __init__(self, name: str, weights: BundleWeights, text_guided: bool = False, text_from: ReportTask | None = None):
        what = "guided by a finding sentence" if text_guided else "whole volume"
        super().__init__(name, weights, InferType.SEGMENTATION,
                         f"Lesion mask and report ({what})", config={"text": ""} if text_guided else {})
        self.text_guided, self.text_from = text_guided, text_from

    def _guide_text(self, request: dict, loaded: LoadedCase) -> tuple[str, str]:
        text = request.get("text")
        if text not in (None, ""):
            if not isinstance(text, str):
                raise BadRequest(None, f"text must be a string, got {text!r}"[:300])
            if len(text) > MAX_TEXT_CHARS:
                raise BadRequest(None, f"text of {len(text)} characters; a finding has at most {MAX_TEXT_CHARS}")
            return text, "request text"
        if self.text_from is None:
            raise BadRequest(None, f"{self.name} segments what a sentence says: give params.text (e.g. "
                                   f"'Unilateral pulmonary infection, one infected area, lower left lung.') or serve "
                                   f"medsegtext beside it to chain from its finding")
        source = self.text_from.weights.predictor()
        finding = finding_of(source, Case(str(request.get("image_id") or ""), str(request["image"])), loaded)
        return finding, f"findings of {self.text_from.name} ({self.text_from.weights.current()})"

    def run(self, request: dict) -> tuple[str, dict]:
        timings = {"_start": perf_counter()}
        predictor = self.weights.predictor()
        t = perf_counter()
        loaded = self.load(request, predictor)
        timings["load_s"] = perf_counter() - t
        kwargs, source = {}, None
        if self.text_guided:
            t = perf_counter()
            with torch.inference_mode():
                kwargs["text"], source = self._guide_text(request, loaded)
            timings["guide_text_s"] = perf_counter() - t
        t = perf_counter()
        with torch.inference_mode():
            prediction = predictor.predict(loaded.image, loaded.affine, lung=loaded.lung, **kwargs)
        timings["predict_s"] = perf_counter() - t
        if source is not None:
            prediction.extras["guide_text_source"] = source
        return self.result(request, loaded, prediction, timings)


class Last(Strategy):
    """Active learning: the last unlabelled image by id (MONAI Label ships ``random`` and ``first``)."""

    def __init__(self):
        super().__init__("Get Last Sample")

    def __call__(self, request, datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        return {"id": images[-1]} if images else None


class BatchInfer(BatchInferTask):
    """MONAI Label's batch inference on the app's device. Its default body spreads the images over every
    GPU, so on a server without one it divided by zero (HTTP 500); here a request names no GPU it does
    not have."""

    def __init__(self, device: str):
        super().__init__()
        self.device = device

    def __call__(self, request, datastore, infer):
        if not torch.cuda.is_available() or not str(self.device).startswith("cuda"):
            request = {**request, "multi_gpu": False, "device": self.device}
        return super().__call__(request, datastore, infer)

