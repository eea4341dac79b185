"""Each benchmark script's ``--quick`` mode runs end to end and writes JSON of the documented schema and a
PNG. Only the schema (keys and types) is checked, never the figures. Each script runs in a subprocess, as a
user runs it, with one torch thread so that the tests stay fast on a shared machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
NUM = (int, float)


def _run(script: str, out: Path, *extra: str, timeout: int = 300) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed:\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-3000:]}"
    assert out.exists(), f"{script} wrote no {out}"
    assert out.with_suffix(".png").exists(), f"{script} wrote no plot"
    assert out.with_suffix(".png").stat().st_size > 1000
    return json.loads(out.read_text())


def _check_machine(m: dict) -> None:
    for key in ("cpu_count", "torch_num_threads", "torch", "device"):
        assert key in m, key
    assert isinstance(m["cpu_count"], int)
    assert isinstance(m["torch"], str)
    assert m["gpu_name"] is None or isinstance(m["gpu_name"], str)


def test_speed_quick(tmp_path):
    d = _run("speed.py", tmp_path / "speed.json", "--threads", "1")
    assert d["benchmark"] == "speed"
    _check_machine(d["machine"])
    for key in ("n_way", "k_shot", "k_query", "meta_batch_size", "inner_steps", "cg_steps", "lam", "rounds"):
        assert isinstance(d["config"][key], NUM), key
    assert d["config"]["quick"] is True
    assert isinstance(d["contenders"], dict) and d["contenders"]
    assert isinstance(d["skipped"], dict)
    # every contender is either timed or skipped with a reason
    expected = {
        "imaml",
        "imaml_batched",
        "torchopt_cg",
        "torchopt_normal_cg",
        "maml",
        "fomaml",
        "l2l_maml",
        "floor",
    }
    assert expected <= set(d["contenders"]) | set(d["skipped"])
    # this project's own contenders (and the floor) must run: a crash would only move them to "skipped"
    assert {"imaml", "imaml_batched", "imaml_learned_lam", "maml", "fomaml", "floor"} <= set(
        d["contenders"]
    ), d["skipped"]
    # peers may be missing from the machine (then skipped with the reason), never crash when installed
    for peer, module in (
        ("l2l_maml", "learn2learn"),
        ("torchopt_cg", "torchopt"),
        ("torchopt_normal_cg", "torchopt"),
    ):
        if importlib.util.find_spec(module) is not None:
            assert peer in d["contenders"], d["skipped"].get(peer)
    assert d["reference"] in d["contenders"]
    for name, c in d["contenders"].items():
        assert isinstance(c["median_s"], float) and c["median_s"] > 0, name
        assert isinstance(c["times_s"], list) and len(c["times_s"]) == d["config"]["rounds"], name
        assert isinstance(c["ratio_to_imaml"], float), name
        assert c["peak_memory_mib"] is None or isinstance(c["peak_memory_mib"], float), name
        assert isinstance(c["note"], str), name
    for key in ("imaml_over_torchopt_cg", "imaml_over_floor", "imaml_over_l2l_maml", "batched_over_looped"):
        assert key in d["summary"]
        assert d["summary"][key] is None or isinstance(d["summary"][key], float)
    if "torchopt_cg" in d["contenders"]:
        for dtype in ("float32", "float64"):
            ag = d["agreement"][dtype]
            for part in ("same_phi", "end_to_end"):
                assert isinstance(ag[part]["rel_err"], float)
                assert isinstance(ag[part]["cosine"], float)
            # the same linear system, the same CG: agreement to rounding (measured 4.3e-7 f32, 6.0e-16 f64)
            assert ag["same_phi"]["rel_err"] < (1e-5 if dtype == "float32" else 1e-12), (dtype, ag)
            assert isinstance(ag["scaling_rel_err_lam_u_vs_x"], float)


def test_memory_quick(tmp_path):
    d = _run("memory.py", tmp_path / "memory.json", "--threads", "1")
    assert d["benchmark"] == "memory"
    _check_machine(d["machine"])
    cfg = d["config"]
    assert isinstance(cfg["inner_steps"], list) and isinstance(cfg["n_ways"], list)
    assert isinstance(cfg["k_query"], int)
    assert d["failures"] == [], d["failures"]
    assert len(d["cases"]) == len(cfg["inner_steps"]) * len(cfg["n_ways"]) * len(cfg["methods"])
    for c in d["cases"]:
        assert c["method"] in cfg["methods"]
        assert isinstance(c["n_way"], int) and isinstance(c["inner_steps"], int)
        assert isinstance(c["peak_mib"], float) and c["peak_mib"] >= 0
        assert c["rss_peak_mib"] is None or isinstance(c["rss_peak_mib"], NUM)
    assert isinstance(d["ratio_max_over_min_steps"], dict)
    for k, v in d["ratio_max_over_min_steps"].items():
        assert isinstance(v, float), k
    assert {"primary", "secondary", "isolation"} <= set(d["measurement"])


def _omniglot_available() -> bool:
    root = Path(os.environ.get("IMAML_OMNIGLOT_ROOT", ROOT.parent / "shared" / "omniglot"))
    return (root / "omniglot-py" / "images_background").is_dir()


@pytest.mark.skipif(not _omniglot_available(), reason="Omniglot data not found (IMAML_OMNIGLOT_ROOT)")
def test_accuracy_quick(tmp_path):
    out = tmp_path / "accuracy.json"
    d = _run("accuracy.py", out, "--threads", "1", "--device", "cpu")
    assert d["benchmark"] == "accuracy"
    _check_machine(d["machine"])
    assert set(d["methods"]) == {"imaml", "imaml_hf", "fomaml", "maml", "imaml_lam"}
    for m, r in d["methods"].items():
        assert isinstance(r["test_acc"], float) and 0.0 <= r["test_acc"] <= 1.0, m
        assert isinstance(r["test_acc_ci95"], float), m
        assert isinstance(r["val_curve"], list) and len(r["val_curve"]) >= 2, m
        for row in r["val_curve"]:
            assert isinstance(row["step"], int) and isinstance(row["val_acc"], float)
        assert isinstance(r["train_wall_s"], float)
        assert (tmp_path / f"accuracy_{m}.json").exists()
    log_text = out.with_suffix(".log").read_text()
    # a run cut off mid-way resumes from its last validation: the checkpoint is written there, not at the end
    for m in d["methods"]:
        assert f"{m}: checkpoint at step 1 " in log_text, m
        assert (tmp_path / "accuracy_ckpt" / m / "last.ckpt").exists(), m
    # resumable: a second run skips every method whose result file exists
    d2 = _run("accuracy.py", out, "--threads", "1", "--device", "cpu", timeout=120)
    assert d2["methods"]["imaml"]["test_acc"] == d["methods"]["imaml"]["test_acc"]
    assert "exists, skipping" in out.with_suffix(".log").read_text()


def test_results_record_their_commit_and_committed_ones_are_not_overwritten_from_a_dirty_tree(
    tmp_path, monkeypatch
):
    sys.path.insert(0, str(BENCH))
    import common

    committed = ROOT / "benchmarks" / "results" / "memory.json"
    before = committed.read_bytes()
    monkeypatch.setattr(common, "START_GIT", {"commit": "abc", "dirty": True})
    monkeypatch.delenv("IMAML_ALLOW_DIRTY", raising=False)
    with pytest.raises(SystemExit, match="refusing to overwrite the committed result"):
        common.write_json(committed, {"x": 1})
    assert committed.read_bytes() == before
    out = common.write_json(tmp_path / "new.json", {"x": 1})  # not committed: written, and stamped
    assert json.loads(out.read_text())["git"] == {"commit": "abc", "dirty": True}
    monkeypatch.setattr(common, "START_GIT", {"commit": "abc", "dirty": False})
    assert (
        json.loads(common.write_json(tmp_path / "clean.json", {"x": 1}).read_text())["git"]["dirty"] is False
    )
