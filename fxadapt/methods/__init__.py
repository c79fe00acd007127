"""Adapter methods, one file each. A file fills in a :class:`~fxadapt.methods.base.Method`:
where the method goes (a placement rule over the model's sites, blocks or attentions), the
weights it builds, the nodes it inserts, its fold into the weights when it merges, and how
its checkpoints in PEFT's format (both ways) and AdapterHub's are converted. Its config class lives in ``fxadapt.config`` (configs
load without torch), and names the method with ``config.method``.

``METHODS`` is the one table of methods; adding a method is a file here and a line below.
"""

from __future__ import annotations

from . import bottleneck, dora, ia3, invertible, loha, lokr, lora, prefix, prompt, reft, saved_modules, vera
from .base import Method

__all__ = ["METHODS", "Method"]

#: Every method by name (``Placement.method``, ``config.method``).
METHODS: dict[str, Method] = {m.name: m for m in (
    lora.METHOD,
    ia3.METHOD,
    loha.METHOD,
    lokr.METHOD,
    dora.METHOD,
    vera.METHOD,
    bottleneck.METHOD,
    invertible.METHOD,
    prefix.METHOD,
    prompt.METHOD,
    reft.METHOD,
    saved_modules.METHOD,  # PEFT's modules_to_save, added to any method's placements by fxadapt.plan
)}
