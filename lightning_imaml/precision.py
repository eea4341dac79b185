"""Full float32 (IEEE) for cuDNN convolutions and CUDA matmuls while the engine runs (pure torch).

PyTorch runs float32 cuDNN convolutions in TF32 by default (10-bit mantissa, ~5e-4 relative per product),
and ``torch.set_float32_matmul_precision("high")`` does the same to matmuls. An iterative inner solve, the
line search's accept / reject decisions and CG on I + H/lam amplify that rounding into meta-gradients far
from the float64 ones (README, "GPU"). :func:`ieee_fp32` switches TF32 off inside and restores the settings
after; it changes nothing on the CPU, and autocast (16-mixed) computations run in their own dtype as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ieee_fp32"]


def _switches() -> list[tuple[object, str, object]]:
    """(object, attribute, value for IEEE float32) of every TF32 switch this torch has."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9
        # the new API only: torch refuses to mix it with the legacy allow_tf32 flags
        return [(cudnn.conv, "fp32_precision", "ieee"), (cudnn.rnn, "fp32_precision", "ieee"),
                (matmul, "fp32_precision", "ieee")]  # fmt: skip
    return [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


@contextlib.contextmanager
def ieee_fp32(enabled: bool = True) -> Iterator[None]:
    """Inside: float32 convolutions (cuDNN) and matmuls (cuBLAS) without TF32; the previous settings are
    restored on exit, also after an exception. ``enabled=False``: leave the settings as they are."""
    if not enabled:
        yield
        return
    switches = _switches()
    saved = [getattr(obj, attr) for obj, attr, _ in switches]
    try:
        for obj, attr, value in switches:
            setattr(obj, attr, value)
        yield
    finally:
        for (obj, attr, _), old in zip(switches, saved, strict=True):
            setattr(obj, attr, old)
