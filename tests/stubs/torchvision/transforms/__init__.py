"""Test-only torchvision stub: every transform name is a placeholder class that raises when used."""
from .._placeholder import placeholder
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return placeholder(__name__, name)
