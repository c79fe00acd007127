"""fxadapt: parameter-efficient fine-tuning as graph rewriting.

A model is captured as an FX graph (torch.export, or torch.fx.symbolic_trace); adapter sites are
found from the graph's dataflow; passes insert adapters there; a merge pass folds LoRA and (IA)^3
into the weights.

>>> import fxadapt
>>> fxadapt.CONFIGS["pfeiffer"].reduction_factor
16
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import errors
from .capture import capture
from .config import (
    CONFIGS,
    AdapterConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DoubleSeqBnConfig,
    DoubleSeqBnInvConfig,
    HoulsbyConfig,
    HoulsbyInvConfig,
    IA3Config,
    LoRAConfig,
    MAMConfig,
    ParallelConfig,
    ParBnConfig,
    PfeifferConfig,
    PfeifferInvConfig,
    PrefixTuningConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    UniPELTConfig,
    config_id,
    resolve_config,
)
from .errors import (AdapterError, CaptureError, CheckpointError, ConfigError, DrawError, ExportError, FxAdaptError, InputError,
                     MergeError, SiteError)
from .draw import draw
from .export import export
from .module import AdaptedModule
from .sites import Site

__version__ = "0.1.0"

__all__ = [
    "AdaptedModule",
    "AdapterConfig",
    "AdapterError",
    "BnConfig",
    "CONFIGS",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigUnion",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "HoulsbyConfig",
    "HoulsbyInvConfig",
    "MAMConfig",
    "ParBnConfig",
    "ParallelConfig",
    "PfeifferConfig",
    "PfeifferInvConfig",
    "PrefixTuningConfig",
    "SeqBnConfig",
    "SeqBnInvConfig",
    "UniPELTConfig",
    "CaptureError",
    "CheckpointError",
    "ConfigError",
    "DrawError",
    "ExportError",
    "FxAdaptError",
    "IA3Config",
    "InputError",
    "LoRAConfig",
    "MergeError",
    "Site",
    "SiteError",
    "capture",
    "draw",
    "errors",
    "export",
    "rewrite",
]


def rewrite(
    model: nn.Module,
    config: AdapterConfig | str,
    *,
    name: str | None = None,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
) -> AdaptedModule:
    """Capture ``model`` and add one active adapter: ``capture(model, ...)`` then ``add_adapter``.

    ``config`` is a config object or an id of ``CONFIGS``; ``name`` defaults to that id
    ("lora", "ia3", ...). The model itself is not changed (see ``AdaptedModule`` on shared weights).

    >>> import fxadapt, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(r=2, targets=["0", "2"], selfattn_lora=False))
    >>> gm.adapter_state_dict("lora")["0.lora_A"].shape
    torch.Size([2, 4])
    """
    config = resolve_config(config)
    gm = capture(model, example_inputs, example_kwargs)
    gm.add_adapter(name or config_id(config), config, set_active=True)
    return gm
