"""Episodic batches and the base LightningDataModule that serves them.

A *task sampler* draws whole meta-batches of tasks with one ``torch.Generator``; this module turns a sampler
into an endless training stream (different per DDP rank, DataLoader worker and epoch) and fixed,
reproducible validation/test task sets (task ``i`` depends only on ``seed``, the split and ``i``, so the set
is identical for every run, rank layout and worker count).

Why not learn2learn's ``TaskDataset`` + ``NWays``/``KShots``/``LoadData``/``RemapLabels``: it samples with the
process-global ``random`` module (no generator argument), so fixed evaluation sets depend on global state and
worker layout, and it builds every task sample by sample in Python; the vectorised samplers here draw a whole
meta-batch with a handful of tensor ops. ``benchmarks/data_throughput.py`` measures both on the same
in-memory Omniglot tensor (figures in its JSON output).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from lightning_imaml.errors import InvalidSettingError

SPLITS = ("train", "val", "test")


class Episode(NamedTuple):
    """One task, or a meta-batch of tasks after collation (leading dim ``B``).

    Classification: ``support_x`` float32 [B, N*K, C, H, W], ``support_y`` int64 [B, N*K] in 0..N-1,
    ``query_x`` float32 [B, N*Q, C, H, W], ``query_y`` int64 [B, N*Q]. Samples are class-major
    (the K shots of label 0, then label 1, ...); the class -> label assignment is random per task.
    Regression: ``support_x``/``support_y`` float32 [B, K, 1], ``query_x``/``query_y`` float32 [B, Q, 1].
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class TaskSampler(Protocol):
    """Draws ``batch_size`` tasks as one batched :class:`Episode`, using only ``generator`` for randomness."""

    def sample(self, generator: torch.Generator, batch_size: int) -> Episode: ...


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from several integers (SeedSequence): nearby tuples give unrelated streams."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def check_positive(**values: int | None) -> None:
    """Raise ``ValueError`` naming the first non-positive (non-None) value."""
    for name, value in values.items():
        if value is not None and value <= 0:
            raise InvalidSettingError(f"{name} must be positive, got {name}={value}")


