"""``SegreportLabelApp``: the ``MONAILabelApp`` that serves segreport's bundles.

The app folder's ``main.py`` (written by ``segreport label``) only imports this class; MONAI Label
finds it there. Its ``conf`` (``--conf key value`` of ``monailabel start_server``):

- ``bundles``: bundle folders, ``os.pathsep``-separated; each one's task is named after its folder;
- ``device``: ``cpu`` / ``cuda`` (default: cuda when available);
- ``max_images``: prompt sessions kept by the interactive task (default 4).

Which task a bundle gets follows from its predictor: one that takes clicks -> the interactive task
(``deepgrow`` type, Slicer's and OHIF's click tools), one that takes a sentence -> a text-guided task
chained from the served MedSegText, anything else -> an automatic task.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp

from .. import __version__
from .tasks import LABELS, AutomaticTask, BatchInfer, BundleWeights, InteractiveTask, Last, ReportTask
from .training import BundleTrainTask

log = logging.getLogger("segreport.label")


def conf_bundles(conf: dict) -> list[Path]:
    value = conf.get("bundles") or ""
    return [Path(p).absolute() for p in value.split(os.pathsep) if p]


class SegreportLabelApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict):
        self.bundles = conf_bundles(conf)
        self.device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_images = int(conf.get("max_images", 4))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="segreport",
                         description="Lung-lesion masks with their findings, attributes and sentences (segreport)",
                         version=__version__, labels=LABELS)

    def init_infers(self) -> dict[str, ReportTask]:
        infers: dict[str, ReportTask] = {}
        for bundle in self.bundles:
            weights = BundleWeights(bundle, self.app_dir, self.device)
            if weights.current() is None:
                log.warning("%s: no trained weights (%s): not served", bundle.name, " or ".join(map(str, weights.paths)))
                continue
            predictor = weights.predictor()  # a broken checkpoint stops the server here, with its reason
            if getattr(predictor, "takes_points", False):
                infers[bundle.name] = InteractiveTask(bundle.name, weights, self.max_images)
            else:
                infers[bundle.name] = AutomaticTask(bundle.name, weights, text_guided=getattr(predictor, "takes_text", False))
        # the text-guided tasks take their sentence, when the request gives none, from the served MedSegText
        writer = next((t for t in infers.values() if isinstance(t, AutomaticTask) and not t.text_guided
                       and t.weights.predictor().spec.get("kind") == "medsegtext"), None)
        for task in infers.values():
            if isinstance(task, AutomaticTask) and task.text_guided:
                task.text_from = writer
        return infers

    def init_strategies(self) -> dict:
        """Those of MONAI Label's radiology sample. No epistemic strategy: it needs dropout in the mask path,
        and none of the served networks has it (MedSegText's dropout is in its text decoder)."""
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        return {"random": Random(), "first": First(), "last": Last()}

    def init_scoring_methods(self) -> dict:
        """``dice``: each image's saved label (``y``, default the final one) against the model's saved
        prediction (``y_pred``, default ``original``, what batch inference saves)."""
        from monailabel.tasks.scoring.dice import Dice

        return {"dice": Dice()}

    def init_batch_infer(self) -> BatchInfer:
        return BatchInfer(self.device)

    def init_trainers(self) -> dict[str, BundleTrainTask]:
        return {b.name: BundleTrainTask(b.name, b, self.app_dir) for b in self.bundles
                if (b / "configs" / "train.yaml").is_file()}

    def infer(self, request: dict, datastore=None):
        """MONAI Label's infer, with the unknown model or image as a 404 instead of an error 500."""
        model, image = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(404, detail=f"unknown model {model!r}; this server has {sorted(self._infers)}")
        if isinstance(image, str):
            store = datastore or self.datastore()
            if not self._serves(image, store):  # the same answer whether or not such a file exists
                raise HTTPException(404, detail=f"unknown image {image!r}: not an image of this server's studies")
            request = {**request, "image_id": image if not os.path.exists(image) else Path(image).name.split(".")[0]}
        return super().infer(request, datastore)

    def _serves(self, image: str, store) -> bool:
        """Whether ``image`` is one this server may read: an image id of its datastore, or a path whose
        real location (symlinks and ``..`` resolved) is inside the studies folder or MONAI Label's session
        uploads. Any other path on the host is refused, existing or not."""
        from monailabel.config import settings

        if not isinstance(store, LocalDatastore):  # DICOMweb: the datastore's ids only (the task 404s a failed fetch)
            roots = [settings.MONAI_LABEL_SESSION_PATH]
            if not os.path.exists(image):
                return True
        else:
            if not os.path.exists(image) and store.get_image_uri(image):
                return True
            roots = [self.studies, settings.MONAI_LABEL_SESSION_PATH]
        real = Path(os.path.realpath(image))
        return any(root and (real == Path(os.path.realpath(root)) or Path(os.path.realpath(root)) in real.parents)
                   for root in roots)

    def train(self, request: dict):
        if request.get("model") not in self._trainers:
            raise HTTPException(404, detail=f"unknown training task {request.get('model')!r}; this server has "
                                            f"{sorted(self._trainers)}")
        return super().train(request)
