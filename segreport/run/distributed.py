"""Sharding a batch run over processes, GPUs and nodes with ``torchrun``.

Each process (rank) takes every ``world_size``-th case of the sorted case list, writes those cases'
outputs and its own ``summary.rank<k>.json``; after a barrier rank 0 merges them into ``summary.csv``
and ``summary.json``. Ranks share nothing but the output folder, so the folder must be on storage
every node sees. Typical use::

    # one node, 4 GPUs (device cuda:LOCAL_RANK per process)
    torchrun --nproc_per_node 4 -m segreport.run.batch --bundle bundles/medsegtext \\
        -i /data/cohort -o /data/out --device cuda
    # two nodes: run on each, same rendezvous endpoint
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m segreport.run.batch --bundle bundles/medsegtext -i /shared/cohort -o /shared/out --device cuda

The process group (gloo on CPU, nccl on GPU) is used only for the barriers, so its timeout is long:
ranks wait there for the slowest shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass
class DistContext:
    """Where this process sits in the run. ``initialized_here``: we own the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()


def dist_env() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` as torchrun sets them; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def context(rank: int, world_size: int) -> DistContext:
    """The context of a process told its rank (e.g. by run_batch's arguments), using the process group
    if one is initialised."""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
    return DistContext(rank, world_size, dist_env()[2], backend)


def device_for_rank(device: str | None, local_rank: int) -> str | None:
    """``cuda`` -> ``cuda:<local_rank>`` so each process on a node drives its own GPU."""
    if device is not None and device.startswith("cuda") and ":" not in device:
        return f"cuda:{local_rank}"
    return device


def init_distributed(device: str | None = None, timeout_s: float = 24 * 3600) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl for CUDA devices, else gloo)."""
    rank, world_size, local_rank = dist_env()
    ctx = DistContext(rank, world_size, local_rank)
    if world_size <= 1 or dist.is_initialized():
        ctx.backend = dist.get_backend() if dist.is_initialized() else None
        return ctx
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    ctx.backend = "nccl" if cuda else "gloo"
    dist.init_process_group(ctx.backend, timeout=timedelta(seconds=timeout_s))
    ctx.initialized_here = True
    return ctx


def barrier(ctx: DistContext) -> None:
    if not ctx.active:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.local_rank])
    else:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def end_training(network: torch.nn.Module) -> None:
    """Leave a training's process group in order, while Python is still running.

    ``destroy_process_group`` alone unregisters the group and shuts its backends down, but a DDP wrapper
    keeps its reducer (autograd hooks on the parameters, the last gloo work with its tensors) and the
    group until the interpreter exits. A gloo thread that needs the GIL then is ended by Python's
    finalisation and the rank aborts ("terminate called without an active exception";
    pytorch/pytorch#179291): one rank in a few dozen CPU runs here, after the checkpoint was written.
    So every rank first waits for the others (none tears down while rank 0 still writes), the wrapper
    lets go of its reducer and group, then the group is destroyed (its backends shut down) and a
    garbage collection runs. The group's Python object still stayed referenced from inside torch in a
    check here, and whether all this removes the abort cannot be shown in the few dozen runs a CPU
    allows, so the torchrun test still reruns once on that exact message."""
    import gc

    if not dist.is_initialized():
        return
    dist.barrier(device_ids=[torch.cuda.current_device()]) if dist.get_backend() == "nccl" else dist.barrier()
    reducer = getattr(network, "reducer", None)
    if reducer is not None:
        reducer._remove_autograd_hooks()
        network.reducer = network.logger = None
    if hasattr(network, "process_group"):
        network.process_group = None
    dist.destroy_process_group()
    gc.collect()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Round-robin share of ``items`` for ``rank`` (every rank must see the same sorted list)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def rank_summary_path(output_dir: str | os.PathLike, rank: int) -> Path:
    return Path(output_dir) / f"summary.rank{rank}.json"


def merge_rank_summaries(output_dir: str | os.PathLike, world_size: int, case_ids: Sequence[str] = ()) -> list[dict]:
    """Rows of every rank's ``summary.rank<k>.json``, in ``case_ids`` order (the full case list) when
    given. A rank that wrote no summary is an error: its cases would silently vanish from the summary."""
    rows = []
    for rank in range(world_size):
        path = rank_summary_path(output_dir, rank)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: rank {rank} wrote no summary (did it crash?)")
        rows += json.loads(path.read_text())["cases"]
    position = {case_id: i for i, case_id in enumerate(case_ids)}
    return sorted(rows, key=lambda r: position.get(r["case_id"], len(position)))


def training_device() -> torch.device:
    """The device of this training process: ``cuda:LOCAL_RANK`` under torchrun (the GPU index on this
    node; the global rank is wrong on every node but the first), ``cuda`` alone, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
