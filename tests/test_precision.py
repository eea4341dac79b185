"""ieee_fp32: TF32 off while the engine runs, the settings restored after; on by default in MetaLearner."""

from __future__ import annotations

import pytest
import torch
from helpers import rel
from torch import nn

from lightning_imaml import IMAML, MAML, OmniglotConv4
from lightning_imaml.precision import ieee_fp32

CONV = torch.backends.cudnn.conv if hasattr(torch.backends.cudnn, "conv") else None
NEW_API = CONV is not None and hasattr(CONV, "fp32_precision")


def tf32_state():
    """(conv, rnn, matmul) settings in the API this torch has."""
    if NEW_API:
        b = torch.backends
        return (b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision)
    return (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)


@pytest.fixture
def tf32_everywhere():
    """The global settings a user asking for speed has: TF32 convolutions (PyTorch's default) and matmuls."""
    before = tf32_state()
    if NEW_API:
        for obj in (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul):
            obj.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield tf32_state()
    if NEW_API:
        objs = (torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul)
        for obj, value in zip(objs, before, strict=True):
            obj.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert tf32_state() == before


IEEE = ("ieee", "ieee", "ieee") if NEW_API else (False, False)


def test_ieee_fp32_switches_tf32_off_inside_and_restores_after(tf32_everywhere):
    with ieee_fp32():
        assert tf32_state() == IEEE
    assert tf32_state() == tf32_everywhere
    with pytest.raises(RuntimeError, match="boom"), ieee_fp32():
        raise RuntimeError("boom")
    assert tf32_state() == tf32_everywhere
    with ieee_fp32(enabled=False):
        assert tf32_state() == tf32_everywhere


class Recording(nn.Module):
    """OmniglotConv4 that records the TF32 settings in force at each forward."""

    def __init__(self):
        super().__init__()
        self.net = OmniglotConv4(2)
        self.seen: set = set()

    def forward(self, x):
        self.seen.add(tf32_state())
        return self.net(x)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_meta_learner_runs_its_meta_gradient_and_evaluation_in_ieee_fp32(tf32_everywhere, allow_tf32):
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(2, 2, 1, 28, 28, generator=g), torch.tensor([[0, 1]] * 2),
             torch.rand(2, 2, 1, 28, 28, generator=g), torch.tensor([[0, 1]] * 2))  # fmt: skip
    learner = IMAML(Recording(), inner_steps=2, cg_steps=2, batched_tasks=False, allow_tf32=allow_tf32)
    expected = tf32_everywhere if allow_tf32 else IEEE
    learner.meta_gradient(batch)
    assert learner.model.seen == {expected}
    learner.model.seen.clear()
    learner._eval_step(batch, "val")
    assert learner.model.seen == {expected}
    assert tf32_state() == tf32_everywhere  # restored after each


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists only on CUDA")
def test_cuda_float32_meta_gradient_matches_float64_under_global_tf32(tf32_everywhere):
    """On an H200 with TF32 on, MAML's batched float32 meta-gradient was 2.6e-2 from float64 (the loop's
    5.6e-4); in IEEE float32 1.1e-6. Random Omniglot-shaped tasks, 8 at once."""
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(8, 5, 1, 28, 28, generator=g), torch.rand(8, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).expand(8, -1).contiguous()

    def grad(dtype, allow_tf32):
        torch.manual_seed(0)
        learner = MAML(
            OmniglotConv4(5), inner_steps=1, inner_lr=0.4, batched_tasks=True, allow_tf32=allow_tf32
        )
        learner = learner.to("cuda", dtype)
        batch = (sx.to("cuda", dtype), y.cuda(), qx.to("cuda", dtype), y.cuda())
        return learner.meta_gradient(batch)[0]

    truth = grad(torch.float64, False)
    err = rel(grad(torch.float32, False), truth)
    print(
        f"float32 vs float64: {err:.1e} in IEEE float32, {rel(grad(torch.float32, True), truth):.1e} in TF32"
    )
    assert err < 1e-4
