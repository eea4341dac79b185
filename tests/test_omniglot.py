"""OmniglotDataModule on the real Omniglot copy ($IMAML_OMNIGLOT_ROOT, default ../shared/omniglot).

The images are decoded once per session (or read from the ~/.cache/lightning_imaml tensor cache) and shared
by every data module in this file through the module-level memo in datamodules.omniglot.
"""

import os
from pathlib import Path

import pytest
import torch

from datamodules import OmniglotDataModule

ROOT = os.environ.get("IMAML_OMNIGLOT_ROOT") or str(
    Path(__file__).resolve().parents[2] / "shared" / "omniglot"
)
if not (Path(ROOT) / "omniglot-py" / "images_background").is_dir():
    pytest.skip(f"Omniglot not found at {ROOT} (set IMAML_OMNIGLOT_ROOT)", allow_module_level=True)

SMALL = dict(root=ROOT, n_way=5, k_shot=1, k_query=15, meta_batch_size=4, val_tasks=10, test_tasks=10)


@pytest.fixture(scope="module")
def paper():
    dm = OmniglotDataModule(**SMALL)
    dm.setup()  # decodes (or loads) every image once for the whole module
    return dm


@pytest.fixture(scope="module")
def alphabets(paper):
    dm = OmniglotDataModule(split="alphabets", **SMALL)
    dm.setup()
    return dm


def _alphabet(char_id):
    return char_id.split("/")[0]


def test_paper_split_sizes_and_disjoint(paper):
    train, val, test = (set(paper.characters(s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1623
    assert paper.characters("val") == sorted(val)
    # The split is seeded by split_seed only: the task seed does not move characters between splits.
    assert OmniglotDataModule(seed=5, **{k: v for k, v in SMALL.items()}).characters(
        "test"
    ) == paper.characters("test")
    assert OmniglotDataModule(split_seed=1, **SMALL).characters("test") != paper.characters("test")


def test_alphabets_split_sizes_and_disjoint(alphabets):
    train, val, test = (alphabets.characters(s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 964 and len(test) == 659
    train_a, val_a, test_a = ({_alphabet(c) for c in s} for s in (train, val, test))
    assert len(train_a) == 25 and len(val_a) == 5 and len(test_a) == 20  # whole alphabets held out
    assert not (train_a & val_a or train_a & test_a or val_a & test_a)


def test_rotations_only_in_meta_training(paper, alphabets):
    for dm in (paper, alphabets):
        assert dm.sampler("train").num_classes == 4 * len(dm.characters("train"))
        assert dm.sampler("val").num_classes == len(dm.characters("val"))
        assert dm.sampler("test").num_classes == len(dm.characters("test"))
    plain = OmniglotDataModule(rotations=False, **SMALL)
    assert plain.sampler("train").num_classes == 1100


def test_episode_shapes_dtypes_and_ranges(paper):
    ep = next(iter(paper.train_dataloader()))
    assert ep.support_x.shape == (4, 5, 1, 28, 28) and ep.query_x.shape == (4, 75, 1, 28, 28)
    assert ep.support_y.shape == (4, 5) and ep.query_y.shape == (4, 75)
    assert ep.support_x.dtype == torch.float32 and ep.query_y.dtype == torch.int64
    assert ep.support_x.min() >= 0 and ep.support_x.max() <= 1
    assert set(ep.support_y.flatten().tolist()) == set(range(5))
    assert set(ep.query_y.flatten().tolist()) == set(range(5))
    # Stroke = 1 on background 0: most pixels of a character are background.
    assert ep.query_x.mean() < 0.3
    val = next(iter(paper.val_dataloader()))
    assert val.support_x.shape == (4, 5, 1, 28, 28) and val.query_y.shape == (4, 75)


def test_query_classes_equal_support_classes(paper):
    # Identify every image of the val split by its bytes to recover its character.
    sampler = paper.sampler("val")
    owner = {}
    for c, row in enumerate(sampler.class_table.tolist()):
        for i in row:
            owner.setdefault(sampler.images[i].numpy().tobytes(), set()).add(c)

    def char(img):
        return owner[(img * 255).round().to(torch.uint8).numpy().tobytes()]

    for ep in paper.val_dataloader():
        for t in range(ep.support_x.shape[0]):
            support = {}
            for img, y in zip(ep.support_x[t], ep.support_y[t].tolist(), strict=True):
                support.setdefault(y, set()).update(char(img))
            for img, y in zip(ep.query_x[t], ep.query_y[t].tolist(), strict=True):
                assert char(img) & support[y]  # the query image belongs to its label's support character
            assert len(set.union(*support.values())) >= 5


def test_eval_sets_reproducible_and_seeded(paper):
    again = OmniglotDataModule(**SMALL)
    for split in ("val", "test"):
        a, b = paper.fixed_tasks(split), again.fixed_tasks(split)
        assert all(torch.equal(a[i].query_x, b[i].query_x) for i in range(len(a)))
    other = OmniglotDataModule(seed=1, **{k: v for k, v in SMALL.items()})
    assert not torch.equal(paper.fixed_tasks("val")[0].support_x, other.fixed_tasks("val")[0].support_x)
    # Same tasks whatever the worker count.
    workers = OmniglotDataModule(num_workers=2, **SMALL)
    assert torch.equal(
        torch.cat([b.query_x for b in workers.val_dataloader()]),
        torch.cat([b.query_x for b in paper.val_dataloader()]),
    )


def test_ranks_and_workers_draw_different_training_tasks(paper):
    r0 = next(iter(paper.train_dataloader(rank=0, world_size=2)))
    r1 = next(iter(paper.train_dataloader(rank=1, world_size=2)))
    assert not torch.equal(r0.support_x, r1.support_x)
    dm = OmniglotDataModule(num_workers=2, **SMALL)
    it = iter(dm.train_dataloader())
    w0, w1 = next(it), next(it)
    assert not torch.equal(w0.support_x, w1.support_x)


def test_too_many_ways_on_real_splits(paper):
    with pytest.raises(ValueError, match="n_way=101 but split 'val' has only 100 classes"):
        OmniglotDataModule(**{**SMALL, "n_way": 101}).setup("validate")
    with pytest.raises(ValueError, match=r"k_shot \+ k_query = 10 \+ 11 = 21 .* only 20 samples"):
        OmniglotDataModule(**{**SMALL, "k_shot": 10, "k_query": 11}).setup("fit")
