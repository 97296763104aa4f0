"""A deterministic batch plan: micro-batch number m on rank r is a pure function of (seed, m, r).

That is what makes resume exact (the data position is just the step counter) and keeps every batch
inside one aspect bucket (the transformer takes position ids from the first sample of a batch).
"""

from __future__ import annotations

import torch

EPOCH_STRIDE = 1_000_003  # a prime: distinct (seed, epoch) pairs give distinct shuffles for up to a million epochs


class BatchPlan:
    def __init__(
        self, layouts: list, batch_size: int, seed: int, world_size: int = 1, rank: int = 0
    ):
        """`layouts[i]`: what sample i must share with its batch mates (its bucket, and its reference sizes)."""
        self.groups: dict = {}
        for index, layout in enumerate(layouts):
            self.groups.setdefault(layout, []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.batches_per_epoch = sum(-(-len(g) // batch_size) for g in self.groups.values())
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def epoch(self, epoch: int) -> list[list[int]]:
        """Shuffle within each layout, cut into batches (the last of a layout may be smaller), shuffle batches."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        g = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + epoch)
        batches = []
        for layout in sorted(self.groups):
            members = self.groups[layout]
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            batches += [
                order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)
            ]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size an epoch holds (a bucket's last batch may be short)."""
        sizes: dict[int, int] = {}
        for members in self.groups.values():
            full, rest = divmod(len(members), self.batch_size)
            sizes[self.batch_size] = sizes.get(self.batch_size, 0) + full
            if rest:
                sizes[rest] = sizes.get(rest, 0) + 1
        return {k: v for k, v in sizes.items() if v}

    def global_number(self, number: int) -> int:
        """This rank's micro-batch `number` counted over all ranks: the index of its data and the seed of its noise
        (trainer/step.py), so N ranks see what one process does with N-step gradient accumulation."""
        return number * self.world_size + self.rank

    def micro_batch(self, number: int) -> list[int]:
        """Sample indices of this rank's micro-batch `number` (0-based, counted over the whole run)."""
        epoch, offset = divmod(self.global_number(number), self.batches_per_epoch)
        return self.epoch(epoch)[offset]
