"""train.py (LightningCLI): every config runs, fit -> test on a checkpoint, help, and clear errors.

The CLI runs in-process through ``train.cli_main(args=[...])`` (no interpreter start-up, no re-import of
torch); the few checks about what a user sees in a terminal (help text, exit status, no traceback) run it in
a subprocess. Every run is shrunk through command-line overrides (tiny meta-batches, 1-2 inner steps, a
handful of validation/test tasks), so the whole file stays well within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TRAIN = ROOT / "train.py"
sys.path.insert(0, str(ROOT))

import train  # noqa: E402

OMNIGLOT_ROOT = Path(os.environ.get("IMAML_OMNIGLOT_ROOT") or ROOT.parent / "shared" / "omniglot").resolve()
HAVE_OMNIGLOT = (OMNIGLOT_ROOT / "omniglot-py" / "images_background").is_dir()

ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
PAPER_CONFIGS = [
    "omniglot_5way1shot_imaml_gd.yaml",
    "omniglot_5way5shot_imaml_gd.yaml",
    "omniglot_20way1shot_imaml_gd.yaml",
    "omniglot_20way1shot_imaml_gd_alphabets.yaml",
    "omniglot_20way5shot_imaml_gd.yaml",
    "omniglot_5way1shot_imaml_hf.yaml",
    "omniglot_5way1shot_imaml_lbfgs.yaml",
    "omniglot_5way5shot_imaml_hf.yaml",
    "omniglot_20way1shot_imaml_hf.yaml",
    "omniglot_20way5shot_imaml_hf.yaml",
    "mini_imagenet_5way1shot_imaml.yaml",
    "sinusoid_imaml.yaml",
    "omniglot_5way1shot_maml.yaml",
    "omniglot_5way1shot_fomaml.yaml",
    "l2l_mini_imagenet_5way1shot_imaml.yaml",
]


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _shrink(name: str) -> list[str]:
    """Command-line overrides that make a config's run tiny (same code paths, less work)."""
    cfg = _load(name)
    model = cfg["model"]["init_args"]
    args = [
        "--data.meta_batch_size", "2",
        "--data.val_tasks", "2",
        "--data.test_tasks", "2",
        "--model.inner_steps", "1",
        "--model.eval_inner_steps", "1",
    ]  # fmt: skip
    if "cg_steps" in model:
        args += ["--model.cg_steps", "1"]
    if "hf_cg_steps" in model:
        args += ["--model.hf_cg_steps", "1"]
    if cfg["data"]["class_path"].endswith(("OmniglotDataModule", "MiniImageNetDataModule")):
        args += ["--data.k_query", "1"]
    return args


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path (lightning_logs/ lands there) with the shared Omniglot copy found by absolute path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])  # the CLI gets its arguments from args=[...]
    monkeypatch.setenv("IMAML_OMNIGLOT_ROOT", str(OMNIGLOT_ROOT))
    return tmp_path


