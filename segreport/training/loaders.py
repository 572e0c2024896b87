"""Dataset and loader factories shared by every bundle's YAML (one place for caching and DDP sampling)."""

from __future__ import annotations

import math

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import Sampler
from torch.utils.data import Dataset as TorchDataset


def make_dataset(items: list[dict], transform, cache: bool = True):
    """CacheDataset (deterministic pre-processing done once) or a plain Dataset."""
    return CacheDataset(items, transform, progress=False) if cache else Dataset(items, transform)


def make_loader(dataset, batch_size: int = 8, shuffle: bool = False, num_workers: int = 0, distributed: bool = False,
                weights=None, unweighted_share: float = 0.0, drop_last: bool = False):
    """A DataLoader; ``distributed`` swaps shuffling for a DistributedSampler (multi-GPU configs).
    ``drop_last`` (training): a last batch of ONE item is dropped (batch norm cannot train on it); a
    larger remainder is kept.

    ``weights`` (one per item, optional): items drawn with replacement in proportion to them, as many
    batches per epoch as shuffling gives (the budget of an epoch does not change), from torch's global
    RNG as shuffling is (``set_determinism`` seeds both). A share ``unweighted_share`` of the batches
    is drawn uniformly instead. Each item of a batch then says how it was drawn (:class:`TaggedItems`):
    ``weighted`` (bool) and ``importance`` (its natural / its weighted probability, 1 when unweighted),
    so a consumer can keep some of its steps on the natural mix (the 3D bundle's no-click windows) or
    weight a loss back to it (the attribute head's prior)."""
    if weights is None:
        sampler = None
        if distributed:
            from torch.utils.data.distributed import DistributedSampler

            sampler, shuffle = DistributedSampler(dataset, shuffle=shuffle), False
        drop = drop_last and len(dataset) % batch_size == 1 and len(dataset) > batch_size
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers,
                          drop_last=drop)
    if distributed:
        raise ValueError("sampling weights with distributed training are not supported: drop one of them")
    if len(weights) != len(dataset):
        raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} items")
    if not 0.0 <= unweighted_share <= 1.0:
        raise ValueError(f"unweighted_share must be in [0, 1], got {unweighted_share}")
    w = torch.as_tensor(list(map(float, weights)), dtype=torch.double)
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError("sampling weights must be non-negative with a positive sum")
    batches = StepBatches(w, batch_size, unweighted_share, math.ceil(len(dataset) / batch_size))
    return DataLoader(TaggedItems(dataset, w.mean() / w), batch_sampler=batches, num_workers=num_workers)


class StepBatches(Sampler):
    """Batches of ``(index, weighted)``: each batch drawn with replacement, by ``weights`` or (with
    probability ``unweighted_share``) uniformly; ``n_batches`` per epoch."""

    def __init__(self, weights: torch.Tensor, batch_size: int, unweighted_share: float, n_batches: int):
        self.weights, self.batch_size, self.share, self.n = weights, int(batch_size), float(unweighted_share), int(n_batches)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            weighted = not bool(torch.rand(()) < self.share)
            p = self.weights if weighted else torch.ones_like(self.weights)
            yield [(int(i), weighted) for i in torch.multinomial(p, self.batch_size, replacement=True)]


class TaggedItems(TorchDataset):
    """``dataset[(i, weighted)]``: the item ``dataset[i]`` (a dict) with ``weighted`` and ``importance``."""

    def __init__(self, dataset, importance: torch.Tensor):
        self.dataset, self.importance = dataset, importance.float()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        i, weighted = key
        return {**self.dataset[i], "weighted": weighted, "importance": float(self.importance[i]) if weighted else 1.0}


def engine_loss(output) -> float:
    """The trainer's loss for StatsHandler/TensorBoard (``from_engine`` yields a tuple for a dict output)."""
    return float(output["loss"])