class ClassificationTaskSampler:
    """N-way (K+Q)-shot tasks from an in-memory uint8 image tensor, a whole meta-batch per call.

    Args:
        images: uint8 [num_images, C, H, W], shared by all splits (not copied, except that with
            ``rotations`` this split's images are stored once per rotation).
        class_table: int64 [num_classes, max_per_class], image indices of each class of this split, padded
            with -1 where a class has fewer images.
        counts: int64 [num_classes], images per class.
        rotations: if True, every class also appears rotated by 90/180/270 degrees as three further classes
            (Santoro et al. 2016, used for Omniglot meta-training only).
    """

    def __init__(
        self,
        images: Tensor,
        class_table: Tensor,
        counts: Tensor,
        n_way: int,
        k_shot: int,
        k_query: int,
        rotations: bool = False,
        split: str = "train",
    ) -> None:
        self.class_table, self.counts = class_table, counts
        self.images = images
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.n_rot = 4 if rotations else 1
        self.num_classes = class_table.shape[0] * self.n_rot
        if rotations and images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}")
        if n_way > self.num_classes:
            raise InvalidSettingError(
                f"n_way={n_way} but split '{split}' has only {self.num_classes} classes; use n_way <= "
                f"{self.num_classes}"
            )
        min_count = int(counts.min()) if len(counts) else 0
        if k_shot + k_query > min_count:
            raise InvalidSettingError(
                f"k_shot + k_query = {k_shot} + {k_query} = {k_shot + k_query} but split '{split}' has only "
                f"{min_count} samples in its smallest class; use k_shot + k_query <= {min_count}"
            )
        if rotations:
            # Pre-rotate only this split's images (Omniglot train: 22k x 784 B x 4 = 69 MB): rotation then
            # costs nothing per batch, where masked rot90 per batch dominated the sampling time.
            used = class_table[class_table >= 0].unique()
            remap = torch.full((images.shape[0],), -1, dtype=torch.int64)
            remap[used] = torch.arange(len(used))
            self.class_table = torch.where(class_table >= 0, remap[class_table.clamp(min=0)], -1)
            self.images = torch.cat([torch.rot90(images[used], r, dims=(-2, -1)) for r in range(4)])
            self._rot_stride = len(used)
        self._uniform = bool((counts == class_table.shape[1]).all())
        # Labels are fixed (class-major); randomness lives in which class gets which label.
        self._support_y = torch.arange(n_way).repeat_interleave(k_shot)
        self._query_y = torch.arange(n_way).repeat_interleave(k_query)

    def sample(self, generator: torch.Generator, batch_size: int) -> Episode:
        n, k, q, b = self.n_way, self.k_shot, self.k_query, batch_size
        # N distinct classes per task (rotated copies count as distinct classes).
        # top-n of iid uniform keys = a uniform random n-subset in random order; much cheaper than
        # multinomial without replacement or a full argsort over thousands of classes.
        cls = torch.rand(b, self.num_classes, generator=generator).topk(n, dim=1).indices  # [B, N]
        base, rot = cls % self.class_table.shape[0], cls // self.class_table.shape[0]
        # K+Q distinct images per class: rank random keys, padding slots ranked last.
        keys = torch.rand(b, n, self.class_table.shape[1], generator=generator)
        if not self._uniform:
            slots = torch.arange(self.class_table.shape[1])
            keys = keys.masked_fill(slots >= self.counts[base].unsqueeze(-1), math.inf)
        pos = keys.argsort(dim=-1)[..., : k + q]  # [B, N, K+Q]
        idx = self.class_table[base.unsqueeze(-1), pos]  # [B, N, K+Q]
        if self.n_rot > 1:
            idx = idx + (rot * self._rot_stride).unsqueeze(-1)  # select the pre-rotated copy
        # Split indices (not images) into support/query, so each gather writes its output contiguously.
        support_x = self.images[idx[:, :, :k].reshape(b, n * k)].float().div_(255.0)
        query_x = self.images[idx[:, :, k:].reshape(b, n * q)].float().div_(255.0)
        return Episode(
            support_x, self._support_y.expand(b, -1).clone(), query_x, self._query_y.expand(b, -1).clone()
        )


