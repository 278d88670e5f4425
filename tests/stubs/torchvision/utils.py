"""Test-only torchvision stub: ``save_image`` placeholder."""
from ._placeholder import placeholder

save_image = placeholder(__name__, "save_image")
