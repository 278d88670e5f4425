"""Test-only torchvision stub (see ``tests/stubs/torchvision/__init__.py``)."""
