"""The MONAI Label train task: a bundle's own train config on the studies' labels.

The labelled studies (``<studies>/labels/final/``, what a viewer saves) are linked into an
``imagesTr/`` + ``labelsTr/`` folder under the app (``<app>/train/<name>/data``), the layout every
bundle's ``--dataset_dir`` reads, and ``monai.bundle run training`` runs the bundle's ``train.yaml``
exactly as on the command line. Training **fine-tunes the served weights** (``initial_weights``; a request
with ``"from_scratch": true`` starts from random ones) and validates them before the first epoch, so the
best-scoring weights of the run are the served ones unless an epoch beats them: a ``max_epochs``-bounded
run never replaces a better model. The result goes to ``<app>/model/<name>/model.pt``, which the infer
task of the same name serves from then on (it reloads when the file changes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from time import perf_counter

from fastapi import HTTPException
from monailabel.interfaces.tasks.train import TrainTask

from ..data.io import is_nifti
from .server import trained_weights
from .tasks import _flag


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    from ..models.spec import read_checkpoint

    wa, wb = (read_checkpoint(p)[1] for p in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class BundleTrainTask(TrainTask):
    """Train bundle ``name`` on the studies' final labels. Request: ``max_epochs``, ``from_scratch`` (default
    false: fine-tune the served weights), and ``config``: other train.yaml ids to override (e.g.
    ``{"spacing": [3, 3, 5]}``; fine-tuning needs the configuration the served weights were trained with)."""

    def __init__(self, name: str, bundle: str | os.PathLike, app_dir: str | os.PathLike, epochs: int = 8,
                 min_cases: int = 3):
        super().__init__(f"Train {name} with its bundle's train.yaml on the labelled studies")
        self.name, self.bundle, self.app_dir = name, Path(bundle).absolute(), Path(app_dir)
        self.epochs, self.min_cases = int(epochs), int(min_cases)

    def config(self) -> dict:
        return {"max_epochs": self.epochs}

    def labelled(self, datastore) -> list[dict]:
        """The studies training can use; too few is refused with a 422 (also before the task is queued:
        segreport.label.asgi)."""
        items = [d for d in datastore.datalist() if d.get("label") and is_nifti(d["image"]) and is_nifti(d["label"])]
        if len(items) < self.min_cases:
            raise HTTPException(422, detail=f"{self.name}: {len(items)} labelled NIfTI studies, training needs at least "
                                            f"{self.min_cases} (save final labels first)")
        return items

    def dataset(self, datastore) -> Path:
        """``imagesTr/`` + ``labelsTr/`` of links to the labelled studies (remade every run)."""
        items = self.labelled(datastore)
        root = self.app_dir / "train" / self.name / "data"
        shutil.rmtree(root, ignore_errors=True)
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True)
        for item in items:
            name = Path(item["image"]).name
            os.symlink(os.path.realpath(item["image"]), root / "imagesTr" / name)
            os.symlink(os.path.realpath(item["label"]), root / "labelsTr" / name)
        return root

    def __call__(self, request: dict, datastore) -> dict:
        from monai.bundle import run

        try:
            epochs = int(request.get("max_epochs", self.epochs))
        except (TypeError, ValueError):
            raise HTTPException(422, detail=f"max_epochs must be an integer, got {request.get('max_epochs')!r}") from None
        if epochs < 1:
            raise HTTPException(422, detail=f"max_epochs must be at least 1, got {epochs}")
        overrides = request.get("config") or {}  # any train.yaml id, as `--id value` on the command line
        if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
            raise HTTPException(422, detail=f"config must be an object of train.yaml ids and values, got {overrides!r}"[:300])
        data = self.dataset(datastore)
        work = self.app_dir / "train" / self.name
        served = self.app_dir / "model" / self.name / "model.pt"
        initial = None if _flag(request.get("from_scratch")) else trained_weights(self.bundle, self.app_dir)
        candidate = work / "candidate"  # this run's checkpoints; the served file changes only at the end
        shutil.rmtree(candidate, ignore_errors=True)
        configs = self.bundle / "configs"
        start = perf_counter()
        run("training", config_file=[str(configs / "train.yaml")], bundle_root=str(self.bundle), dataset_dir=str(data),
            output_dir=str(work / "outputs"), ckpt_dir=str(candidate),
            **{**overrides, "epochs": epochs, "initial_weights": initial and str(initial)})
        best = candidate / "model.pt"  # the best validation's weights (the starting ones validated too)
        if not best.is_file():  # no validation ran (a val_interval beyond the run, from scratch)
            best = candidate / "model_final.pt"
        kept = initial is not None and _same_weights(best, initial)
        if not kept:  # kept: what was served stays served
            served.parent.mkdir(parents=True, exist_ok=True)
            tmp = served.with_name(f".{served.name}.tmp")
            shutil.copy(best, tmp)
            os.replace(tmp, served)  # atomic: the infer task never reads half a file
        stats = {"model": self.name, "checkpoint": str(served), "epochs": epochs, "started_from": initial and str(initial),
                 "replaced_served_weights": not kept, "cases": len(list((data / "imagesTr").iterdir())),
                 "train_seconds": round(perf_counter() - start, 1)}
        (work / "last_run.json").write_text(json.dumps(stats, indent=2))
        return stats
