"""Episodic data throughput: Omniglot 5-way 1-shot (15 query) meta-batches of 32, episodes (tasks) per second.

Measures, on the CPU this runs on (meant for 2 cores):
* decode: cold decode of all 32,460 PNGs (LANCZOS 28x28) and a warm load from the on-disk tensor cache;
* direct: ``OmniglotDataModule.train_dataloader()`` (vectorised sampler, rotations on), num_workers 0 and 2;
* learn2learn: the same tasks through ``l2l.data.TaskDataset`` with ``NWays``, ``KShots(k_shot + k_query)``,
  ``LoadData``, ``ConsecutiveLabels``, ``RemapLabels`` over the same in-memory uint8 tensor (no rotations on
  either side for this comparison), split per class into support/query and stacked into a meta-batch.

Writes benchmarks/results/data_throughput.json. Usage::

    python benchmarks/data_throughput.py [--quick] [--batches N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import Episode, OmniglotDataModule  # noqa: E402
from datamodules import omniglot as omniglot_module  # noqa: E402

N_WAY, K_SHOT, K_QUERY, META_BATCH = 5, 1, 15, 32


def time_loader(loader, batches: int, warmup: int = 2) -> float:
    """Episodes per second over ``batches`` meta-batches after ``warmup`` (worker start-up excluded)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch.support_x.shape == (META_BATCH, N_WAY * K_SHOT, 1, 28, 28)
    del it
    return batches * META_BATCH / elapsed


def learn2learn_episodes_per_s(dm: OmniglotDataModule, batches: int) -> float:
    """The same 5-way 1-shot tasks built by learn2learn's task transforms from the same uint8 tensor."""
    import learn2learn as l2l

    train = OmniglotDataModule(**{**dm_kwargs(dm), "rotations": False}).sampler("train")
    images, table = train.images, train.class_table
    flat = table.flatten()
    labels = torch.arange(table.shape[0]).repeat_interleave(table.shape[1])
    keep = flat >= 0
    flat, labels = flat[keep], labels[keep]

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, i):
            return images[flat[i]].float().div_(255.0), int(labels[i])

    labels_to_indices = {
        int(c): list(range(c * table.shape[1], (c + 1) * table.shape[1])) for c in range(len(table))
    }
    dataset = l2l.data.MetaDataset(Images(), labels_to_indices=labels_to_indices)
    transforms = [
        l2l.data.transforms.NWays(dataset, N_WAY),
        l2l.data.transforms.KShots(dataset, K_SHOT + K_QUERY),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        l2l.data.transforms.RemapLabels(dataset),
    ]
    taskset = l2l.data.TaskDataset(dataset, task_transforms=transforms, num_tasks=-1)

    def one_task():
        x, y = taskset.sample()
        # KShots draws K+Q per class together; split by class so support and query share the classes.
        order = torch.as_tensor(y).argsort(stable=True)
        x, y = x[order].view(N_WAY, K_SHOT + K_QUERY, *x.shape[1:]), torch.as_tensor(y)[order].view(N_WAY, -1)
        return (
            x[:, :K_SHOT].reshape(-1, *x.shape[2:]),
            y[:, :K_SHOT].reshape(-1),
            x[:, K_SHOT:].reshape(-1, *x.shape[2:]),
            y[:, K_SHOT:].reshape(-1),
        )

    def meta_batch():
        tasks = [one_task() for _ in range(META_BATCH)]
        return Episode(*(torch.stack(parts) for parts in zip(*tasks, strict=True)))

    meta_batch()
    start = time.perf_counter()
    for _ in range(batches):
        batch = meta_batch()
    elapsed = time.perf_counter() - start
    assert batch.support_x.shape == (META_BATCH, N_WAY * K_SHOT, 1, 28, 28)
    return batches * META_BATCH / elapsed


def dm_kwargs(dm: OmniglotDataModule) -> dict:
    return dict(root=dm.root, n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY, meta_batch_size=META_BATCH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, skip the cold decode")
    parser.add_argument("--batches", type=int, default=None, help="meta-batches timed per configuration")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args()
    batches = args.batches or (10 if args.quick else 50)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result: dict = {
        "task": f"Omniglot {N_WAY}-way {K_SHOT}-shot, {K_QUERY} query/class, meta-batch {META_BATCH}",
        "batches_timed": batches,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    kwargs = dict(n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY, meta_batch_size=META_BATCH)

    if not args.quick:
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            OmniglotDataModule(cache_dir=cache, **kwargs).sampler("train")
            result["decode_all_images_s"] = time.perf_counter() - start
            omniglot_module._MEMO.clear()
    start = time.perf_counter()
    dm = OmniglotDataModule(**kwargs)
    dm.setup("fit")  # writes the default cache the first time, then reads it
    result["setup_from_cache_or_decode_s"] = time.perf_counter() - start

    for workers in (0, 2):
        dm.num_workers = workers
        eps = time_loader(dm.train_dataloader(), batches)
        result[f"direct_episodes_per_s_workers{workers}"] = eps
        result[f"direct_meta_batch_ms_workers{workers}"] = 1e3 * META_BATCH / eps
        print(f"direct sampler, num_workers={workers}: {eps:.0f} episodes/s", flush=True)
    dm.num_workers = 0
    dm_plain = OmniglotDataModule(rotations=False, **kwargs)
    eps = time_loader(dm_plain.train_dataloader(), batches)
    result["direct_no_rotations_episodes_per_s_workers0"] = eps
    print(f"direct sampler, no rotations: {eps:.0f} episodes/s", flush=True)
    l2l_batches = max(2, batches // 5)
    eps = learn2learn_episodes_per_s(dm, l2l_batches)
    result["learn2learn_no_rotations_episodes_per_s_workers0"] = eps
    result["learn2learn_batches_timed"] = l2l_batches
    print(f"learn2learn TaskDataset, no rotations: {eps:.0f} episodes/s", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
