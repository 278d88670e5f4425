"""quotientsharp: sharpness on the quotient of a network's parameter space by its symmetries."""
from .groups import (AttentionGL, DiagonalRescaling, Euclidean, GLBlock, Piece, PositiveRescaling,
                     SymmetryGroup)
from .quotient import Quotient

__version__ = "0.1.0"

__all__ = ["SymmetryGroup", "AttentionGL", "GLBlock", "Piece", "DiagonalRescaling",
           "PositiveRescaling", "Euclidean", "Quotient"]