def _mini_imagenet_pickles(root: Path, classes: int = 5, per_class: int = 2) -> Path:
    """Tiny caches in the standard format: {'image_data': uint8 [n,84,84,3], 'class_dict': {name: [idx]}}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for mode in ("train", "validation", "test"):
        n = classes * per_class
        data = {
            "image_data": rng.integers(0, 256, size=(n, 84, 84, 3), dtype=np.uint8),
            "class_dict": {
                f"n{mode}{c:03d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)
            },
        }
        with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
            pickle.dump(data, f)
    return root


def _run_subprocess(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------------------
def test_every_paper_experiment_has_a_config():
    assert sorted(PAPER_CONFIGS) == ALL_CONFIGS


@pytest.mark.parametrize("name", [n for n in ALL_CONFIGS if n != "sinusoid_imaml.yaml"])
def test_config_header_states_paper_number(name):
    header = [line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#")]
    top = "\n".join(header[:4])
    assert "%" in top and "Table" in top, name


def test_embedded_default_equals_sinusoid_config(in_tmp):
    default = train.cli_main(args=[], run=False)
    from_file = train.cli_main(args=["--config", str(CONFIGS / "sinusoid_imaml.yaml")], run=False)
    for key in ("model", "data", "seed_everything"):
        assert default.config[key] == from_file.config[key], key
    for key in ("max_steps", "val_check_interval", "check_val_every_n_epoch", "log_every_n_steps"):
        assert default.config.trainer[key] == from_file.config.trainer[key], key
    assert type(default.model).__name__ == "IMAML"
    assert type(default.model.model).__name__ == "SinusoidMLP"
    assert type(default.datamodule).__name__ == "SinusoidDataModule"
    assert default.model.task_type == "regression"


def test_classes_picked_on_the_command_line_get_their_own_defaults(in_tmp):
    """Without --config, `--model MAML --model.model OmniglotConv4 --data OmniglotDataModule` must not inherit
    the embedded sinusoid experiment's values (lam 2, SinusoidMLP's width 40, k_shot 10, ...)."""
    args = ["--model", "MAML", "--model.model", "OmniglotConv4", "--data", "OmniglotDataModule"]
    cli = train.cli_main(args=[*args, "--data.n_way", "20"], run=False)
    assert type(cli.model).__name__ == "MAML" and cli.model.lam == 0.0
    assert cli.model.task_type == "classification"
    convs = [m for m in cli.model.model.modules() if hasattr(m, "out_channels")]
    assert convs[0].out_channels == 64  # OmniglotConv4's own width
    assert [m for m in cli.model.model.modules() if hasattr(m, "out_features")][-1].out_features == 20
    dm = cli.datamodule
    assert (dm.n_way, dm.k_shot, dm.k_query, dm.meta_batch_size) == (20, 1, 15, 32)
    # `--model MAML` alone: MAML on the embedded sinusoid experiment
    cli = train.cli_main(args=["--model", "MAML"], run=False)
    assert type(cli.model).__name__ == "MAML" and type(cli.model.model).__name__ == "SinusoidMLP"
    assert cli.model.task_type == "regression" and type(cli.datamodule).__name__ == "SinusoidDataModule"


# ------------------------------------------------------------------------------------------------------------
# a fast_dev_run fit (then the automatic meta-test) for every config
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_smoke_fit(name, in_tmp, capsys):
    cfg = _load(name)
    data_cls = cfg["data"]["class_path"]
    extra: list[str] = []
    if data_cls.endswith("OmniglotDataModule") and not HAVE_OMNIGLOT:
        pytest.skip(f"Omniglot not found at {OMNIGLOT_ROOT} (set IMAML_OMNIGLOT_ROOT)")
    if data_cls.endswith("MiniImageNetDataModule"):
        extra = ["--data.root", str(_mini_imagenet_pickles(in_tmp / "mini"))]
    if data_cls.endswith("L2LTaskSetDataModule"):  # learn2learn reads the same pickles (no download: present)
        pytest.importorskip("learn2learn")
        extra = ["--data.root", str(_mini_imagenet_pickles(in_tmp / "mini")), "--data.k_query", "1"]
    cli = train.cli_main(
        args=["fit", "--config", str(CONFIGS / name), "--trainer.fast_dev_run", "1", *_shrink(name), *extra]
    )
    assert cli.trainer.state.finished
    assert cli.trainer.global_step == 1
    out = capsys.readouterr().out
    assert "Meta-test" in out
    task = getattr(cli.datamodule, "task_type", "classification")
    assert ("accuracy" in out) == (task == "classification")
    assert cli.trainer.checkpoint_callback.monitor == ("val/acc" if task == "classification" else "val/mse")
    assert cli.trainer.checkpoint_callback.mode == ("max" if task == "classification" else "min")
    # the network's n_way follows the data module's
    n_way = cfg["data"]["init_args"].get("n_way")
    if n_way is not None:
        net = cli.model.model
        assert [m for m in net.modules() if hasattr(m, "out_features")][-1].out_features == n_way


# ------------------------------------------------------------------------------------------------------------
# fit, then test on the checkpoint
# ------------------------------------------------------------------------------------------------------------
def test_fit_then_test_on_checkpoint(in_tmp, capsys):
    config = str(CONFIGS / "sinusoid_imaml.yaml")
    tiny = [
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false",
        "--data.meta_batch_size", "4",
        "--data.val_tasks", "4",
        "--data.test_tasks", "8",
        "--model.inner_steps", "2",
        "--model.eval_inner_steps", "2",
        "--model.cg_steps", "2",
    ]  # fmt: skip
    fit = train.cli_main(args=["fit", "--config", config, *tiny, "--test_after_fit", "false"])
    assert fit.trainer.global_step == 2
    ckpt_cb = fit.trainer.checkpoint_callback
    assert ckpt_cb.monitor == "val/mse" and ckpt_cb.mode == "min"
    best, last = Path(ckpt_cb.best_model_path), Path(ckpt_cb.last_model_path)
    assert best.is_file() and last.is_file()
    run_dir = in_tmp / "lightning_logs" / "sinusoid_imaml" / "version_0"
    assert best.resolve().parent == run_dir / "checkpoints"
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "config.yaml").is_file()
    assert "Meta-test" not in capsys.readouterr().out  # --test_after_fit false

    test = train.cli_main(args=["test", "--config", config, *tiny, "--ckpt_path", str(best)])
    out = capsys.readouterr().out
    assert "Meta-test over 8 test tasks" in out and "mse" in out and "+-" in out
    metrics = test.trainer.callback_metrics
    assert {"test/mse", "test/mse_ci95"} <= set(metrics)
    # the tested weights are the checkpoint's
    import torch

    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in test.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_default_fit_ends_with_meta_test_table(in_tmp, capsys):
    """`python train.py fit` without config (shrunk here): trains, validates, prints the meta-test table."""
    args = [
        "fit",
        "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "1",
        "--trainer.enable_progress_bar", "false",
        "--data.val_tasks", "4",
        "--data.test_tasks", "6",
        "--data.meta_batch_size", "3",
    ]  # fmt: skip
    cli = train.cli_main(args=args)
    out = capsys.readouterr().out
    assert "Meta-test (best checkpoint) over 6 test tasks" in out
    assert cli.trainer.checkpoint_callback.best_model_path
    assert (in_tmp / "lightning_logs" / "sinusoid_imaml" / "version_0" / "metrics.csv").is_file()


# ------------------------------------------------------------------------------------------------------------
# help and errors, as a user sees them
# ------------------------------------------------------------------------------------------------------------
def test_fit_help_lists_model_data_and_trainer_options():
    res = _run_subprocess("fit", "--help")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for flag in (
        "--model",
        "--model.help",
        "--data",
        "--data.help",
        "--trainer.max_steps",
        "--trainer.devices",
        "--trainer.strategy",
        "--trainer.precision",
        "--checkpoint.monitor",
        "--test_after_fit",
        "--ckpt_path",
    ):
        assert flag in out, flag
    # the model and data classes on offer, and the embedded default experiment's values
    for name in (
        "lightning_imaml.IMAML",
        "lightning_imaml.MAML",
        "lightning_imaml.FOMAML",
        "datamodules.OmniglotDataModule",
        "datamodules.MiniImageNetDataModule",
        "datamodules.SinusoidDataModule",
        "'lam': 2.0",
        "'meta_batch_size': 10",
    ):
        assert name in " ".join(out.split()), name


def test_model_help_lists_imaml_arguments(in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        train.cli_main(args=["fit", "--model.help", "IMAML"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("lam", "inner_steps", "inner_lr", "inner_optimizer", "cg_steps", "cg_damping", "optimizer"):
        assert f"--model.{name}" in out or f"--model.init_args.{name}" in out, name


def test_data_help_lists_omniglot_arguments(in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        train.cli_main(args=["fit", "--data.help", "OmniglotDataModule"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("root", "n_way", "k_shot", "k_query", "meta_batch_size", "split", "rotations", "download"):
        assert f"--data.{name}" in out or f"--data.init_args.{name}" in out, name


def test_wrong_flag_is_a_clear_error(in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        train.cli_main(args=["fit", "--trainer.max_stepz", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and "Traceback" not in err


def test_wrong_type_is_a_clear_error(in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        train.cli_main(args=["fit", "--model.inner_steps", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "inner_steps" in err and "Traceback" not in err


def test_config_with_bad_value_is_a_clear_error(in_tmp):
    cfg = _load("sinusoid_imaml.yaml")
    cfg["model"]["init_args"]["lam"] = -1.0
    bad = in_tmp / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    res = _run_subprocess("fit", "--config", str(bad))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "lam" in res.stderr and "-1.0" in res.stderr
    assert "Union subtypes" not in res.stderr  # the class's own message, not jsonargparse's wrapping
    assert "Traceback" not in res.stderr
    assert "usage:" in res.stderr


def test_unknown_config_key_is_a_clear_error(in_tmp, capsys):
    cfg = _load("sinusoid_imaml.yaml")
    cfg["model"]["init_args"]["lamda"] = 2.0
    bad = in_tmp / "typo.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        train.cli_main(args=["fit", "--config", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "lamda" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# the user's errors found once the run starts: one line, exit status 2 (issue 24)
# ------------------------------------------------------------------------------------------------------------
def _user_error(*args: str, timeout: int = 300) -> str:
    """Run train.py in a subprocess; assert exit status 2, no traceback, at most 6 lines of output
    (Lightning's own 'GPU available' banner included) ending in one 'error: ...' line; return that line."""
    with (
        tempfile.TemporaryDirectory() as root
    ):  # what the run writes (its config.yaml) stays out of the checkout
        res = _run_subprocess(
            *args, "--trainer.logger", "false", "--trainer.default_root_dir", root, timeout=timeout
        )
    out = (res.stdout + res.stderr).strip().splitlines()
    lines = [ln for ln in out if "warn" not in ln.lower()]
    assert res.returncode == 2, (res.returncode, out[-20:])
    assert "Traceback" not in res.stderr
    assert len(lines) <= 6, lines
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.fixture(scope="module")
def sinusoid_maml_ckpt(tmp_path_factory) -> Path:
    """A checkpoint written by `train.py fit --model MAML` on the embedded sinusoid experiment (2 steps)."""
    d = tmp_path_factory.mktemp("maml_ckpt")
    res = subprocess.run(
        [sys.executable, str(TRAIN), "fit", "--model", "MAML", "--model.inner_lr", "0.01",
         "--trainer.max_steps", "1",
         "--trainer.limit_val_batches", "1", "--test_after_fit", "false", "--data.val_tasks", "2"],
        cwd=d, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return next(d.rglob("last.ckpt"))


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found")
def test_missing_data_root_is_one_line():
    line = _user_error(
        "fit", "--config", "configs/omniglot_5way1shot_imaml_gd.yaml", "--data.root", "/nonexistent"
    )
    assert "/nonexistent" in line and "IMAML_OMNIGLOT_ROOT" in line


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found")
@pytest.mark.parametrize("flag,value,named", [("n_way", "200", "n_way=200"), ("k_shot", "25", "k_shot")])
def test_sizes_the_split_cannot_serve_are_one_line(flag, value, named):
    line = _user_error("fit", "--config", "configs/omniglot_5way1shot_imaml_gd.yaml", f"--data.{flag}", value)
    assert named in line and value in line


def test_missing_checkpoint_is_one_line():
    line = _user_error("test", "--ckpt_path", "/nonexistent.ckpt")
    assert "/nonexistent.ckpt" in line and "does not exist" in line


def test_a_file_that_is_not_a_checkpoint_is_one_line():
    line = _user_error("test", "--ckpt_path", str(ROOT / "README.md"))
    assert "README.md" in line and "not a checkpoint" in line and "weights_only" not in line


@pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found")
def test_a_checkpoint_of_another_learner_or_network_is_one_line(sinusoid_maml_ckpt):
    line = _user_error(
        "test", "--config", "configs/omniglot_5way1shot_imaml_gd.yaml", "--ckpt_path", str(sinusoid_maml_ckpt)
    )
    assert "MAML" in line and "IMAML" in line
    line = _user_error(
        "test", "--config", "configs/omniglot_5way1shot_maml.yaml", "--ckpt_path", str(sinusoid_maml_ckpt)
    )
    assert "SinusoidMLP" in line and "OmniglotConv4" in line


def test_traceback_flag_shows_the_traceback_of_a_user_error():
    res = _run_subprocess(
        "test", "--ckpt_path", "/nonexistent.ckpt", "--traceback", "--trainer.logger", "false"
    )
    assert res.returncode != 0 and "Traceback" in res.stderr and "CheckpointNotFoundError" in res.stderr


def test_the_python_api_raises_the_same_messages_with_the_old_types(tmp_path):
    from datamodules import OmniglotDataModule
    from lightning_imaml import IMAML
    from lightning_imaml.errors import UserInputError

    with pytest.raises(FileNotFoundError, match="/nonexistent.ckpt") as exc:
        IMAML.load_from_checkpoint("/nonexistent.ckpt")
    assert isinstance(exc.value, UserInputError)
    with pytest.raises(ValueError, match="README.md") as exc:
        IMAML.load_from_checkpoint(str(ROOT / "README.md"))
    assert isinstance(exc.value, UserInputError)
    with pytest.raises(FileNotFoundError, match="/nonexistent") as exc:
        OmniglotDataModule(root="/nonexistent").setup("fit")
    assert isinstance(exc.value, UserInputError)
    if HAVE_OMNIGLOT:
        with pytest.raises(ValueError, match="n_way=200") as exc:
            OmniglotDataModule(root=str(OMNIGLOT_ROOT), n_way=200).setup("fit")
        assert isinstance(exc.value, UserInputError)


# ------------------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------------------
def test_meta_test_table_format():
    metrics = {"test/acc": 0.9916, "test/acc_ci95": 0.0035, "test/loss": 0.03}
    table = train.format_meta_test_table(metrics, 600)
    assert "over 600 test tasks" in table
    assert "99.16% +- 0.35%" in table
    reg = train.format_meta_test_table({"test/mse": 0.5, "test/mse_ci95": 0.01})
    assert "0.5000 +- 0.0100" in reg and "accuracy" not in reg


LOAD_SCRIPT = """
import json, sys
import torch
from lightning_imaml import {cls}

learner = {cls}.load_from_checkpoint(sys.argv[1], weights_only=True)  # no model=: rebuilt from the config
x = torch.linspace(-5, 5, 7)[:, None]
with torch.no_grad():
    print("PRED", json.dumps(learner(x).reshape(-1).tolist()))
print("CLASS", type(learner).__name__, type(learner.model).__name__)
"""


@pytest.mark.parametrize("cls", ["IMAML", "MAML", "FOMAML"])
def test_checkpoint_from_train_py_reloads_by_load_from_checkpoint_alone(tmp_path, cls):
    """issue 16, bug 1: a checkpoint written by `train.py fit` reloads with `Cls.load_from_checkpoint(path)`
    in a fresh process, under weights_only=True, and predicts what its saved weights predict."""
    import json

    import torch

    model_args = [] if cls == "IMAML" else ["--model", cls, "--model.model", "SinusoidMLP"]
    model_args += [
        "--model.task_type",
        "regression",
        "--model.inner_steps",
        "1",
        "--model.eval_inner_steps",
        "1",
    ]
    fit = subprocess.run(
        [sys.executable, str(TRAIN), "fit", *model_args, "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "1", "--data.val_tasks", "2", "--data.test_tasks", "2",
         "--test_after_fit", "false", "--trainer.enable_progress_bar", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next((tmp_path / "lightning_logs").rglob("last.ckpt"))
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(cls=cls))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    load = subprocess.run(
        [sys.executable, str(script), str(ckpt)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in load.stdout.splitlines() if ln.startswith(("PRED", "CLASS")))
    assert lines["CLASS"] == f"{cls} SinusoidMLP"
    # independent reconstruction: the saved weights in a fresh network
    from lightning_imaml import SinusoidMLP

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    net = SinusoidMLP()
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    with torch.no_grad():
        expected = net(torch.linspace(-5, 5, 7)[:, None]).reshape(-1)
    # same weights; the two processes' matmuls may round differently (thread count), hence 1e-6
    torch.testing.assert_close(torch.tensor(json.loads(lines["PRED"])), expected, rtol=1e-6, atol=1e-7)
