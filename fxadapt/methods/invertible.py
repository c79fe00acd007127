"""Invertible adapters (Pfeiffer et al., 2020, MAD-X): a NICE coupling block on the embedding
output, AdapterHub's ``NICECouplingBlock``: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``. Placed by
bottleneck configs with ``inv_adapter`` (``pfeiffer+inv``, ``houlsby+inv``), on the residual input
of the first block.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MAX_SIZE, BnConfig
from ..errors import ConfigError
from ..placement import Placement
from ..sites import Block
from .base import Activation, Emitter, Method, seeded


class NICE(nn.Module):
    """Invertible NICE coupling block on the embedding output (AdapterHub's ``NICECouplingBlock``):
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""

    label = "invertible"  # in fxadapt.draw's pictures

    def __init__(self, hidden: int, config: BnConfig, like: torch.Tensor):
        super().__init__()
        self.split = hidden // 2
        factor = config.inv_adapter_reduction_factor

        def subnet(n_in: int, n_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(n_in, int(n_in // factor)), Activation(config.non_linearity), nn.Linear(int(n_in // factor), n_out))

        with seeded(config.init_weights_seed, "invertible"), torch.no_grad():
            self.F = subnet(hidden - self.split, self.split)
            self.G = subnet(self.split, hidden - self.split)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.02)
                    m.bias.zero_()
        self.to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split], x[..., self.split :]
        if rev:
            y2 = x2 - self.G(x1)
            return torch.cat((x1 - self.F(y2), y2), -1)
        y1 = x1 + self.F(x2)
        return torch.cat((y1, x2 + self.G(y1)), -1)


def check_sizes(config: BnConfig, hidden: int) -> None:
    """The NICE block's two subnets map hidden // 2 (and the rest) to ``n // inv_adapter_reduction_factor``."""
    factor = config.inv_adapter_reduction_factor
    sizes = [n // factor for n in (hidden // 2, hidden - hidden // 2)]
    if not all(1 <= s <= MAX_SIZE for s in sizes):
        raise ConfigError(f"{type(config).__name__}.inv_adapter_reduction_factor={factor} gives the invertible adapter inner sizes "
                          f"{sizes} on the hidden size {hidden}: each must be in [1, 2**31]", field="inv_adapter_reduction_factor", value=factor)


def build(block: Block, config: BnConfig, like: torch.Tensor) -> NICE:
    return NICE(block.hidden_size, config, like)


def insert(e: Emitter, p: Placement, w: NICE) -> None:
    e.y = e.module(p.module, e.node)


METHOD = Method("invertible", "bottleneck", build, insert, exclusive=True)
