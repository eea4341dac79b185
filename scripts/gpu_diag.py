"""float32 vs float64 meta-gradients on CUDA, loop and batched, TF32 on and off (benchmarks/results/gpu_h200).

Why flops.py's batched-vs-loop difference was 0.7 on an H200 (TF32, a bug, or the dtype?): each method's
meta-gradient on the benchmark batch (Omniglot 5-way 1-shot, k_query 1, ``N`` tasks, the shipped settings)
against the CPU float64 loop. ``tf32`` cases run with TF32 convolutions and matmuls (``allow_tf32=True``).

  python scripts/gpu_diag.py cuda 32        # writes $OUT/gpu_diag.json (or /tmp/gpu_diag.json)
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import common  # noqa: E402
import flops  # noqa: E402
import torch  # noqa: E402


def set_tf32(on: bool) -> None:
    b = torch.backends
    if hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        for obj in (b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul):
            obj.fp32_precision = "tf32" if on else "ieee"
    else:
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = on


def main():
    dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    n_tasks = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    batch, _ = common.episodes(32, 5, 1, 1, seed=0, device="cpu")
    batch = type(batch)(*(t[:n_tasks] for t in batch))
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "rows": []}

    def grad(m, device, dtype, batched, tf32):
        set_tf32(tf32)
        extra = {"batched_tasks": batched, "allow_tf32": tf32}
        if batched:
            extra["batched_chunk_size"] = 16
        mod = flops.make(flops.METHODS[m], 5, device, **extra).to(dtype)
        b = type(batch)(*((t.to(device, dtype) if t.is_floating_point() else t.to(device)) for t in batch))
        t0 = time.time()
        g, _ = mod.meta_gradient(b)
        return common.flat(dict(sorted(g.items()))).double().cpu(), time.time() - t0

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    f32, f64 = torch.float32, torch.float64
    cases = [
        ("cuda64_loop", dev, f64, False, False), ("cuda64_batched", dev, f64, True, False),
        ("cuda32_loop_tf32", dev, f32, False, True), ("cuda32_batched_tf32", dev, f32, True, True),
        ("cuda32_loop_notf32", dev, f32, False, False), ("cuda32_batched_notf32", dev, f32, True, False),
        ("cpu32_loop", "cpu", f32, False, False),
    ]  # fmt: skip
    pairs = [
        ("cuda32_batched_tf32", "cuda32_loop_tf32"),
        ("cuda32_batched_notf32", "cuda32_loop_notf32"),
        ("cuda64_batched", "cuda64_loop"),
    ]
    for m in ("maml1", "imaml", "imaml_lbfgs8"):
        ref, tref = grad(m, "cpu", f64, False, False)  # ground truth: CPU float64 loop
        res = {"method": m, "cpu64_loop_s": tref}
        gs = {}
        for name, d, dt, batched, tf in cases:
            try:
                gs[name], _ = grad(m, d, dt, batched, tf)
                res[name + "_vs_cpu64"] = rel(gs[name], ref)
            except Exception as e:  # report, keep going
                res[name + "_error"] = repr(e)[:300]
        for a, b in pairs:
            if a in gs and b in gs:
                res[a + "_vs_" + b] = rel(gs[a], gs[b])
        print(json.dumps(res), flush=True)
        out["rows"].append(res)
    set_tf32(False)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_diag.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
