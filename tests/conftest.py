import torch

# The test models are tiny: intra-op threads only add contention on the 2-core CI machine.
torch.set_num_threads(1)

# timm imports torchvision at `import timm`; torchvision has no CPU build for this torch on PyPI.
# Only when it is absent, expose the test-only import-surface stub (tests/stubs/torchvision, its
# docstring says why) so that timm VisionTransformers can be built from code in the tests.
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

if importlib.util.find_spec("torchvision") is None:
    if importlib.util.find_spec("transformers") is not None:
        # transformers decides once (lru_cache) whether torchvision exists, by find_spec; ask it
        # before the stub is visible, so that it never tries to use the stub
        from transformers.utils.import_utils import is_torchvision_available

        assert not is_torchvision_available()
    sys.path.insert(0, str(pathlib.Path(__file__).parent / "stubs"))
