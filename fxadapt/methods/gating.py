"""UniPELT gates: ``g = mean over the sequence of sigmoid(W x + b)``, one scalar (or one per output)
per example, that scales an adapter's contribution (Mao et al., 2022; AdapterHub's ``use_gating``).

Gates can report their values: with ``output_adapter_gating_scores=True`` a forward collects them
in the module's :class:`GateRecorder`, keyed ``adapter -> layer -> location`` as AdapterHub does.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import nn


class GateRecorder:
    """Collects gate values during the forwards it is active for."""

    def __init__(self) -> None:
        self.active = False
        self.values: dict[tuple[str, int, str], list[torch.Tensor]] = defaultdict(list)

    def add(self, key: tuple[str, int, str], value: torch.Tensor) -> None:
        self.values[key].append(value.detach())

    def scores(self) -> dict[str, dict[int, dict[str, np.ndarray]]]:
        """``{adapter: {layer: {location: array}}}``; several gates at one place are stacked as columns."""
        out: dict = {}
        for (adapter, layer, location), values in self.values.items():
            arrays = [v.squeeze().cpu().float().numpy() for v in values]
            out.setdefault(adapter, {}).setdefault(layer, {})[location] = arrays[0] if len(arrays) == 1 else np.column_stack(arrays)
        return out


class Gate(nn.Linear):
    """``mean_t sigmoid(W x_t + b)``: (batch, outputs) from (batch, seq, features). A Linear, so its
    weights keep AdapterHub's names (``gate.weight``, ``gate.bias``)."""

    label = "gate"  # in fxadapt.draw's pictures

    def __init__(self, in_features: int, outputs: int = 1, init_bias: bool = True):
        super().__init__(in_features, outputs)
        with torch.no_grad():
            self.weight.normal_(0.0, 0.02)
            if init_bias:
                self.bias.zero_()
        self.recorder: GateRecorder | None = None
        self.key: tuple[str, int, str] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(super().forward(x)).mean(dim=1)
        if self.recorder is not None and self.recorder.active:
            self.recorder.add(self.key, gate)
        return gate


def connect(module: nn.Module, recorder: GateRecorder, adapter: str, layer: int | None, location: str) -> None:
    """Make every Gate inside ``module`` report to ``recorder`` under (adapter, layer, location)."""
    for m in module.modules():
        if isinstance(m, Gate):
            m.recorder, m.key = recorder, (adapter, -1 if layer is None else layer, location)


def attach_recorded(module, output, recorder, field: str, read):
    """Forward-hook body: ``output[field] = read()`` after a call that turned ``recorder`` on (gating
    scores, fusion attentions), the recorder emptied and off again; InputError for an output that is
    no ModelOutput."""
    if not recorder.active:
        return output
    recorder.active = False
    if not hasattr(output, "to_tuple"):
        from ..errors import InputError

        raise InputError(f"{module._fx_model_name} returns {type(output).__name__}, not a ModelOutput: it cannot carry {field}")
    output[field] = read()
    recorder.values.clear()
    return output
