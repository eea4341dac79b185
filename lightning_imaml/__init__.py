"""lightning-imaml: implicit-gradient meta-learning (iMAML) for PyTorch Lightning.

Names are imported lazily so that the pure-torch core (``lightning_imaml.cg``, ``.implicit``, ``.inner``,
``.metagrad``) can be used without importing Lightning.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "IMAML": "meta",
    "MAML": "meta",
    "FOMAML": "meta",
    "MetaLearner": "meta",
    "OmniglotConv4": "models",
    "MiniImageNetConv4": "models",
    "SinusoidMLP": "models",
    "conjugate_gradient": "cg",
    "CG": "cg",
    "CGInfo": "cg",
    "hessian_vector_product": "implicit",
    "implicit_meta_gradient": "implicit",
    "ImplicitGradient": "implicit",
    "proximal_adapt": "inner",
    "InnerInfo": "inner",
    "SOLVERS": "inner",
    "GD": "inner",
    "GDArmijo": "inner",
    "SGD": "inner",
    "Adam": "inner",
    "LBFGS": "inner",
    "HessianFree": "inner",
    "TorchOptimizer": "inner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
