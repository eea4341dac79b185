"""Episodic data throughput: Omniglot 5-way 1-shot (15 query) meta-batches of 32, episodes (tasks) per second.

Measures, on the CPU this runs on (meant for 2 cores):
* decode: cold decode of all 32,460 PNGs (LANCZOS 28x28) and a warm load from the on-disk tensor cache;
* direct: ``OmniglotDataModule.train_dataloader()`` (vectorised sampler, rotations on), num_workers 0 and 2;
* learn2learn: the same tasks through ``l2l.data.TaskDataset`` with ``NWays``, ``KShots(k_shot + k_query)``,
  ``LoadData``, ``ConsecutiveLabels``, ``RemapLabels`` over the same in-memory uint8 tensor (no rotations on
  either side for this comparison), split per class into support/query and stacked into a meta-batch.

Writes benchmarks/results/data_throughput.json (``--out``) and a bar chart beside it. Usage::

    python benchmarks/data_throughput.py [--batches N] [--threads 2]
    python benchmarks/data_throughput.py --quick --out /tmp/data_throughput.json   # seconds, for the tests
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repository root on sys.path)
import torch  # noqa: E402

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer batches, skip the cold decode")
    parser.add_argument("--batches", type=int, default=None, help="meta-batches timed per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--out", default=str(common.default_out("data_throughput")))
    args = parser.parse_args(argv)
    batches = args.batches or (10 if args.quick else 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "benchmark": "data_throughput",
        "created": common.now(),
        "machine": common.machine_info("cpu"),
        "config": {
            "task": f"Omniglot {N_WAY}-way {K_SHOT}-shot, {K_QUERY} query/class, meta-batch {META_BATCH}",
            "batches_timed": batches,
            "threads": torch.get_num_threads(),
            "quick": args.quick,
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
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

    out = common.write_json(args.out, result)
    plot(result, common.png_path(out))
    print("wrote", out)
    return result


def plot(result, path):
    """Episodes per second of each pipeline (log scale)."""
    plt = common.pyplot()
    from matplotlib.ticker import NullFormatter

    bars = {
        "direct, 0 workers": "direct_episodes_per_s_workers0",
        "direct, 2 workers": "direct_episodes_per_s_workers2",
        "direct, no rotations, 0 workers": "direct_no_rotations_episodes_per_s_workers0",
        "learn2learn TaskDataset, no rotations": "learn2learn_no_rotations_episodes_per_s_workers0",
    }
    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=110)
    values = [result[k] for k in bars.values()]
    ax.barh(list(bars), values, color=["tab:red", "tab:red", "tab:red", "tab:blue"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, max(values) * 3)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("episodes (tasks) per second")
    ax.set_title(f"{result['config']['task']}, {result['machine']['cpu_count']} CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
