"""A plain multilayer perceptron (ReLU nets for rescaling-symmetry tests, tiny teachers)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "identity": nn.Identity}


class MLP(nn.Sequential):
    """``Linear → [LayerNorm] → activation`` per hidden layer, then a final ``Linear``.

    ``sizes = (d_in, h_1, …, d_out)``; input ``(batch, d_in)``, output ``(batch, d_out)``. Being an
    ``nn.Sequential``, its parameters are named ``"<index>.weight"``/``"<index>.bias"`` in layer
    order, so adjacent ``Linear``–activation–``Linear`` triples can be read off ``self``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        bias: bool = True,
        layernorm: bool = False,
    ):
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least (d_in, d_out), got {tuple(sizes)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        for d_in, d_out in zip(sizes[:-2], sizes[1:-1]):
            layers.append(nn.Linear(d_in, d_out, bias=bias))
            if layernorm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=bias))
        super().__init__(*layers)
