"""Training and evaluating promptable models on simulated expert clicks (seed 001, Sec. 2.3), model-free:
any network with ``encode_image``/``decode`` (:mod:`segreport.inference.session`) plugs into MONAI's
SupervisedTrainer/Evaluator through :class:`SimulatedClicksInferer`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import Inferer

from ..inference.session import is_promptable
from ..transforms.clicks import PAD_LABEL, sample_click


def _spacing(net) -> list[float] | None:
    """The model's voxel size (mm) from its ``spec``, i.e. the ROI's; None for a bare network."""
    return (getattr(net, "spec", None) or {}).get("spacing")


class ClickSet:
    """The clicks of each sample of a batch, in ROI voxel coordinates, grown round by round.

    ``spacing``: the ROI's voxel size (mm), so "most interior" is measured in mm on anisotropic grids.
    """

    def __init__(self, batch_size: int, spacing: Sequence[float] | None = None):
        self.points: list[list[tuple[int, ...]]] = [[] for _ in range(batch_size)]
        self.labels: list[list[int]] = [[] for _ in range(batch_size)]
        self.spacing = spacing

    def add(self, b: int, click: tuple[tuple[int, ...], int] | None) -> None:
        if click is not None:
            self.points[b].append(click[0])
            self.labels[b].append(int(click[1]))

    def add_next(self, gt: np.ndarray, pred: np.ndarray | None, rng, jitter: float) -> None:
        """One click per sample: the first positive one inside the lesion for samples with no click yet,
        else a correction in the larger error region (FN -> positive, FP -> negative, eq. 4)."""
        for b in range(len(self.points)):
            first = not self.labels[b] or pred is None
            self.add(b, sample_click(gt[b], None if first else pred[b], rng=rng, jitter=jitter, spacing=self.spacing))

    def counts(self) -> list[int]:
        return [len(lab) for lab in self.labels]

    def tensors(self, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Padded ``(B, N, 3)`` points and ``(B, N)`` labels (padding -1), or (None, None) for no click."""
        n = max(self.counts(), default=0)
        if n == 0:
            return None, None
        pts = torch.zeros((len(self.points), n, 3), dtype=torch.float32)
        labels = torch.full((len(self.points), n), PAD_LABEL, dtype=torch.long)
        for b, (p, lab) in enumerate(zip(self.points, self.labels)):
            if p:
                pts[b, : len(p)] = torch.tensor(p, dtype=torch.float32)
                labels[b, : len(lab)] = torch.tensor(lab)
        return pts.to(device), labels.to(device)


class SimulatedClicksInferer(Inferer):
    """Expert-click simulation (seed 001, Sec. 2.3) as a MONAI inferer, for trainer and evaluator.

    ``clicks=False`` (the batch's choice, e.g. :class:`~segreport.training.lesion_report.LesionBatch`'s
    no-click steps): the whole batch with no click and no previous mask, exactly as the automatic
    mode's sliding windows run the model (per sample, a dropped sample would receive a click in the
    first correction round anyway: measured, only 0.2 x 1/9 of the samples trained without a click at
    ``max_rounds`` 8, and the zero-click search missed most of each diffuse lesion).

    Training (``train=True``), per batch: each sample gets its
    first click inside the lesion, then ``r ~ U{0..max_rounds}`` correction rounds run WITHOUT
    gradient, the image encoded once: decode, compare the prediction with the ground truth, add a
    click from the larger error region (false negatives -> positive, false positives -> negative;
    ``jitter`` randomises where inside it), and feed the prediction back as the dense mask prompt.
    The last state (clicks + previous mask) goes through ``network(...)`` WITH gradient; the trainer
    takes the loss there.
    Sampling the number of rounds (as RITM's iterative training) trains every click count, keeps one
    backward graph per step, and keeps the forward a real ``network(...)`` call, so
    DistributedDataParallel synchronises gradients.

    Evaluation (``train=False``): deterministic ``n_clicks`` (first click at the lesion's most interior
    voxel, then corrections). Baselines (no ``decode``) are simply called on the image.
    """

    def __init__(self, train: bool = True, max_rounds: int = 4, jitter: float = 0.5, n_clicks: int = 3, seed: int = 0):
        super().__init__()
        self.train, self.max_rounds = train, int(max_rounds)
        self.jitter = float(jitter) if train else 0.0
        self.n_clicks = int(n_clicks)
        self.rng = np.random.default_rng(seed)

    def __call__(self, inputs: torch.Tensor, network, label: torch.Tensor | None = None, *args, clicks: bool = True, **kwargs) -> dict:
        if not is_promptable(network):
            return network(inputs)
        b = inputs.shape[0]
        if not clicks:  # a no-click step: as the automatic mode
            outputs = network(inputs)
            outputs["n_clicks"] = torch.zeros(b, dtype=torch.long)
            return outputs
        if label is None:
            raise ValueError("the click simulator needs the ground-truth label (pass it as the inferer's argument)")
        net = getattr(network, "module", network)
        gt = (label[:, 0] > 0.5).cpu().numpy()
        simulated = ClickSet(b, _spacing(net))
        rounds = int(self.rng.integers(0, self.max_rounds + 1)) if self.train else max(self.n_clicks - 1, 0)
        for i in range(b):
            simulated.add(i, sample_click(gt[i], rng=self.rng, jitter=self.jitter, spacing=simulated.spacing))
        prev = None
        if rounds:
            with torch.no_grad():
                embedding = net.encode_image(inputs)
                for _ in range(rounds):
                    out = net.decode(embedding, *simulated.tensors(inputs.device), mask_prompt=prev)
                    prev = out["low_res_logits"]
                    simulated.add_next(gt, (out["mask_logits"][:, 0] > 0).cpu().numpy(), self.rng, self.jitter)
        outputs = network(inputs, *simulated.tensors(inputs.device), mask_prompt=prev)
        outputs["n_clicks"] = torch.tensor(simulated.counts())
        return outputs
