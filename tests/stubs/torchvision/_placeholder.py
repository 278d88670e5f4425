"""Placeholders of the test-only torchvision stub: importable names that raise when used."""
from __future__ import annotations


def placeholder(module: str, name: str):
    """A class named ``name`` whose construction (or call) raises, saying this is the test stub."""

    def _raise(*args, **kwargs):
        raise RuntimeError(f"{module}.{name} is a test-only stub (tests/stubs/torchvision): torchvision is "
                           "not installed, only its import surface is provided so that timm imports")

    return type(name, (), {"__init__": _raise, "__call__": _raise, "__module__": module})
