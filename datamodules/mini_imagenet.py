"""Mini-ImageNet (Vinyals et al. 2016, Ravi & Larochelle 2017 splits: 64/16/20 classes) as episodic tasks.

Reads the standard pickle caches that ``learn2learn.vision.datasets.MiniImagenet`` reads and downloads::

    root/mini-imagenet-cache-train.pkl       root/mini-imagenet-cache-validation.pkl
    root/mini-imagenet-cache-test.pkl

each a dict ``{"image_data": uint8 ndarray [n, 84, 84, 3], "class_dict": {class_name: [image indices]}}``.
A split's images are loaded once into a uint8 tensor [n, 3, 84, 84]; batches are float32 in [0, 1]
(no mean/std normalisation: the conv net's BatchNorm absorbs it).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from datamodules.episodic import ClassificationTaskSampler, EpisodicDataModule
from lightning_imaml.errors import DataNotFoundError

MODES = {"train": "train", "val": "validation", "test": "test"}
SOURCES = (
    "https://zenodo.org/record/7978538/files/mini-imagenet-cache-{mode}.pkl (or learn2learn's "
    "l2l.vision.datasets.MiniImagenet(root, mode=..., download=True))"
)


def default_root() -> str:
    """``$IMAML_MINI_IMAGENET_ROOT``, else ``./data/mini-imagenet``."""
    return os.environ.get("IMAML_MINI_IMAGENET_ROOT") or str(Path("data") / "mini-imagenet")


def cache_path(root: str | Path, split: str) -> Path:
    return Path(root).expanduser() / f"mini-imagenet-cache-{MODES[split]}.pkl"


def load_split(root: str | Path, split: str) -> tuple[Tensor, Tensor, Tensor]:
    """images uint8 [n, 3, 84, 84], class_table int64 [classes, max] (-1 padded), counts int64 [classes]."""
    path = cache_path(root, split)
    if not path.is_file():
        raise DataNotFoundError(
            f"Mini-ImageNet split '{split}' not found: expected {path}. Put the three pickles "
            f"mini-imagenet-cache-{{train,validation,test}}.pkl in root={str(root)!r} (or set "
            f"IMAML_MINI_IMAGENET_ROOT); obtain them from {SOURCES.format(mode=MODES[split])}."
        )
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
        image_data, class_dict = np.asarray(data["image_data"]), data["class_dict"]
    except Exception as err:
        raise ValueError(f"cannot read Mini-ImageNet pickle {path}: {err!r}") from err
    if image_data.ndim != 4 or image_data.shape[-1] != 3 or image_data.dtype != np.uint8:
        raise ValueError(
            f"{path}: image_data must be uint8 [n, H, W, 3], got {image_data.dtype} {image_data.shape}"
        )
    if not class_dict:
        raise ValueError(f"{path}: class_dict is empty")
    images = torch.from_numpy(np.ascontiguousarray(image_data.transpose(0, 3, 1, 2)))
    names = sorted(class_dict)  # fixed class order, independent of pickle dict order
    counts = torch.tensor([len(class_dict[c]) for c in names], dtype=torch.int64)
    table = torch.full((len(names), int(counts.max())), -1, dtype=torch.int64)
    for i, c in enumerate(names):
        idx = torch.as_tensor(list(class_dict[c]), dtype=torch.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(images)):
            raise ValueError(f"{path}: class {c!r} indexes images outside 0..{len(images) - 1}")
        table[i, : len(idx)] = idx
    return images, table, counts


class MiniImageNetDataModule(EpisodicDataModule):
    """Episodic Mini-ImageNet: images float32 [B, N*K, 3, 84, 84] in [0, 1].

    Args:
        root: folder with the three ``mini-imagenet-cache-*.pkl`` files; default
            ``$IMAML_MINI_IMAGENET_ROOT`` or ``./data/mini-imagenet``.
        meta_batch_size: default 4 (as MAML's Mini-ImageNet setup; a 32-task batch of 5-way 1-shot/15-query
            tasks is ~200 MB of float32 images).
        Remaining arguments: see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        meta_batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        val_tasks: int = 600,
        test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            n_way,
            k_shot,
            k_query,
            meta_batch_size,
            num_workers,
            seed,
            val_tasks,
            test_tasks,
            eval_meta_batch_size,
        )
        self.root = root if root is not None else default_root()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, 84, 84)

    def build_sampler(self, split: str) -> ClassificationTaskSampler:
        images, table, counts = load_split(self.root, split)
        return ClassificationTaskSampler(
            images, table, counts, self.n_way, self.k_shot, self.k_query, split=split
        )
