"""The README's examples run as written (issue 25: every README command keeps working).

Python blocks run in a subprocess, the long ones shrunk by plain text substitutions (fewer steps and tasks);
``python train.py ...`` lines of the bash blocks run through ``train.cli_main`` with the same kind of
shrinking overrides appended, except those that need a GPU or several processes (tests/test_ddp.py runs
those).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
sys.path.insert(0, str(ROOT))

import train  # noqa: E402

OMNIGLOT = Path(os.environ.get("IMAML_OMNIGLOT_ROOT") or ROOT.parent / "shared" / "omniglot")
HAVE_OMNIGLOT = (OMNIGLOT / "omniglot-py" / "images_background").is_dir()


def blocks(lang: str) -> list[str]:
    return [textwrap.dedent(b) for b in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)]


# shrinking substitutions for the Python examples: same code paths, seconds instead of hours
SHRINK = {
    "max_steps=20000": "max_steps=2",
    "val_check_interval=1000": "val_check_interval=2, limit_val_batches=1, limit_test_batches=1,"
    " logger=False",
    "meta_batch_size=32": "meta_batch_size=2",
    'ckpt_path="best"': "ckpt_path=None",
}


def _shrunk(code: str) -> str:
    for old, new in SHRINK.items():
        code = code.replace(old, new)
    return code


def python_examples():
    out = []
    for code in blocks("python"):
        needs_omniglot = "OmniglotDataModule" in code or "IMAML.load_from_checkpoint" in code
        if "get_tasksets" in code:  # learn2learn's benchmark builders download their data: no network here
            out.append(pytest.param(code, marks=pytest.mark.skip(reason="learn2learn downloads the data")))
            continue
        out.append(
            pytest.param(
                code, marks=pytest.mark.skipif(needs_omniglot and not HAVE_OMNIGLOT, reason="no data")
            )
        )
    return out


@pytest.mark.parametrize("code", python_examples())
def test_python_examples_run(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_shrunk(code))
    # run where a user's project would (what the Trainer writes lands in tmp_path, not in the checkout), with
    # the shipped models where the README's relative paths find them
    (tmp_path / "pretrained").symlink_to(ROOT / "pretrained")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IMAML_OMNIGLOT_ROOT": str(OMNIGLOT.resolve())}
    before = set(os.listdir(ROOT))
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert set(os.listdir(ROOT)) <= before, "the example wrote into the checkout"
    assert r.returncode == 0, r.stderr[-3000:]


def train_commands() -> list[str]:
    """Every ``python train.py`` line of the README's bash blocks (continuations joined)."""
    lines = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        lines += [
            ln.split("#")[0].strip() for ln in text.splitlines() if ln.strip().startswith("python train.py")
        ]
    return lines


def test_the_readme_shows_train_commands():
    assert len(train_commands()) >= 6


@pytest.mark.parametrize("command", train_commands())
def test_train_commands_run(command, tmp_path, monkeypatch, capsys):
    args = shlex.split(command)[2:]
    if "gpu" in args or "ddp" in args:
        pytest.skip("needs a GPU or several processes (tests/test_ddp.py)")
    if "--config" in args and "omniglot" in args[args.index("--config") + 1] and not HAVE_OMNIGLOT:
        pytest.skip("no Omniglot")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setenv("IMAML_OMNIGLOT_ROOT", str(OMNIGLOT.resolve()))
    if "--help" in args or "--print_config" in args:
        with pytest.raises(SystemExit) as exc:
            train.cli_main(args=args)
        assert exc.value.code == 0
        return
    base = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    base += ["--data.meta_batch_size", "2", "--data.val_tasks", "2", "--data.test_tasks", "2"]
    fit = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--test_after_fit", "false"]
    if "--ckpt_path" in args:  # a checkpoint written the way the README says: fit first, then test it
        config = args[args.index("--config") + 1]
        train.cli_main(args=["fit", "--config", config, *base, *fit])
        found = sorted(tmp_path.rglob("last.ckpt"))
        assert found, "fit wrote no last.ckpt"
        args[args.index("--ckpt_path") + 1] = str(found[-1])
    if args[0] == "fit":
        base += fit
    train.cli_main(args=[*args, *base])
