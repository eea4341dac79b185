"""Episodic LightningDataModules serving meta-batches of few-shot tasks (imported lazily)."""

from importlib import import_module

_EXPORTS = {
    "Episode": "episodic",
    "EpisodicDataModule": "episodic",
    "OmniglotDataModule": "omniglot",
    "MiniImageNetDataModule": "mini_imagenet",
    "SinusoidDataModule": "sinusoid",
    "L2LTaskSetDataModule": "l2l",
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
