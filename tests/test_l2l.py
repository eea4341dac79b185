"""learn2learn as an optional extra: the core runs without it; with it, any learn2learn task set serves this
project's episodes (datamodules.l2l), on a small in-memory learn2learn MetaDataset (no download)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

NO_L2L = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "learn2learn" or name.startswith("learn2learn."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    import datamodules, lightning_imaml, train  # the package, the data modules and the CLI
    from datamodules import SinusoidDataModule
    from lightning_imaml import IMAML, SinusoidMLP

    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    learner = IMAML(SinusoidMLP(), task_type="regression", inner_steps=3, cg_steps=2)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    grad, metrics = learner.meta_gradient(batch)
    before = {k: v.detach().clone() for k, v in learner.meta_parameters().items()}
    for k, p in learner.meta_parameters().items():
        p.grad = grad[k]
    opt.step()
    moved = any(not torch.equal(before[k], p) for k, p in learner.meta_parameters().items())
    assert "learn2learn" not in sys.modules
    print("OK", moved, float(metrics["query_loss"].mean()))
    """
)


def test_core_imports_and_an_imaml_step_runs_without_learn2learn(tmp_path):
    script = tmp_path / "no_l2l.py"
    script.write_text(NO_L2L)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[:2] == ["OK", "True"], r.stdout


l2l = pytest.importorskip("learn2learn")

from datamodules import L2LTaskSetDataModule  # noqa: E402
from datamodules.l2l import L2LTaskSampler  # noqa: E402

N_CLASSES, PER_CLASS = 8, 6


def metadataset(offset=0):
    """8 classes x 6 images of 1x4x4; every pixel of an image = 1000 * class + index (so images identify)."""
    ids = torch.arange(N_CLASSES * PER_CLASS)
    x = (
        (offset + 1000 * (ids // PER_CLASS) + ids % PER_CLASS)
        .float()[:, None, None, None]
        .expand(-1, 1, 4, 4)
    )
    y = ids // PER_CLASS
    return l2l.data.MetaDataset(torch.utils.data.TensorDataset(x.contiguous(), y))


def taskset(ds, n_way, shots):
    t = l2l.data.transforms
    transforms = [
        t.NWays(ds, n_way),
        t.KShots(ds, shots),
        t.LoadData(ds),
        t.RemapLabels(ds),
        t.ConsecutiveLabels(ds),
    ]
    return l2l.data.TaskDataset(ds, transforms, num_tasks=-1)


def module(n_way=3, k_shot=2, k_query=3, **kw):
    sets = {
        name: taskset(metadataset(off), n_way, k_shot + k_query)
        for name, off in (("train", 0), ("validation", 1e5), ("test", 2e5))
    }
    return L2LTaskSetDataModule(**sets, n_way=n_way, k_shot=k_shot, k_query=k_query, **kw)


def test_episodes_shapes_labels_and_disjoint_support_query():
    dm = module(meta_batch_size=4)
    dm.setup("fit")
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (4, 3 * 2, 1, 4, 4) and ep.query_x.shape == (4, 3 * 3, 1, 4, 4)
    assert (
        ep.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 4
        and ep.query_y.tolist() == [[0] * 3 + [1] * 3 + [2] * 3] * 4
    )
    for b in range(4):
        s_ids, q_ids = ep.support_x[b, :, 0, 0, 0].long(), ep.query_x[b, :, 0, 0, 0].long()
        assert not set(s_ids.tolist()) & set(q_ids.tolist())  # no image in both
        for ids, y in ((s_ids, ep.support_y[b]), (q_ids, ep.query_y[b])):  # one original class per label
            for label in range(3):
                assert len({int(i) // 1000 for i in ids[y == label]}) == 1
        s_cls = [int(i) // 1000 for i in s_ids[::2]]
        assert s_cls == [int(i) // 1000 for i in q_ids[::3]]  # the same class behind a label in both sets


def test_fixed_validation_tasks_identical_across_builds_workers_and_global_state():
    a, b = module(val_tasks=6), module(val_tasks=6)
    a.setup("validate")
    b.setup("validate")
    random.seed(123)  # the caller's global state does not matter, and is left alone
    state = random.getstate()
    first = [a.fixed_tasks("val")[i] for i in range(6)]
    assert random.getstate() == state
    random.seed(999)
    second = [b.fixed_tasks("val")[i] for i in range(6)]
    for x, y in zip(first, second, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True))
    one_worker = torch.cat([ep.support_x for ep in b.val_dataloader()])
    two_workers = torch.utils.data.DataLoader(b.fixed_tasks("val"), batch_size=2, num_workers=2)
    assert torch.equal(one_worker, torch.cat([ep[0] for ep in two_workers]))
    assert len({tuple(t[0][:, 0, 0, 0].tolist()) for t in first}) > 1  # tasks differ from one another


def test_training_tasks_differ_per_ddp_rank():
    dm = module(meta_batch_size=2)
    dm.setup("fit")
    r0 = next(iter(dm.train_dataloader(rank=0, world_size=2)))
    r1 = next(iter(dm.train_dataloader(rank=1, world_size=2)))
    assert not torch.equal(r0.support_x, r1.support_x)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="n_way=10 but the train task set has only 8 classes"):
        L2LTaskSampler(taskset(metadataset(), 5, 3), n_way=10, k_shot=1, k_query=2, split="train")
    sampler = L2LTaskSampler(taskset(metadataset(), 4, 3), n_way=3, k_shot=1, k_query=2, split="train")
    with pytest.raises(ValueError, match=r"tasks of 4 classes but n_way=3: build it with NWays\(3\)"):
        sampler.sample(torch.Generator().manual_seed(0), 1)
    sampler = L2LTaskSampler(taskset(metadataset(), 3, 2), n_way=3, k_shot=1, k_query=2, split="train")
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 3: build the task set with KShots\(3\)"):
        sampler.sample(torch.Generator().manual_seed(0), 1)
    with pytest.raises(ValueError, match="missing: \\['validation', 'test'\\]"):
        L2LTaskSetDataModule(train=taskset(metadataset(), 3, 3))


def test_imaml_trains_on_a_learn2learn_task_set():
    import pytorch_lightning as pl
    from torch import nn

    from lightning_imaml import IMAML

    dm = module(meta_batch_size=2, val_tasks=2, test_tasks=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    learner = IMAML(net, inner_steps=2, cg_steps=2)
    tr = pl.Trainer(
        max_steps=2, val_check_interval=1, check_val_every_n_epoch=None, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    tr.fit(learner, datamodule=dm)
    (res,) = tr.test(learner, datamodule=dm, verbose=False)
    assert 0.0 <= res["test/acc"] <= 1.0 and res["test/n_tasks"] == 2
