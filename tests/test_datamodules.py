"""Episodic data modules without the real Omniglot: sampler logic, sinusoid, Mini-ImageNet pickles, bad input.

Everything here runs on tiny generated data (seconds); the real-Omniglot tests are in tests/test_omniglot.py.
"""

import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import Episode, MiniImageNetDataModule, OmniglotDataModule, SinusoidDataModule
from datamodules.episodic import ClassificationTaskSampler, EpochDataLoader, TrainTaskStream
from datamodules.omniglot import _MEMO


def constant_store(num_classes, per_class, size=4, channels=1):
    """Images whose every pixel is their class id, so a batch reveals which class each sample came from."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = labels.to(torch.uint8).view(-1, 1, 1, 1).expand(-1, channels, size, size).contiguous()
    table = torch.arange(num_classes * per_class).view(num_classes, per_class)
    return images, table, torch.full((num_classes,), per_class)


def classes_of(x):
    """[B, M, C, H, W] float batch of constant images -> [B, M] int class ids."""
    return (x[..., 0, 0, 0] * 255).round().long()


# --- sampler ----------------------------------------------------------------------------------------------


def test_sampler_shapes_labels_and_query_classes_equal_support_classes():
    images, table, counts = constant_store(12, 7)
    sampler = ClassificationTaskSampler(images, table, counts, n_way=5, k_shot=2, k_query=3)
    ep = sampler.sample(torch.Generator().manual_seed(0), 16)
    assert isinstance(ep, Episode)
    assert ep.support_x.shape == (16, 10, 1, 4, 4) and ep.query_x.shape == (16, 15, 1, 4, 4)
    assert ep.support_x.dtype == torch.float32 and ep.support_y.dtype == torch.int64
    assert ep.support_y.shape == (16, 10) and ep.query_y.shape == (16, 15)
    assert ep.support_y.min() == 0 and ep.support_y.max() == 4 and ep.query_y.max() == 4
    s_cls, q_cls = classes_of(ep.support_x), classes_of(ep.query_x)
    for t in range(16):
        s_map = {int(c): set() for c in range(5)}
        for y, c in zip(ep.support_y[t].tolist(), s_cls[t].tolist(), strict=True):
            s_map[y].add(c)
        q_map = {int(c): set() for c in range(5)}
        for y, c in zip(ep.query_y[t].tolist(), q_cls[t].tolist(), strict=True):
            q_map[y].add(c)
        assert all(len(v) == 1 for v in s_map.values())  # one class per label
        assert s_map == q_map  # query classes == support classes, same labels
        assert len({next(iter(v)) for v in s_map.values()}) == 5  # N distinct classes


def test_sampler_draws_distinct_images_per_class_with_ragged_classes():
    # Class c has c+3 images; image value = its index within the store, so duplicates are visible.
    counts = torch.tensor([3, 4, 5, 6])
    table = torch.full((4, 6), -1)
    start = 0
    for c, n in enumerate(counts.tolist()):
        table[c, :n] = torch.arange(start, start + n)
        start += n
    images = torch.arange(start, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    sampler = ClassificationTaskSampler(images, table, counts, n_way=4, k_shot=1, k_query=2)
    ep = sampler.sample(torch.Generator().manual_seed(1), 50)
    ids = torch.cat([classes_of(ep.support_x), classes_of(ep.query_x)], dim=1)
    assert ids.min() >= 0 and ids.max() < start
    for row in ids.tolist():
        assert len(set(row)) == len(row)  # no image twice in a task, never a padding slot


def test_rotations_add_rotated_classes():
    # A single bright pixel in the top-left corner: each rotation moves it to a different corner.
    images = torch.zeros(2 * 3, 1, 5, 5, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255
    table = torch.arange(6).view(2, 3)
    sampler = ClassificationTaskSampler(images, table, torch.tensor([3, 3]), 8, 1, 2, rotations=True)
    assert sampler.num_classes == 8
    ep = sampler.sample(torch.Generator().manual_seed(0), 4)
    corners = {(0, 0), (0, 4), (4, 0), (4, 4)}
    seen = set()
    for img in ep.support_x.reshape(-1, 5, 5):
        ((r, c),) = (img == 1).nonzero().tolist()
        seen.add((r, c))
    assert seen == corners  # all four orientations appear in an 8-way task over 2 x 4 classes


def test_sampler_rejects_too_many_ways_and_shots():
    images, table, counts = constant_store(20, 5)
    with pytest.raises(ValueError, match="n_way=30 but split 'val' has only 20 classes"):
        ClassificationTaskSampler(images, table, counts, 30, 1, 1, split="val")
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 3 \+ 3 = 6 .* only 5 samples"):
        ClassificationTaskSampler(images, table, counts, 5, 3, 3)


# --- streams: ranks, workers, epochs ------------------------------------------------------------------


def _first_batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_training_stream_differs_per_rank_worker_and_epoch():
    images, table, counts = constant_store(50, 5)
    sampler = ClassificationTaskSampler(images, table, counts, 5, 1, 1)
    rank0 = TrainTaskStream(sampler, 8, seed=0, rank=0, world_size=2)
    rank1 = TrainTaskStream(sampler, 8, seed=0, rank=1, world_size=2)
    a, b = next(iter(rank0)), next(iter(TrainTaskStream(sampler, 8, seed=0, rank=0, world_size=2)))
    assert torch.equal(a.support_x, b.support_x)  # same (seed, rank, worker, epoch): same tasks
    assert not torch.equal(a.support_x, next(iter(rank1)).support_x)

    # Two workers: batches alternate between worker 0 and worker 1 and must differ.
    loader = EpochDataLoader(TrainTaskStream(sampler, 8, seed=0), batch_size=None, num_workers=2)
    w0, w1 = _first_batches(loader, 2)
    assert not torch.equal(w0.support_x, w1.support_x)
    # A new epoch (new iterator over the same loader) draws fresh tasks instead of replaying.
    again = _first_batches(loader, 1)[0]
    assert not torch.equal(again.support_x, w0.support_x)


def test_datamodule_rank_from_trainer_and_override():
    dm = SinusoidDataModule(meta_batch_size=4)
    first = next(iter(dm.train_dataloader())).support_x
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    from_trainer = next(iter(dm.train_dataloader())).support_x
    override = next(iter(dm.train_dataloader(rank=1, world_size=2))).support_x
    assert dm.train_dataloader().dataset.rank == 1
    assert not torch.equal(first, from_trainer)
    assert torch.equal(from_trainer, override)


# --- sinusoid ------------------------------------------------------------------------------------------


def test_sinusoid_batches_and_fixed_eval_sets():
    dm = SinusoidDataModule(k_shot=10, k_query=7, meta_batch_size=25, val_tasks=30, test_tasks=20)
    assert dm.task_type == "regression" and dm.n_way is None
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (25, 10, 1) and ep.query_y.shape == (25, 7, 1)
    assert all(t.dtype == torch.float32 for t in ep)
    assert ep.support_x.abs().max() <= 5 and ep.support_y.abs().max() <= 5
    # y = A sin(x - phi): support and query of a task share A and phi, so one task's points fit one curve.
    x = torch.cat([ep.support_x[0], ep.query_x[0]]).squeeze(-1).double()
    y = torch.cat([ep.support_y[0], ep.query_y[0]]).squeeze(-1).double()
    basis = torch.stack(
        [torch.sin(x), torch.cos(x)], dim=1
    )  # A sin(x - phi) = A cos(phi) sin x - A sin(phi) cos x
    coef = torch.linalg.lstsq(basis, y.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(basis @ coef, y, atol=1e-4)
    amplitude = coef.norm().item()
    assert 0.1 - 1e-4 <= amplitude <= 5 + 1e-4
    phase = math.atan2(-coef[1].item(), coef[0].item())
    assert -1e-4 <= phase <= math.pi + 1e-4

    val = next(iter(dm.val_dataloader()))
    assert val.support_x.shape == (25, 10, 1)
    assert len(dm.val_dataloader().dataset) == 30 and len(dm.test_dataloader().dataset) == 20
    same = SinusoidDataModule(k_shot=10, k_query=7, meta_batch_size=25, val_tasks=30)
    assert torch.equal(next(iter(same.val_dataloader())).support_y, val.support_y)
    other = SinusoidDataModule(k_shot=10, k_query=7, meta_batch_size=25, val_tasks=30, seed=1)
    assert not torch.equal(next(iter(other.val_dataloader())).support_y, val.support_y)
    assert not torch.equal(next(iter(dm.test_dataloader())).support_y[:20], val.support_y[:20])


def test_lightning_cli_style_parsing():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(OmniglotDataModule, "data")
    cfg = parser.parse_args(["--data.n_way", "20", "--data.split", "alphabets", "--data.rotations", "false"])
    assert cfg.data.n_way == 20 and cfg.data.split == "alphabets" and cfg.data.rotations is False
    parser = ArgumentParser()
    parser.add_class_arguments(SinusoidDataModule, "data")
    assert parser.parse_args(["--data.k_shot", "5"]).data.k_shot == 5


# --- Mini-ImageNet on generated pickles ----------------------------------------------------------------


def write_mini_imagenet(root, classes=None, per_class=20):
    """Pickles in learn2learn's MiniImagenet format; every pixel of an image = its global class id."""
    classes = classes or {"train": 10, "validation": 5, "test": 6}
    offset = 0
    for mode, n in classes.items():
        labels = np.repeat(np.arange(n), per_class)
        rng = np.random.default_rng(0)
        order = rng.permutation(len(labels))  # class images interleaved, as in the real caches
        labels = labels[order]
        image_data = np.broadcast_to(
            (labels + offset).astype(np.uint8)[:, None, None, None], (len(labels), 84, 84, 3)
        )
        class_dict = {f"n{offset + c:08d}": np.nonzero(labels == c)[0].tolist() for c in range(n)}
        with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
            pickle.dump({"image_data": np.ascontiguousarray(image_data), "class_dict": class_dict}, f)
        offset += n


