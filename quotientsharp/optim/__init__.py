"""Sharpness-aware optimizers wrapping any ``torch.optim`` base optimizer (spec: training.md)."""
from quotientsharp.optim.geodesic_sam import GeodesicSAM, RiemannianSGD
from quotientsharp.optim.mesa import MESA
from quotientsharp.optim.rsam import RSAM
from quotientsharp.optim.saf import SAF, IndexedDataset
from quotientsharp.optim.sam import ASAM, SAM, SharpnessAwareOptimizer
from quotientsharp.optim.utils import WrappedOptimizer, bn_frozen

__all__ = [
    "ASAM",
    "GeodesicSAM",
    "IndexedDataset",
    "MESA",
    "RSAM",
    "RiemannianSGD",
    "SAF",
    "SAM",
    "SharpnessAwareOptimizer",
    "WrappedOptimizer",
    "bn_frozen",
]
