"""Symmetry groups: the extension point (:class:`SymmetryGroup`) and the built-in groups."""
from .attention import AttentionGL, GLBlock, Piece
from .base import SymmetryGroup, geodesic_error_slope, geodesic_error_slopes
from .diagonal import DiagonalRescaling, DiagonalRescalingInv, DiagonalRescalingMix
from .elementwise import Euclidean, PositiveRescaling
from .gl_math import SingularHeadError
from .joint import JointGroup
from .residual import SubAlgebra
from .scaling import HeadScaling, ScaleBlock

__all__ = ["SymmetryGroup", "AttentionGL", "GLBlock", "Piece", "DiagonalRescaling", "DiagonalRescalingInv",
           "DiagonalRescalingMix", "PositiveRescaling", "Euclidean", "SingularHeadError",
           "geodesic_error_slope", "geodesic_error_slopes", "SubAlgebra", "HeadScaling", "ScaleBlock",
           "JointGroup"]
