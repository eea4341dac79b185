"""Any learn2learn task set as this project's episodic data module (learn2learn is an optional extra).

learn2learn describes a few-shot benchmark as ``TaskDataset`` objects (train / validation / test), for
example those of ``l2l.vision.benchmarks.get_tasksets("mini-imagenet" | "tiered-imagenet" | "cifarfs" |
"fc100" | "omniglot", ...)``, or one built from any ``MetaDataset`` with ``NWays`` / ``KShots`` /
``LoadData`` / ``RemapLabels`` transforms. ``L2LTaskSetDataModule`` serves them as ``Episode`` meta-batches
(``support_x [B, N*K, ...]``, ``support_y [B, N*K]`` in 0..N-1, class-major, ``query_x``, ``query_y``), so
``IMAML``, ``MAML`` and ``FOMAML`` train on every learn2learn benchmark, from Python or from ``train.py``.

Randomness. learn2learn draws tasks with the process-global ``random`` module (``NWays``, ``KShots``,
``TaskDataset.sample``; its augmentations may use ``torch``'s and ``numpy``'s global generators), which takes
no seed argument: left alone, fixed validation / test sets would depend on what ran before, on the worker
layout and on the DDP rank. Here every task is drawn inside a scoped state of those three generators,
seeded from this project's per-task seed (see :mod:`datamodules.episodic`) and restored afterwards: task
``i`` of the validation / test set is the same in every build, worker count and rank layout, training
tasks differ per rank, worker and epoch, and the caller's global random state is untouched.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from datamodules.episodic import Episode, EpisodicDataModule
from lightning_imaml.errors import InvalidSettingError

__all__ = ["L2LTaskSampler", "L2LTaskSetDataModule"]

_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


@contextlib.contextmanager
def scoped_global_random(seed: int):
    """Seed Python's ``random``, NumPy's and torch's global CPU generators for the block, then restore."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _num_classes(taskset: Any) -> int | None:
    labels = getattr(getattr(taskset, "dataset", None), "labels", None)
    return len(labels) if labels is not None else None


class L2LTaskSampler:
    """A learn2learn ``TaskDataset`` as a :class:`~datamodules.episodic.TaskSampler`.

    Each task ``(data [N*(K+Q), ...], labels [N*(K+Q)])`` from ``taskset.sample()`` is grouped by label; the
    labels are renumbered 0..N-1 in order of first appearance (learn2learn's ``RemapLabels`` order is
    random already), and each class gives its first K samples to the support set and the next Q to the
    query set (``KShots`` draws them in random order).
    """

    def __init__(self, taskset: Any, n_way: int, k_shot: int, k_query: int, split: str = "train") -> None:
        if not hasattr(taskset, "sample"):
            raise ValueError(
                f"the {split} task set must be a learn2learn TaskDataset, got {type(taskset).__name__}"
            )
        classes = _num_classes(taskset)
        if classes is not None and n_way > classes:
            raise InvalidSettingError(f"n_way={n_way} but the {split} task set has only {classes} classes")
        self.taskset, self.split = taskset, split
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query

    def sample(self, generator: torch.Generator, batch_size: int) -> Episode:
        seeds = torch.randint(2**62, (batch_size,), generator=generator).tolist()
        tasks = [self._task(seed) for seed in seeds]
        return Episode(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))

    def _task(self, seed: int) -> Episode:
        with scoped_global_random(seed):
            data, labels = self.taskset.sample()
        data, labels = torch.as_tensor(data), torch.as_tensor(labels).reshape(-1)
        order, need = list(dict.fromkeys(labels.tolist())), self.k_shot + self.k_query
        if len(order) != self.n_way:
            raise ValueError(
                f"the {self.split} task set yields tasks of {len(order)} classes but n_way={self.n_way}: "
                f"build it with NWays({self.n_way}) (get_tasksets does, from the module's n_way)"
            )
        support, query = [], []
        for c in order:
            idx = (labels == c).nonzero().flatten()
            if len(idx) < need:
                raise ValueError(
                    f"a {self.split} task has {len(idx)} samples of a class but k_shot + k_query = {need}: "
                    f"build the task set with KShots({need})"
                )
            support.append(idx[: self.k_shot])
            query.append(idx[self.k_shot : need])
        s_idx, q_idx = torch.cat(support), torch.cat(query)
        s_y = torch.arange(self.n_way).repeat_interleave(self.k_shot)
        q_y = torch.arange(self.n_way).repeat_interleave(self.k_query)
        return Episode(data[s_idx].float(), s_y, data[q_idx].float(), q_y)


class L2LTaskSetDataModule(EpisodicDataModule):
    """Episodic meta-batches from learn2learn task sets (train / validation / test).

    Either give the three ``TaskDataset`` objects (``train``, ``validation``, ``test``; e.g. the fields of
    ``l2l.vision.benchmarks.get_tasksets(...)``), or a ``benchmark`` name that learn2learn knows
    ("omniglot", "mini-imagenet", "tiered-imagenet", "cifarfs", "fc100"): the task sets are then built with
    ``get_tasksets(benchmark, train_ways=n_way, train_samples=k_shot + k_query, test_ways=n_way,
    test_samples=k_shot + k_query, root=root, **benchmark_kwargs)`` on first use. Note that learn2learn's
    benchmark builders download their data into ``root`` when it is missing.

    Args:
        benchmark: a learn2learn benchmark name, or None when the task sets are given.
        root: learn2learn's data folder for ``benchmark``.
        train, validation, test: learn2learn ``TaskDataset`` objects (instead of ``benchmark``).
        benchmark_kwargs: further keyword arguments of ``get_tasksets`` (e.g. ``{"device": "cpu"}``).
        Remaining arguments (n_way, k_shot, k_query, meta_batch_size, ...): see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        benchmark: str | None = None,
        root: str = "~/data",
        train: Any = None,
        validation: Any = None,
        test: Any = None,
        benchmark_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        given = {"train": train, "val": validation, "test": test}
        if benchmark is None and any(v is None for v in given.values()):
            missing = [_SPLIT_NAMES[k] for k, v in given.items() if v is None]
            raise ValueError(f"give a learn2learn benchmark name or all three task sets; missing: {missing}")
        if benchmark is not None and any(v is not None for v in given.values()):
            raise ValueError("give either benchmark or the task sets, not both")
        self.benchmark, self.root = benchmark, root
        self.benchmark_kwargs = dict(benchmark_kwargs or {})
        self._tasksets: Mapping[str, Any] | None = None if benchmark else given

    def tasksets(self) -> Mapping[str, Any]:
        """The learn2learn task sets by split ("train", "val", "test"), built from ``benchmark`` once."""
        if self._tasksets is None:
            from learn2learn.vision.benchmarks import get_tasksets

            need = self.k_shot + self.k_query
            sets = get_tasksets(
                self.benchmark, train_ways=self.n_way, train_samples=need, test_ways=self.n_way,
                test_samples=need, root=self.root, **self.benchmark_kwargs,
            )  # fmt: skip
            self._tasksets = {"train": sets.train, "val": sets.validation, "test": sets.test}
        return self._tasksets

    def build_sampler(self, split: str) -> L2LTaskSampler:
        return L2LTaskSampler(
            self.tasksets()[split], self.n_way, self.k_shot, self.k_query, _SPLIT_NAMES[split]
        )
