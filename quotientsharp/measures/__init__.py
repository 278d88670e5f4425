"""Sharpness measures: geodesic (on the quotient), adaptive and Euclidean, all computed by one
ascent solver (spec part 2)."""
from .diagonal import diagonal_quotient, sum_squared_error
from .result import SharpnessResult
from .sharpness import Options, adaptive_sharpness, euclidean_sharpness, geodesic_sharpness
from .solver import AscentConfig, AscentResult, checkpoints, maximize

__all__ = ["geodesic_sharpness", "adaptive_sharpness", "euclidean_sharpness", "SharpnessResult",
           "Options", "maximize", "AscentConfig", "AscentResult", "checkpoints",
           "diagonal_quotient", "sum_squared_error"]
