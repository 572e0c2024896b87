"""The engine wiring every bundle's ``train.yaml`` shares, as factories the YAML calls.

A bundle folder must run from anywhere (copied, or installed with the wheel), so its configs cannot pull
a shared YAML file by a path (``%file#key`` is resolved against the working directory). What every bundle
wires alike lives here instead: the handler lists of the trainer and the evaluator, the TensorBoard
logging, and the steps before a run. Each bundle's YAML keeps MONAI's usual ids (``train#trainer``,
``validate#evaluator``, ``train#dataloader`` ...), so they can still be overridden from the command line.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler, ValidationHandler

from .loaders import engine_loss


def start(seed: int, num_threads: int | None = None) -> None:
    """Before a single-process run: bad inputs named last in a traceback, torch's CPU threads, determinism."""
    from monai.utils import set_determinism

    from ..errors import report_input_errors_last

    report_input_errors_last()
    if num_threads:
        torch.set_num_threads(int(num_threads))
    set_determinism(seed=seed)


def start_distributed(backend: str, device, seed: int) -> None:
    """Before a torchrun rank's run: join the process group, take this node's GPU, then :func:`start`."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(device)
    start(seed)


def load_initial_weights(network, checkpoint: str | None) -> None:
    """Fine-tuning: start from a bundle checkpoint's weights (``initial_weights`` in train.yaml; MONAI Label
    training passes the served ones). The checkpoint is read as data (segreport.models.spec) and must fit
    this configuration's network exactly; the error names what does not fit."""
    if not checkpoint:
        return
    from ..models.spec import load_weights, read_checkpoint

    _, weights = read_checkpoint(checkpoint)
    load_weights(network, weights, checkpoint)


def train_handlers(validator, val_interval: int, epochs: int, log_dir: str, ckpt_dir: str, save_dict: Mapping,
                   writes_outputs: bool = True, schedule: Sequence = (), optimizer=None, loss=None,
                   validate_first: bool = False) -> list:
    """The trainer's handlers: validation every ``val_interval`` epochs (at least once, so a short run still
    writes ``model.pt``), the loss on the console; on the writing rank also TensorBoard (the loss, each loss
    part the loss keeps in ``loss.last``, the learning rate) and the final checkpoint; then ``schedule``
    (the bundle's own iteration-level handlers, e.g. a warm-up cosine LR). ``validate_first`` (fine-tuning):
    validate the starting weights too, so ``model.pt`` (saved at the best score) stays them unless an
    epoch of training beats them.

    Every rank builds every handler, writing or not: ignite's checkpoint handler asks the rank on creation,
    which the first time creates a process group, a collective that would wait forever for ranks that
    skipped it."""
    console = [ValidationHandler(validator=validator, interval=min(int(val_interval), int(epochs)), epoch_level=True,
                                 exec_at_start=bool(validate_first)),
               StatsHandler(tag_name="train_loss", output_transform=engine_loss)]
    writing = [TensorBoardStatsHandler(log_dir=log_dir, tag_name="train_loss", output_transform=engine_loss),
               TrainingCurves(log_dir, optimizer, loss),
               CheckpointSaver(save_dir=ckpt_dir, save_dict=dict(save_dict), save_final=True, final_filename="model_final.pt")]
    return console + (writing if writes_outputs else []) + list(schedule)


def val_handlers(log_dir: str, ckpt_dir: str, save_dict: Mapping, writes_outputs: bool = True,
                 schedule: Sequence = ()) -> list:
    """The evaluator's handlers: scores on the console; on the writing rank TensorBoard (scores and a panel
    of image, reference and prediction of the last validation batch) and ``model.pt`` at the best key
    metric; then ``schedule`` (the bundle's validation-driven handlers: LR on plateau, early stopping)."""
    writing = [TensorBoardStatsHandler(log_dir=log_dir, iteration_log=False), PredictionPanel(log_dir),
               CheckpointSaver(save_dir=ckpt_dir, save_dict=dict(save_dict), save_key_metric=True, key_metric_filename="model.pt")]
    return [StatsHandler(iteration_log=False)] + (writing if writes_outputs else []) + list(schedule)


class _TensorBoardHandler:
    """One SummaryWriter per log folder, opened on first use (only the writing rank ever gets one)."""

    def __init__(self, log_dir: str):
        self.log_dir, self._writer = log_dir, None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer


class TrainingCurves(_TensorBoardHandler):
    """Per epoch: the learning rate of each optimizer group and the mean of each loss part (``loss.last``,
    which the bundles' losses fill every iteration: Dice and BCE, text, attribute groups, task weights)."""

    def __init__(self, log_dir: str, optimizer=None, loss=None):
        super().__init__(log_dir)
        self.optimizer, self.loss = optimizer, loss
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine) -> None:
        for name, value in (getattr(self.loss, "last", None) or {}).items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)
        self._count += 1

    def _write(self, engine) -> None:
        epoch = engine.state.epoch
        for name, total in self._sums.items():
            self.writer.add_scalar(f"loss_parts/{name}", total / max(self._count, 1), epoch)
        for i, group in enumerate(getattr(self.optimizer, "param_groups", [])):
            self.writer.add_scalar(f"learning_rate/group{i}", float(group["lr"]), epoch)
        self.writer.flush()
        self._sums, self._count = {}, 0


class PredictionPanel(_TensorBoardHandler):
    """After each validation: up to ``n`` rows of (image, reference mask, predicted probability) from the
    last batch, written as one image (the middle slice along the last axis for 3D windows)."""

    def __init__(self, log_dir: str, n: int = 4):
        super().__init__(log_dir)
        self.n = int(n)

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        panel = prediction_panel(engine.state.output, self.n)
        if panel is not None:
            step = engine.state.epoch if getattr(engine, "trainer", None) is None else engine.trainer.state.epoch
            self.writer.add_image("validation/image_reference_prediction", panel, step)
            self.writer.flush()


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, 1, H, W): the first channel, and the middle slice of the last axis in 3D."""
    x = x.detach().float().cpu()[:, :1]
    return x[..., x.shape[-1] // 2] if x.ndim == 5 else x


def prediction_panel(output: Any, n: int = 4) -> torch.Tensor | None:
    """(3, H', W') grid of the evaluator's output: rows of image | reference | prediction (None when the
    output does not hold the three; a validation without masks has no panel)."""
    from torchvision.utils import make_grid

    if isinstance(output, list):  # decollated output: a list of per-item dicts
        return None
    image, label, pred = (output.get(k) if isinstance(output, Mapping) else None for k in ("image", "label", "pred"))
    label = label.get("label") if isinstance(label, Mapping) else label
    logits = next((pred[k] for k in ("seg_logits", "mask_logits") if k in pred), None) if isinstance(pred, Mapping) else pred
    if not all(torch.is_tensor(t) for t in (image, label, logits)):
        return None
    image, label, prob = _as_2d(image[:n]), _as_2d(label[:n]), torch.sigmoid(_as_2d(logits[:n]))
    if not image.shape[-2:] == label.shape[-2:] == prob.shape[-2:]:
        return None
    lo, hi = image.amin(), image.amax()
    image = (image - lo) / (hi - lo).clamp_min(1e-6)
    rows = torch.stack([image, label.clamp(0, 1), prob], dim=1).flatten(0, 1)  # (3B, 1, H, W)
    return make_grid(rows, nrow=3, padding=2, pad_value=1.0)
