"""Test-only torchvision stub: dataset names are placeholder classes that raise when used."""
from .._placeholder import placeholder


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(__name__, name)