def test_mini_imagenet_from_generated_pickles(tmp_path):
    write_mini_imagenet(tmp_path)
    dm = MiniImageNetDataModule(
        root=str(tmp_path), n_way=5, k_shot=1, k_query=15, meta_batch_size=3, val_tasks=4, test_tasks=4
    )
    dm.setup()
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (3, 5, 3, 84, 84) and ep.query_x.shape == (3, 75, 3, 84, 84)
    assert ep.support_x.dtype == torch.float32 and 0 <= ep.support_x.min() and ep.support_x.max() <= 1
    s, q = classes_of(ep.support_x), classes_of(ep.query_x)
    assert s.max() < 10  # train classes are global ids 0..9
    for t in range(3):
        assert {(y, c) for y, c in zip(ep.query_y[t].tolist(), q[t].tolist(), strict=True)} == set(
            zip(ep.support_y[t].tolist(), s[t].tolist(), strict=True)
        )
    val = next(iter(dm.val_dataloader()))
    assert val.support_x.shape == (3, 5, 3, 84, 84)
    assert set(classes_of(val.support_x).flatten().tolist()) <= set(range(10, 15))
    assert set(classes_of(next(iter(dm.test_dataloader())).query_x).flatten().tolist()) <= set(range(15, 21))
    with pytest.raises(ValueError, match="n_way=6 but split 'val' has only 5 classes"):
        MiniImageNetDataModule(root=str(tmp_path), n_way=6).setup("validate")


