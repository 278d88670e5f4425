"""Test-only stub of torchvision's import surface (NOT torchvision).

Why: timm imports torchvision at ``import timm`` (``torchvision.ops.misc.FrozenBatchNorm2d``,
``torchvision.transforms``, ``torchvision.datasets`` ...), but torchvision has no CPU build for the
torch version the tests run on, so it cannot be installed here. The tests only build timm
``VisionTransformer`` models from code (no data pipeline, no pretrained weights), which never call
torchvision. ``tests/conftest.py`` puts ``tests/stubs`` on ``sys.path`` only when
``importlib.util.find_spec("torchvision") is None``; every name here is a placeholder that raises
when used, so a test that really needed torchvision would fail loudly, not silently.
"""
__version__ = "0.0.0+quotientsharp-test-stub"
