"""Dataset and loader factories shared by every bundle's YAML (one place for caching and DDP sampling)."""

from __future__ import annotations

from monai.data import CacheDataset, DataLoader, Dataset
from torch.utils.data import WeightedRandomSampler


def make_dataset(items: list[dict], transform, cache: bool = True):
    """CacheDataset (deterministic pre-processing done once) or a plain Dataset."""
    return CacheDataset(items, transform, progress=False) if cache else Dataset(items, transform)


def make_loader(dataset, batch_size: int = 8, shuffle: bool = False, num_workers: int = 0, distributed: bool = False,
                weights=None):
    """A DataLoader; ``distributed`` swaps shuffling for a DistributedSampler (multi-GPU configs).
    ``weights`` (one per item, optional): items drawn with replacement in proportion to them, as many
    per epoch as the dataset holds (the budget of an epoch does not change), from torch's global RNG
    as shuffling is (``set_determinism`` seeds both)."""
    sampler = None
    if weights is not None:
        if distributed:
            raise ValueError("sampling weights with distributed training are not supported: drop one of them")
        if len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} sampling weights for {len(dataset)} items")
        sampler, shuffle = WeightedRandomSampler(list(map(float, weights)), num_samples=len(dataset), replacement=True), False
    elif distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler, shuffle = DistributedSampler(dataset, shuffle=shuffle), False
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=num_workers)


def engine_loss(output) -> float:
    """The trainer's loss for StatsHandler/TensorBoard (``from_engine`` yields a tuple for a dict output)."""
    return float(output["loss"])
