"""Train samplers whose order depends only on the seed and the epoch, so that a resumed run sees the batches an
uninterrupted one sees.

transformers builds the length-grouped train sampler (`train_sampling_strategy: group_by_length`, which the
quickstart and the recipes use) without a generator: each epoch's order is drawn from the global random state when
the epoch starts, and a run resumed mid-epoch restores the random state saved at the checkpoint, so the rest of that
epoch would see other batches (upstream seeded only the eval sampler). `SeededSampling` gives it a generator seeded
from `data_seed` (else `seed`) and the epoch, as accelerate's seedable random sampler does, and sets its epoch itself
at the start of every epoch, resumed or not, on every process alike: Trainer's own `set_epoch` does not reach a
sampler under DDP in a resumed epoch (accelerate wraps it as SkipBatchSampler -> BatchSamplerShard -> BatchSampler ->
sampler, one level deeper than either `DataLoaderShard.set_epoch` or Trainer looks), so a resumed 2-process job
drew the rest of its epoch in epoch 0's order.
"""

from __future__ import annotations

import inspect

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose order in epoch e comes from a generator seeded with (seed, e)."""

    def __init__(self, *args, seed: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1  # a new order next time, also when nobody calls set_epoch
        return super().__iter__()


class SeededSampling:
    """Trainer mixin: a length-grouped train sampler is seeded per epoch (`EpochSeededLengthGroupedSampler`)."""

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            seeded = EpochSeededLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths, seed=seed)
            return seeded
        return sampler

    def _run_epoch(self, *args, **kwargs):
        bound = inspect.signature(super()._run_epoch).bind(*args, **kwargs)  # Trainer passes keywords; either works
        set_epoch(bound.arguments["train_dataloader"], bound.arguments["epoch"])
        return super()._run_epoch(*args, **kwargs)


def set_epoch(loader: object, epoch: int) -> int:
    """Set `epoch` on every sampler under `loader`, however deep accelerate has wrapped it (BatchSamplerShard,
    SkipBatchSampler, ...): ours and accelerate's `SeedableRandomSampler` alike. Returns how many were set."""
    found, seen, todo = 0, set(), [loader]
    while todo:
        obj = todo.pop()
        for name in ("batch_sampler", "sampler", "base_dataloader"):
            child = getattr(obj, name, None)
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            if callable(getattr(child, "set_epoch", None)):
                child.set_epoch(epoch)
                found += 1
            todo.append(child)
    return found


def seeded(trainer_class: type) -> type:
    """`trainer_class` with `SeededSampling` (the class itself if it has it already)."""
    if issubclass(trainer_class, SeededSampling):
        return trainer_class
    return type(trainer_class.__name__, (SeededSampling, trainer_class), {"__module__": trainer_class.__module__})