def test_mini_imagenet_missing_files_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl.*zenodo"):
        MiniImageNetDataModule(root=str(tmp_path)).setup("fit")


# --- Omniglot on a tiny fake tree (error paths, cache, polarity) ---------------------------------------


def write_fake_omniglot(root, background=3, evaluation=2, chars=3, drawings=4):
    """root/omniglot-py/images_{background,evaluation}/<Alphabet>/characterNN/*.png, 105x105 mode '1'."""
    for folder, n_alpha in (("images_background", background), ("images_evaluation", evaluation)):
        for a in range(n_alpha):
            for c in range(chars):
                d = root / "omniglot-py" / folder / f"{folder[7:]}_Alpha{a}" / f"character{c + 1:02d}"
                d.mkdir(parents=True)
                for k in range(drawings):
                    img = Image.new("1", (105, 105), 1)  # white background, black strokes as the real PNGs
                    img.paste(0, (20 + 5 * c, 20 + 5 * k, 80, 80))
                    img.save(d / f"{a:02d}{c:02d}_{k + 1:02d}.png")


def test_fake_omniglot_alphabets_split_polarity_and_cache(tmp_path):
    write_fake_omniglot(tmp_path / "data")
    kwargs = dict(
        root=str(tmp_path / "data"),
        split="alphabets",
        val_alphabets=1,
        n_way=2,
        k_shot=1,
        k_query=2,
        meta_batch_size=2,
        val_tasks=3,
        test_tasks=3,
        cache_dir=str(tmp_path / "cache"),
    )
    dm = OmniglotDataModule(**kwargs)
    assert len(dm.characters("train")) == 6 and len(dm.characters("val")) == 3
    assert len(dm.characters("test")) == 6
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (2, 2, 1, 28, 28) and ep.query_x.shape == (2, 4, 1, 28, 28)
    img = ep.support_x[0, 0, 0]
    assert img[0, 0] == 0 and img[14, 14] > 0.99  # background 0, stroke 1 (inverted PNG)
    assert list((tmp_path / "cache").glob("omniglot_28_*.pt"))
    _MEMO.clear()  # force the second module to read the disk cache
    dm2 = OmniglotDataModule(**kwargs)
    assert torch.equal(next(iter(dm2.val_dataloader())).query_x, next(iter(dm.val_dataloader())).query_x)


