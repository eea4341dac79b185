"""Reference networks for the iMAML experiments.

Every network is a plain :class:`torch.nn.Module`; the meta-learners only ever call it through
:func:`torch.func.functional_call` with a dict of parameters, so any other ``nn.Module`` works too.
BatchNorm layers use ``track_running_stats=False``: statistics are always those of the current batch
(transductive, as in MAML and iMAML), so the networks hold no buffers that adaptation would mutate.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["HEAD_INITS", "MiniImageNetConv4", "OmniglotConv4", "SinusoidMLP", "init_head_", "paper_init_"]


def paper_init_(module: nn.Module, gain: float = 1.73, bias_high: float = 0.05) -> nn.Module:
    """Initialise like the official iMAML code (``implicit_maml/learner_model.py``).

    Every ``Conv2d`` and ``Linear`` weight gets Xavier-uniform with ``gain`` (U(-a, a),
    a = gain * sqrt(6 / (fan_in + fan_out))) and every bias U(0, ``bias_high``). BatchNorm affine
    parameters keep PyTorch's defaults (weight 1, bias 0). Returns ``module`` for chaining.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            if layer.bias is not None:
                nn.init.uniform_(layer.bias, a=0.0, b=bias_high)
    return module


HEAD_INITS = ("zero", "paper")


def init_head_(head: nn.Linear, head_init: str) -> None:
    """``"zero"``: weight and bias 0 (every class scores 0 at theta, so the support loss starts at log n_way
    with a small, well-conditioned Hessian); ``"paper"``: keep :func:`paper_init_`'s Xavier gain 1.73."""
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if head_init == "zero":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _conv4(n_way, in_channels, hidden, stride, pad_after, pool, features) -> OrderedDict:
    """4 x [Conv2d 3x3 (``stride``, padding 1) -> BatchNorm2d (batch statistics) -> ReLU (-> MaxPool2d(2))],
    a ZeroPad2d((0, 1, 0, 1)) after block ``pad_after``, then Flatten and Linear(features * hidden, n_way)."""
    _check_positive_int("n_way", n_way)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("hidden", hidden)
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for i in range(1, 5):
        layers += [
            (f"conv{i}", nn.Conv2d(channels, hidden, kernel_size=3, stride=stride, padding=1)),
            (f"bn{i}", nn.BatchNorm2d(hidden, track_running_stats=False)),
            (f"relu{i}", nn.ReLU()),
        ]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))
        if i == pad_after:
            layers.append((f"pad{i}", nn.ZeroPad2d((0, 1, 0, 1))))
        channels = hidden
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(features * hidden, n_way))]
    return OrderedDict(layers)


class OmniglotConv4(nn.Sequential):
    """The iMAML paper's Omniglot network, layer for layer as in the official code.

    4 x [Conv2d(3x3, stride 2, padding 1, ``hidden`` channels) -> BatchNorm2d(track_running_stats=False)
    -> ReLU], with ``ZeroPad2d((0, 1, 0, 1))`` (one row/column at the bottom/right) after block 2,
    then Flatten and Linear(2 * 2 * hidden, n_way).

    Spatial sizes for a 28 x 28 input: 28 -> 14 -> 7 -> pad 8 -> 4 -> 2, so the head sees
    2 x 2 x 64 = 256 features.

    Shapes: input ``[N, in_channels, 28, 28]`` -> logits ``[N, n_way]``.
    Initialisation: :func:`paper_init_` (Xavier-uniform gain 1.73, bias U(0, 0.05)) for the convolutions;
    the linear head zero by default (``head_init="zero"``; ``"paper"`` keeps the official Xavier head).
    Why zero: with the official head the support-loss Hessian at theta has a top eigenvalue of 350-480
    on Omniglot 5-way 1-shot tasks, far above the 2/lr - lam = 18 that inner GD at lr 0.1, lam 2 can
    handle; with a zero head it is 2-17 (measured, ``benchmarks/inner_stability.py``), and meta-training
    learns faster (figures in the README's results).
    """

    def __init__(
        self, n_way: int = 5, in_channels: int = 1, hidden: int = 64, head_init: str = "zero"
    ) -> None:
        super().__init__(
            _conv4(n_way, in_channels, hidden, stride=2, pad_after=2, pool=False, features=2 * 2)
        )
        self.n_way = n_way
        paper_init_(self)
        init_head_(self.fc, head_init)


class MiniImageNetConv4(nn.Sequential):
    """The standard Mini-ImageNet Conv4 (MAML / iMAML), 32 filters with max-pooling.

    4 x [Conv2d(3x3, padding 1, ``hidden`` channels) -> BatchNorm2d(track_running_stats=False) -> ReLU
    -> MaxPool2d(2)], then Flatten and Linear(5 * 5 * hidden, n_way).

    Spatial sizes for an 84 x 84 input: 84 -> 42 -> 21 -> 10 -> 5, so the head sees
    5 x 5 x 32 = 800 features.

    Shapes: input ``[N, in_channels, 84, 84]`` -> logits ``[N, n_way]``.
    Initialisation: as :class:`OmniglotConv4` (paper scheme, zero head by default; ``head_init="paper"``
    for the official Xavier head).
    """

    def __init__(
        self, n_way: int = 5, in_channels: int = 3, hidden: int = 32, head_init: str = "zero"
    ) -> None:
        super().__init__(
            _conv4(n_way, in_channels, hidden, stride=1, pad_after=None, pool=True, features=5 * 5)
        )
        self.n_way = n_way
        paper_init_(self)
        init_head_(self.fc, head_init)


class SinusoidMLP(nn.Sequential):
    """Sinusoid-regression network of MAML / iMAML.

    Linear(1, 40) - ReLU - Linear(40, 40) - ReLU - Linear(40, 1).

    Shapes: input ``[N, 1]`` -> output ``[N, 1]``. PyTorch's default initialisation (as the official
    iMAML ``make_fc_network``).
    """

    def __init__(self, hidden: int = 40, in_features: int = 1, out_features: int = 1) -> None:
        _check_positive_int("hidden", hidden)
        _check_positive_int("in_features", in_features)
        _check_positive_int("out_features", out_features)
        super().__init__(
            OrderedDict(
                [
                    ("fc1", nn.Linear(in_features, hidden)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(hidden, hidden)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(hidden, out_features)),
                ]
            )
        )
