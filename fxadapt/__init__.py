"""fxadapt: parameter-efficient fine-tuning as graph rewriting.

A model is captured as an FX graph (torch.export, or torch.fx.symbolic_trace); adapter sites are
found from the graph's dataflow; passes insert adapters there; a merge pass folds LoRA and (IA)^3
into the weights.

>>> import fxadapt
>>> fxadapt.CONFIGS["pfeiffer"].reduction_factor
16

The public names are imported on first use (PEP 562), so ``import fxadapt`` and the ``fxadapt``
command line start without loading torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from . import config as _config  # no torch: configs are plain data
from . import errors  # noqa: F401  (public: fxadapt.errors)

if TYPE_CHECKING:
    from torch import nn

    from .config import AdapterConfig
    from .module import AdaptedModule

__version__ = "0.1.0"

#: Public name -> the submodule that defines it.
_SOURCES = {
    **dict.fromkeys(["AdapterError", "CaptureError", "CheckpointError", "ConfigError", "DrawError", "ExportError", "FxAdaptError",
                     "InputError", "MergeError", "SiteError"], "errors"),
    **dict.fromkeys(_config.__all__, "config"),
    "AdaptedModule": "module",
    **dict.fromkeys(["Stack", "Parallel", "BatchSplit", "Split", "Average", "Fuse"], "composition"),
    "Site": "sites",
    "capture": "capture",
    "draw": "draw",
    "export": "export",
    "load_exported": "serving",
}

__all__ = sorted([name for name in _SOURCES if name not in ("config_id", "resolve_config")] + ["errors", "rewrite"])


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, such as ``fxadapt.checkpoint``) on first use."""
    if name in _SOURCES:
        value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Importing the submodule ``fxadapt.capture`` (``draw``, ``export``) binds it as an attribute of
    the package, which would hide the function of the same name: those bindings are dropped, and the
    name resolves to the function through ``__getattr__``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _SOURCES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
    from .capture import capture
    from .config import config_id, resolve_config

    config = resolve_config(config)
    gm = capture(model, example_inputs, example_kwargs)
    gm.add_adapter(name or config_id(config), config, set_active=True)
    return gm
