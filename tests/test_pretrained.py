"""The trained models shipped in ``pretrained/`` (listed in ``pretrained/checkpoints.json``): each
loads with its learner's ``load_from_checkpoint`` alone, adapts with ``adapt_task`` as the README shows,
and on fixed Omniglot meta-test tasks reaches the accuracy its manifest entry states, far above the same
network untrained. This is what catches a broken file, a renamed parameter or a loader change."""

import importlib
import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import lightning_imaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "pretrained" / "checkpoints.json"
ENTRIES = json.loads(MANIFEST.read_text())["checkpoints"] if MANIFEST.exists() else []


def test_manifest_lists_every_shipped_file_and_each_is_small():
    files = sorted(p.name for p in (ROOT / "pretrained").glob("*.ckpt"))
    assert files == sorted(e["file"] for e in ENTRIES)
    for e in ENTRIES:
        assert (ROOT / "pretrained" / e["file"]).stat().st_size < 2 * 2**20
        keys = ("learner", "config", "test_acc", "test_acc_ci95", "command", "check_tasks", "check_min_acc")
        for key in keys:
            assert key in e, f"{e['file']}: manifest entry lacks {key!r}"


def meta_test_tasks(entry, n_tasks):
    from datamodules import OmniglotDataModule

    data = entry["data"]
    try:
        dm = OmniglotDataModule(test_tasks=n_tasks, eval_meta_batch_size=n_tasks, **data)
        dm.setup("test")
    except (FileNotFoundError, RuntimeError, ValueError):
        pytest.skip("Omniglot not found under $IMAML_OMNIGLOT_ROOT")
    return next(iter(dm.test_dataloader()))


def accuracy(learner, theta, tasks):
    sx, sy, qx, qy = tasks
    correct = 0.0
    for t in range(sx.shape[0]):
        phi = learner.adapt_task(theta, sx[t], sy[t])
        with torch.no_grad():
            pred = functional_call(learner.model, phi, (qx[t],)).argmax(-1)
        correct += (pred == qy[t]).float().mean().item()
    return correct / sx.shape[0]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_shipped_checkpoint_adapts_well_above_the_untrained_network(entry):
    torch.manual_seed(0)
    cls = getattr(lightning_imaml, entry["learner"])
    learner = cls.load_from_checkpoint(ROOT / "pretrained" / entry["file"], map_location="cpu")
    tasks = meta_test_tasks(entry, entry["check_tasks"])
    acc = accuracy(learner, learner.meta_parameters(), tasks)
    hparams = torch.load(ROOT / "pretrained" / entry["file"], weights_only=True)["hyper_parameters"]
    config = hparams["model"]  # the network as a LightningCLI class_path config
    module, name = config["class_path"].rsplit(".", 1)
    untrained = getattr(importlib.import_module(module), name)(**config.get("init_args", {}))
    base = accuracy(learner, dict(untrained.named_parameters()), tasks)
    print(f"{entry['file']}: {acc:.4f} on {entry['check_tasks']} test tasks; untrained {base:.4f}")
    assert acc >= entry["check_min_acc"]
    assert acc >= base + 0.2


def test_ship_checkpoint_makes_an_export_loadable_alone(tmp_path):
    """An export as benchmarks/accuracy.py --methods writes it (the learner built around a network object,
    so the file lacks the network): load_from_checkpoint alone cannot rebuild it; after
    scripts/ship_checkpoint.py it does, with the same weights and solvers."""
    import subprocess
    import sys

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_imaml import IMAML, OmniglotConv4

    torch.manual_seed(0)
    learner = IMAML(OmniglotConv4(n_way=5, hidden=8), inner_steps=2, eval_inner_steps=3)
    x = torch.randn(2, 5, 1, 14, 14)
    y = torch.arange(5).expand(2, -1).contiguous()
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(learner, train_dataloaders=DataLoader([(x, y, x, y)], batch_size=None))
    export = tmp_path / "imaml.ckpt"
    trainer.save_checkpoint(export, weights_only=True)
    with pytest.raises(TypeError, match="model"):
        IMAML.load_from_checkpoint(export)
    shipped = tmp_path / "shipped.ckpt"
    args = ["--learner", "lightning_imaml.IMAML", "--network", "lightning_imaml.OmniglotConv4",
            "--network-args", '{"n_way": 5, "hidden": 8}']  # fmt: skip
    script = str(ROOT / "scripts" / "ship_checkpoint.py")
    r = subprocess.run([sys.executable, script, str(export), str(shipped), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = IMAML.load_from_checkpoint(shipped)
    assert loaded.eval_solver == learner.eval_solver and loaded.inner_solver == learner.inner_solver
    for (k, a), (k2, b) in zip(learner.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert "optimizer_states" not in torch.load(shipped, weights_only=True)