class TrainTaskStream(IterableDataset):
    """Endless stream of fresh meta-batches (``DataLoader(batch_size=None)``: the sampler batches itself).

    The generator seed mixes ``seed``, the DDP ``rank``, the DataLoader worker id, the epoch (bumped by
    :class:`EpochDataLoader` in the main process before workers start) and a local iteration count (for
    persistent workers and ``num_workers=0``), so no two of those draw the same tasks.
    """

    def __init__(self, sampler: TaskSampler, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._local_iters = 0

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self._local_iters += 1
        generator = torch.Generator().manual_seed(
            mix_seed(self.seed, self.rank, worker, self.epoch, self._local_iters)
        )
        while True:
            yield self.sampler.sample(generator, self.batch_size)


class FixedTaskSet(Dataset):
    """``num_tasks`` reproducible tasks: task ``i`` comes from its own generator seeded by (seed, split, i).

    Map-style on purpose: Lightning's DistributedSampler can shard it under DDP, and any worker count yields
    the same tasks in the same order. Items are single tasks (no batch dim); the default collate stacks them.
    """

    def __init__(self, sampler: TaskSampler, num_tasks: int, seed: int, split: str):
        self.sampler, self.num_tasks, self.seed = sampler, num_tasks, seed
        self._split_code = SPLITS.index(split) + 1

    def __len__(self) -> int:
        return self.num_tasks

    def generator(self, i: int) -> torch.Generator:
        """The generator task ``i`` is drawn from (a sampler may draw more about the task from it)."""
        if not 0 <= i < self.num_tasks:
            raise IndexError(i)
        return torch.Generator().manual_seed(mix_seed(self.seed, 1_000_003, self._split_code, i))

    def __getitem__(self, i: int) -> Episode:
        return Episode(*(t[0] for t in self.sampler.sample(self.generator(i), 1)))


class EpochDataLoader(DataLoader):
    """DataLoader that bumps ``dataset.epoch`` in the main process each time iteration (re)starts.

    Lightning re-creates the iterator every epoch; without this, non-persistent workers (which get a fresh
    copy of the dataset) would replay the same training tasks every epoch.
    """

    def __iter__(self):
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch += 1
        return super().__iter__()


def resolve_rank(trainer: pl.Trainer | None) -> tuple[int, int]:
    """(global_rank, world_size): from the attached Trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpisodicDataModule(pl.LightningDataModule):
    """Base for episodic few-shot data modules. Subclasses implement :meth:`build_sampler`.

    Args:
        n_way: classes per task (``None`` for regression).
        k_shot: support samples per class (per task for regression).
        k_query: query samples per class (per task for regression).
        meta_batch_size: tasks per training batch (B).
        num_workers: DataLoader worker processes.
        seed: seed for training streams and for the fixed validation/test task sets.
        val_tasks: size of the fixed validation task set.
        test_tasks: size of the fixed test task set.
        eval_meta_batch_size: tasks per validation/test batch; defaults to ``meta_batch_size``.
    """

    task_type: str = "classification"

    def __init__(
        self,
        n_way: int | None = 5,
        k_shot: int = 1,
        k_query: int = 15,
        meta_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_tasks: int = 600,
        test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            n_way=n_way,
            k_shot=k_shot,
            k_query=k_query,
            meta_batch_size=meta_batch_size,
            val_tasks=val_tasks,
            test_tasks=test_tasks,
            eval_meta_batch_size=eval_meta_batch_size,
        )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got num_workers={num_workers}")
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query
        self.meta_batch_size, self.num_workers, self.seed = meta_batch_size, num_workers, seed
        self.val_tasks, self.test_tasks = val_tasks, test_tasks
        self.eval_meta_batch_size = eval_meta_batch_size or meta_batch_size
        self._samplers: dict[str, TaskSampler] = {}

    # --- to implement -------------------------------------------------------------------------------
    def build_sampler(self, split: str) -> TaskSampler:
        """Return the task sampler of ``split`` in {"train", "val", "test"} (called once per split)."""
        raise NotImplementedError

    # --- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, SPLITS):
            self.sampler(split)

    def sampler(self, split: str) -> TaskSampler:
        """The (cached) task sampler of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._samplers:
            self._samplers[split] = self.build_sampler(split)
        return self._samplers[split]

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Endless fresh meta-batches; ``rank``/``world_size`` override the detected DDP layout (tests)."""
        det_rank, det_world = resolve_rank(self._trainer_or_none())
        stream = TrainTaskStream(
            self.sampler("train"),
            self.meta_batch_size,
            self.seed,
            rank=det_rank if rank is None else rank,
            world_size=det_world if world_size is None else world_size,
        )
        return EpochDataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val", self.val_tasks)

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test", self.test_tasks)

    def fixed_tasks(self, split: str) -> FixedTaskSet:
        """The fixed task set of "val" or "test" (map-style, one task per item)."""
        return FixedTaskSet(
            self.sampler(split), self.val_tasks if split == "val" else self.test_tasks, self.seed, split
        )

    def _fixed_loader(self, split: str, num_tasks: int) -> DataLoader:
        return DataLoader(
            self.fixed_tasks(split),
            batch_size=self.eval_meta_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def _trainer_or_none(self) -> pl.Trainer | None:
        # LightningDataModule.trainer is None until a Trainer attaches the module.
        return getattr(self, "trainer", None)
