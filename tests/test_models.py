"""Networks: shapes, the paper's Omniglot architecture and initialisation, functional_call use."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_imaml import MiniImageNetConv4, OmniglotConv4, SinusoidMLP


def test_omniglot_conv4_matches_paper_network():
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=5)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 4 and len(bns) == 4
    assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert all(c.out_channels == 64 for c in convs)
    assert all(not b.track_running_stats and b.running_mean is None for b in bns)
    assert list(net.buffers()) == []
    # 28 -> 14 -> 7 -> zero-pad (0,1,0,1) -> 8 -> 4 -> 2: the head sees 2 * 2 * 64 = 256 features
    pads = [m for m in net.modules() if isinstance(m, nn.ZeroPad2d)]
    assert len(pads) == 1 and tuple(pads[0].padding) == (0, 1, 0, 1)
    sizes = []
    x = torch.randn(2, 1, 28, 28)
    for m in net:
        x = m(x)
        if isinstance(m, nn.ReLU):
            sizes.append(x.shape[-1])
    assert sizes == [14, 7, 4, 2]
    assert net.fc.in_features == 256 and net.fc.out_features == 5
    # parameter count of the official make_conv_network('Omniglot'): 113221 for 5-way
    assert sum(p.numel() for p in net.parameters()) == 113221


def test_zero_head_is_the_default_and_paper_head_is_available():
    torch.manual_seed(0)
    for cls in (OmniglotConv4, MiniImageNetConv4):
        head = cls(n_way=5).fc
        assert torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
        assert torch.count_nonzero(cls(n_way=5, head_init="paper").fc.weight) > 0
    with pytest.raises(ValueError, match=r"head_init must be one of \('zero', 'paper'\), got 'xavier'"):
        OmniglotConv4(head_init="xavier")


def test_paper_initialisation_ranges():
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=20, head_init="paper")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * (m.weight[0, 0].numel() if m.weight.dim() > 2 else 1)
            bound = 1.73 * math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound + 1e-6
            assert m.weight.abs().max() > 0.8 * bound  # really uniform over the full range
            assert m.bias.min() >= 0.0 and m.bias.max() <= 0.05


def test_mini_imagenet_conv4_shapes():
    net = MiniImageNetConv4(n_way=5)
    assert net(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert net.fc.in_features == 800
    assert all(c.out_channels == 32 for c in net.modules() if isinstance(c, nn.Conv2d))
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 4
    assert list(net.buffers()) == []


def test_sinusoid_mlp_shapes():
    net = SinusoidMLP()
    assert net(torch.randn(7, 1)).shape == (7, 1)
    assert [m.out_features for m in net.modules() if isinstance(m, nn.Linear)] == [40, 40, 1]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match="n_way"):
        OmniglotConv4(n_way=bad)


def test_functional_call_with_param_dict_is_differentiable():
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=5, hidden=8)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 5, (10,))
    loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    ref = nn.functional.cross_entropy(net(x), y)
    ref.backward()
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
