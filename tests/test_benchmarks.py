"""Each benchmark script's ``--quick`` mode runs end to end and writes JSON of the documented schema and a
PNG. Only the schema (keys and types) is checked, never the figures. Each script runs in a subprocess, as a
user runs it, with one torch thread so that the tests stay fast on a shared machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
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
    d = json.loads(out.read_text())
    assert set(d["git"]) == {"commit", "dirty"}, "results record the commit they ran on (common.write_json)"
    _check_machine(d["machine"])
    return d


def _check_machine(m: dict) -> None:
    for key in ("cpu_count", "torch_num_threads", "torch", "device"):
        assert key in m, key
    assert isinstance(m["cpu_count"], int)
    assert isinstance(m["torch"], str)
    assert m["gpu_name"] is None or isinstance(m["gpu_name"], str)


def _omniglot_available() -> bool:
    root = Path(os.environ.get("IMAML_OMNIGLOT_ROOT", ROOT.parent / "shared" / "omniglot"))
    return (root / "omniglot-py" / "images_background").is_dir()


needs_omniglot = pytest.mark.skipif(
    not _omniglot_available(), reason="no Omniglot data (IMAML_OMNIGLOT_ROOT)"
)
OURS = {"imaml", "imaml_default", "imaml_learned_lam", "maml", "fomaml"}  # speed.py: this project's learners
FLOPS_ROW = ("s_per_meta_step", "gflops_achieved", "share_of_sgemm", "vs_loop", "rel_diff_vs_loop")


def test_speed_quick(tmp_path):
    d = _run("speed.py", tmp_path / "speed.json", "--threads", "1")
    assert d["benchmark"] == "speed"
    for key in ("n_way", "k_shot", "k_query", "meta_batch_size", "inner_steps", "cg_steps", "lam", "rounds"):
        assert isinstance(d["config"][key], NUM), key
    assert d["config"]["quick"] is True
    assert isinstance(d["config"]["keep_freed_memory"], bool)
    assert isinstance(d["contenders"], dict) and d["contenders"]
    assert isinstance(d["skipped"], dict)
    # every contender is either timed or skipped with a reason
    peers = {"torchopt_cg": "torchopt", "torchopt_normal_cg": "torchopt", "l2l_maml": "learn2learn"}
    assert OURS | set(peers) | {"floor"} == set(d["contenders"]) | set(d["skipped"])
    # this project's own contenders (and the floor) must run: a crash would only move them to "skipped"
    assert OURS | {"floor"} <= set(d["contenders"]), d["skipped"]
    # peers may be missing from the machine (then skipped with the reason), never crash when installed
    for peer, module in peers.items():
        if importlib.util.find_spec(module) is not None:
            assert peer in d["contenders"], d["skipped"].get(peer)
    assert d["reference"] == "imaml"
    for name, c in d["contenders"].items():
        assert isinstance(c["median_s"], float) and c["median_s"] > 0, name
        assert isinstance(c["times_s"], list) and len(c["times_s"]) == d["config"]["rounds"], name
        assert isinstance(c["ratio_to_imaml"], float), name
        assert c["peak_memory_mib"] is None or isinstance(c["peak_memory_mib"], float), name
        assert isinstance(c["note"], str), name
        # this project's learners record how many tasks they computed at once (1 = the per-task loop)
        if name in OURS:
            assert isinstance(c["chunk_size"], int) and 1 <= c["chunk_size"] <= d["config"]["meta_batch_size"]
        else:
            assert c["chunk_size"] is None, name
    assert d["contenders"]["imaml"]["chunk_size"] == 1  # batched_tasks=False
    assert isinstance(d["contenders"]["imaml"]["peak_memory_mib"], float)  # --memory's default
    for key in ("imaml_over_torchopt_cg", "imaml_over_floor", "imaml_over_l2l_maml", "default_over_looped"):
        assert key in d["summary"]
        assert d["summary"][key] is None or isinstance(d["summary"][key], float)
    assert d["summary"]["default_chunk_size"] == d["contenders"]["imaml_default"]["chunk_size"]
    if "torchopt_cg" in d["contenders"]:
        for dtype in ("float32", "float64"):
            ag = d["agreement"][dtype]
            for part in ("same_phi", "end_to_end"):
                assert isinstance(ag[part]["rel_err"], float)
                assert isinstance(ag[part]["cosine"], float)
            # the same linear system, the same CG: agreement to rounding (measured 4.3e-7 f32, 6.0e-16 f64)
            assert ag["same_phi"]["rel_err"] < (1e-5 if dtype == "float32" else 1e-12), (dtype, ag)
            assert isinstance(ag["scaling_rel_err_lam_u_vs_x"], float)
    else:
        assert "error" in d["agreement"]


def test_memory_quick(tmp_path):
    d = _run("memory.py", tmp_path / "memory.json", "--threads", "1")
    assert d["benchmark"] == "memory"
    cfg = d["config"]
    assert isinstance(cfg["inner_steps"], list) and isinstance(cfg["n_ways"], list)
    assert isinstance(cfg["k_query"], int)
    assert cfg["methods"] == ["IMAML", "MAML", "FOMAML"]
    assert cfg["batched_tasks"] is False
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


def test_flops_quick(tmp_path):
    d = _run("flops.py", tmp_path / "flops.json")
    assert d["benchmark"] == "flops"
    methods = set(d["config"]["methods"])
    assert methods and set(d["gflop_per_meta_step"]) == methods == set(d["gflop_by_operator"])
    for m in methods:
        assert isinstance(d["gflop_per_meta_step"][m], float) and d["gflop_per_meta_step"][m] > 0, m
        assert all(isinstance(v, float) for v in d["gflop_by_operator"][m].values()), m
    assert isinstance(d["runs"], list) and d["runs"]
    for run in d["runs"]:
        assert isinstance(run["threads"], int) and isinstance(run["sgemm_gflops"], float)
        rows = run["contenders"]
        # every method's per-task loop and default path, and the fixed chunk sizes of iMAML
        assert {f"{m}_loop" for m in methods} | methods <= set(rows)
        for name, r in rows.items():
            for key in FLOPS_ROW:
                assert isinstance(r[key], float) and math.isfinite(r[key]), (name, key)
            assert isinstance(r["chunk_size"], int) and r["chunk_size"] >= 1, name
            assert r["method"] in methods, name
        for m in methods:  # the loop is every path's reference
            assert rows[f"{m}_loop"]["chunk_size"] == 1
            assert rows[f"{m}_loop"]["vs_loop"] == 1.0 and rows[f"{m}_loop"]["rel_diff_vs_loop"] == 0.0
    profile = d["profile_default_1_thread"]
    assert isinstance(profile, list) and profile
    for row in profile:
        assert isinstance(row["op"], str) and isinstance(row["calls"], int)
        assert isinstance(row["self_ms"], float) and isinstance(row["share"], float)


@needs_omniglot
def test_inner_stability_quick(tmp_path):
    solvers = ["gd", "gd_armijo", "hf"]
    out = tmp_path / "inner_stability.json"
    d = _run("inner_stability.py", out, "--threads", "1", "--solvers", ",".join(solvers))
    assert d["benchmark"] == "inner_stability"
    assert d["config"]["quick"] is True
    assert d["results"]
    for run in d["results"].values():
        assert set(run["summary"]) == {"eig", *solvers}
        assert len(run["tasks"]) == d["config"]["tasks"]
        for row in run["tasks"]:
            assert isinstance(row["eig"], float)
            for s in solvers:
                for key in ("residual", "residual_rel", "accepted", "iterations", "objective"):
                    assert isinstance(row[s][key], float), (s, key)
                assert isinstance(row[s]["rose"], bool)
            # G along fixed-step GD: at theta and after every step
            assert len(row["gd_objective_per_step"]) == d["config"]["steps"] + 1


@needs_omniglot
def test_data_throughput_quick(tmp_path):
    d = _run("data_throughput.py", tmp_path / "data_throughput.json", "--threads", "1")
    assert d["benchmark"] == "data_throughput"
    assert d["config"]["quick"] is True and isinstance(d["config"]["batches_timed"], int)
    for key in (
        "setup_from_cache_or_decode_s",
        "direct_episodes_per_s_workers0",
        "direct_episodes_per_s_workers2",
        "direct_no_rotations_episodes_per_s_workers0",
        "learn2learn_no_rotations_episodes_per_s_workers0",
    ):
        assert isinstance(d[key], float) and d[key] > 0, key
    assert "decode_all_images_s" not in d  # --quick skips the cold decode


@needs_omniglot
def test_accuracy_quick(tmp_path):
    out = tmp_path / "accuracy.json"
    d = _run("accuracy.py", out, "--threads", "1", "--device", "cpu")
    assert d["benchmark"] == "accuracy"
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
    # eval_protocols.py on a saved theta: its gd_armijo lam 0 protocol is iMAML's validation protocol, so on
    # the same fixed validation tasks it reproduces the benchmark's last validation accuracy
    ckpt = tmp_path / "accuracy_ckpt" / "imaml" / "last.ckpt"
    proto_out = tmp_path / "protocols.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(BENCH / "eval_protocols.py"), "--ckpt", str(ckpt), "--protocols",
           "gd_armijo:0:2,hf:2:1", "--tasks", "2", "--threads", "1", "--out", str(proto_out)]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(proto_out.read_text())
    imaml = d["methods"]["imaml"]
    last_val = imaml["val_curve"][-1]
    assert p["step"] == last_val["step"] == d["config"]["steps"]
    assert set(p["protocols"]) == {"gd_armijo:0:2", "hf:2:1"}
    assert p["protocols"]["gd_armijo:0:2"]["acc"] == pytest.approx(last_val["val_acc"], abs=1e-6)
    for row in p["protocols"].values():
        assert 0.0 <= row["acc"] <= 1.0 and row["residual_rel_median"] >= 0.0


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


@needs_omniglot
def test_accuracy_configs_budget_schedule_best_weights_and_export(tmp_path):
    """The long-run options (issue 22): a config run named after its file; the outer learning rate follows the
    cosine over the training-time budget (checked against the formula at the recorded seconds); the best
    validation weights are tested; the export loads with load_from_checkpoint alone. A tiny budget stops
    training at the first step past it."""
    import math

    import torch

    from lightning_imaml import MAML

    out = tmp_path / "long.json"
    export = tmp_path / "export"
    d = _run("accuracy.py", out, "--threads", "1", "--device", "cpu", "--configs",
             "configs/omniglot_5way1shot_maml.yaml", "--train-minutes", "0.5", "--lr-schedule", "cosine-time",
             "--lr-floor", "0.05", "--test-weights", "best", "--export", str(export))  # fmt: skip
    r = d["methods"]["omniglot_5way1shot_maml"]
    assert d["config"]["test_weights"] == "best validation accuracy"
    assert r["tested"]["weights"] == "best validation accuracy" and r["steps"] == 2
    rows = {row["step"]: row for row in r["train_curve"]}
    assert rows[1]["outer_lr"] == pytest.approx(1e-3, rel=1e-12)
    f = rows[1]["train_s"] / 30.0
    expected = 1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * f)))
    assert rows[2]["outer_lr"] == pytest.approx(expected, rel=1e-9) and rows[2]["outer_lr"] < 1e-3
    learner = MAML.load_from_checkpoint(export / "omniglot_5way1shot_maml.ckpt", map_location="cpu")
    assert type(learner.model).__name__ == "OmniglotConv4"
    assert torch.load(export / "omniglot_5way1shot_maml.ckpt", weights_only=True)["global_step"] == 2
    d2 = _run("accuracy.py", tmp_path / "short.json", "--threads", "1", "--device", "cpu", "--configs",
              "configs/omniglot_5way1shot_maml.yaml", "--train-minutes", "0.00001")  # fmt: skip
    assert d2["methods"]["omniglot_5way1shot_maml"]["steps"] == 1


def test_accuracy_results_of_config_runs_name_the_configs_task_shape_and_method():
    """A --configs run records the n_way, split and meta-batch of its configs, not the flags' 5-way defaults
    (the 20-way alphabet run was once titled "5-way"), and its plot colours and names the method from the
    config stem."""
    sys.path.insert(0, str(BENCH))
    try:
        import accuracy
    finally:
        sys.path.remove(str(BENCH))
    data = dict(split="alphabets", rotations=True, n_way=20, k_shot=1, k_query=1, meta_batch_size=16)
    result = {
        "config": dict(dataset="Omniglot (paper split, rotations)", n_way=5, k_shot=5, meta_batch_size=32),
        "methods": {"omniglot_20way1shot_imaml_gd_alphabets": {"settings": {"cls": "IMAML", "data": data}}},
    }
    accuracy._config_data_facts(result)
    assert result["config"]["n_way"] == 20 and result["config"]["k_shot"] == 1
    assert result["config"]["meta_batch_size"] == 16
    assert result["config"]["dataset"] == "Omniglot (alphabets split, rotations)"
    kinds = {
        "omniglot_5way1shot_imaml_gd": "imaml",
        "omniglot_5way1shot_maml": "maml",
        "omniglot_5way1shot_fomaml": "fomaml",
        "omniglot_20way1shot_imaml_hf": "imaml_hf",
        "imaml_hf_gn": "imaml_hf",
        "maml": "maml",
    }
    assert {name: accuracy._method_kind(name) for name in kinds} == kinds
    two = {"split": "paper", "rotations": True, "n_way": 5}
    runs = {m: {"settings": {"data": d}} for m, d in (("a", two), ("b", data))}
    mixed = {"config": {"n_way": 1}, "methods": runs}
    accuracy._config_data_facts(mixed)
    assert mixed["config"] == {"n_way": 1}, "configs that disagree leave the flags' values"
