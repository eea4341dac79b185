"""Peak memory of one meta-gradient: flat in inner_steps for IMAML (and first-order MAML), growing for
(second-order) MAML.

The four cases run one after another in a subprocess on CPU: after a small warm-up meta-gradient
(libraries and kernels loaded), each case resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` <- 5) and reports the peak resident set size (``VmHWM``) during one
meta-gradient above the resident size just before it. glibc is
told to hand freed blocks back at once (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) so that
the resident size tracks live tensors. Network: the paper's Omniglot Conv4 (32 channels here),
one 5-way 20-shot task with 100 query images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import gc, json
    import torch
    from lightning_imaml import FOMAML, IMAML, MAML, OmniglotConv4

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=5, hidden=32)


    def batch(k):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(5).repeat_interleave(k)[None]
        x = torch.randn(2, 5 * k, 1, 28, 28, generator=g)
        return x[:1], y, x[1:], y


    def status_kb(field):
        with open("/proc/self/status") as f:
            return int(next(ln for ln in f if ln.startswith(field + ":")).split()[1])


    def make(method, steps):
        # one task: the per-task loop (no batching probe or chunk timing inside the measured meta-gradient)
        if method == "imaml":
            return IMAML(net, lam=2.0, cg_steps=5, inner_steps=steps, inner_lr=0.1, batched_tasks=False)
        if method == "fomaml":
            return FOMAML(net, lam=0.0, inner_steps=steps, inner_lr=0.1, batched_tasks=False)
        return MAML(net, lam=0.0, inner_steps=steps, inner_lr=0.1, batched_tasks=False)


    make("imaml", 1).meta_gradient(batch(1))  # warm-up: libraries, kernels
    make("maml", 1).meta_gradient(batch(1))
    make("fomaml", 1).meta_gradient(batch(1))
    data = batch(20)
    peaks = {}
    for method, steps in [(m, s) for m in ("imaml", "maml", "fomaml") for s in (1, 50)]:
        learner = make(method, steps)
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        base = status_kb("VmRSS")
        grad, metrics = learner.meta_gradient(data)
        peaks[f"{method}_{steps}"] = (status_kb("VmHWM") - base) / 1024.0
        assert all(torch.isfinite(g).all() for g in grad.values())
        if method != "maml":  # the solver really ran its steps (no tolerance: all of them)
            assert float(metrics["inner_iterations"][0]) == steps, (method, steps)
        del grad, metrics, learner
    print("PEAKS_MB", json.dumps(peaks))
    """
)


def _peaks_mb(tmp_path) -> dict[str, float]:
    script = tmp_path / "mem_cases.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAKS_MB")][-1]
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self peak-RSS reset: Linux")
def test_imaml_memory_flat_in_inner_steps_while_maml_grows(tmp_path):
    peaks = _peaks_mb(tmp_path)
    imaml_1, imaml_50, maml_1, maml_50, fo_1, fo_50 = (
        peaks[k] for k in ("imaml_1", "imaml_50", "maml_1", "maml_50", "fomaml_1", "fomaml_50")
    )
    print(
        f"\npeak memory above baseline (MB): IMAML 1 step {imaml_1:.1f}, 50 steps {imaml_50:.1f}; "
        f"MAML 1 step {maml_1:.1f}, 50 steps {maml_50:.1f}; FOMAML 1 step {fo_1:.1f}, 50 steps {fo_50:.1f}"
    )
    assert imaml_1 > 1.0 and fo_1 > 1.0  # the measurement sees the meta-gradient's working memory at all
    assert abs(imaml_50 - imaml_1) <= 0.10 * imaml_1
    assert abs(fo_50 - fo_1) <= 0.10 * fo_1
    assert maml_50 > 5 * maml_1