def test_omniglot_bad_input(tmp_path):
    for bad in (
        dict(n_way=0),
        dict(k_shot=0),
        dict(k_query=-1),
        dict(meta_batch_size=0),
        dict(image_size=0),
        dict(val_tasks=0),
    ):
        name, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=f"{name}={value}"):
            OmniglotDataModule(root=str(tmp_path), **bad)
    with pytest.raises(ValueError, match="split"):
        OmniglotDataModule(root=str(tmp_path), split="bogus")

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*images_background.*download=True"):
        OmniglotDataModule(root=str(missing)).setup()
    empty = tmp_path / "empty"
    for folder in ("images_background", "images_evaluation"):
        (empty / "omniglot-py" / folder / "Alpha" / "character01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no Omniglot images"):
        OmniglotDataModule(root=str(empty)).setup()

    fake = tmp_path / "fake"
    write_fake_omniglot(fake)
    with pytest.raises(ValueError, match="split='paper' needs more than 1200 characters"):
        OmniglotDataModule(root=str(fake), use_cache=False).setup()
    small = dict(root=str(fake), split="alphabets", val_alphabets=1, use_cache=False, k_query=1)
    with pytest.raises(ValueError, match="n_way=4 but split 'val' has only 3 classes"):
        OmniglotDataModule(n_way=4, **small).setup("validate")
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 4 \+ 1 = 5 .* only 4 samples"):
        OmniglotDataModule(n_way=2, k_shot=4, **small).setup("validate")
    broken = fake / "omniglot-py" / "images_evaluation" / "evaluation_Alpha1" / "character02" / "0101_03.png"
    broken.write_bytes(b"not a png")
    _MEMO.clear()
    with pytest.raises(ValueError, match="0101_03.png"):
        OmniglotDataModule(n_way=2, **small).setup("fit")


# --- inside a Lightning Trainer -------------------------------------------------------------------------


def test_runs_under_lightning_trainer_with_fresh_tasks_each_epoch():
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.first = []
            self.val_shapes = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, Episode)
            if batch_idx == 0:
                self.first.append(batch.support_x.clone())
            return torch.nn.functional.mse_loss(self.layer(batch.support_x), batch.support_y)

        def validation_step(self, batch, batch_idx):
            self.val_shapes.append(tuple(batch.query_x.shape))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = SinusoidDataModule(meta_batch_size=5, val_tasks=6, eval_meta_batch_size=4)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(probe, datamodule=dm)
    assert len(probe.first) == 2 and not torch.equal(probe.first[0], probe.first[1])
    assert probe.val_shapes[-2:] == [(4, 10, 1), (2, 10, 1)]


def test_omniglot_download_uses_official_zips_without_network(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, **kwargs):
        calls.append((url, md5))
        name = filename.removesuffix(".zip")
        write_fake_omniglot(tmp_path / "tmp_fake_" / name)  # build a tree, then move the wanted half in place
        src = tmp_path / "tmp_fake_" / name / "omniglot-py" / name
        src.rename(Path(download_root) / name)

    (tmp_path / "root" / "omniglot-py").mkdir(parents=True)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    dm = OmniglotDataModule(
        root=str(tmp_path / "root"),
        download=True,
        split="alphabets",
        val_alphabets=1,
        n_way=2,
        k_query=1,
        use_cache=False,
    )
    dm.prepare_data()
    assert calls == [
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip",
            "68d2efa1b9178cc56df9314c21c6e718",
        ),
        (
            "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_evaluation.zip",
            "6b91aef0f799c5bb55b94e3f2daec811",
        ),
    ]
    assert len(dm.characters("test")) == 6

    def failing(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", failing)
    with pytest.raises(
        RuntimeError, match="images_background.zip failed.*network unreachable.*IMAML_OMNIGLOT_ROOT"
    ):
        OmniglotDataModule(root=str(tmp_path / "other"), download=True).prepare_data()
