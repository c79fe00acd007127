"""Where adapter weights live on an AdaptedModule, and the keys they are saved under: the one
place that knows the naming scheme.

Weights follow AdapterHub's container names, so that ``state_dict`` keys read as AdapterHub's:

=====================  ===============================================  ==========================
container              module path                                       ``adapter_state_dict`` key
=====================  ===============================================  ==========================
``loras``              ``<linear>.loras.<name>[.<role>]``                ``<linear>[.<role>].<param>``
``adapters``           ``<block's closing linear>.adapters.<name>``      ``<linear>.<param>``
``prefix_gates``       ``<attention module>.prefix_gates.<name>``        ``<attention module>.prefix_gates.<param>``
``invertible_adapters``  ``invertible_adapters.<name>``                  ``invertible_adapters.<param>``
``shared_parameters``  ``shared_parameters.<name>``                      ``shared_parameters.<param>``
``prefix_tunings``     ``prefix_tunings.<name>``                         ``prefix_tunings.<param>``
``prompt_tunings``     ``prompt_tunings.<name>``                         ``prompt_tunings.<param>``
``refts``              ``<layer module>.refts.<name>``                   ``<layer module>.refts.<param>``
``modules_to_save``    ``<owner>.modules_to_save.<name>.<leaf>``         ``<owner>.modules_to_save.<leaf>.value``
=====================  ===============================================  ==========================

The first two (weights *at* a linear) drop the container with the name in their keys; the others
keep the container, which tells what the weights are. A fused projection's roles (GPT-2's ``c_attn``
q and v) get one module each, ``<role>`` after the name. Layers that share their modules (ALBERT)
get one each: ``.layer<i>`` after the name.
"""

from __future__ import annotations

__all__ = ["AT_LINEAR", "CONTAINERS", "join", "weights_path", "state_key", "owner"]

LORAS = "loras"
ADAPTERS = "adapters"
PREFIX_GATES = "prefix_gates"
INVERTIBLE = "invertible_adapters"
SHARED = "shared_parameters"
PREFIX_TUNINGS = "prefix_tunings"
PROMPT_TUNINGS = "prompt_tunings"
REFTS = "refts"
SAVED = "modules_to_save"  # PEFT's name: an adapter's own copy of a base parameter

#: Containers of weights that sit at a linear: their keys leave the container out.
AT_LINEAR = (LORAS, ADAPTERS)
#: Every container, with the AdapterHub architecture whose weights it holds.
CONTAINERS = {LORAS: "lora", ADAPTERS: "bottleneck", SHARED: "bottleneck", INVERTIBLE: "bottleneck",
              PREFIX_TUNINGS: "prefix_tuning", PREFIX_GATES: "prefix_tuning",
              PROMPT_TUNINGS: "prompt_tuning", REFTS: "reft", SAVED: "lora"}


def join(*parts: str) -> str:
    """A dotted path of the non-empty parts."""
    return ".".join(p for p in parts if p)


def weights_path(container: str, name: str, at: str = "", part: str = "") -> str:
    """The module path of adapter ``name``'s weights in ``container``, under module ``at`` (a
    linear, an attention; empty for the module's top level), with ``part`` after the name (a role
    of a fused projection, ``layer<i>``)."""
    return join(at, container, name, part)


def state_key(path: str, name: str, param: str = "") -> str:
    """The ``adapter_state_dict`` key of parameter ``param`` of the weights at module ``path`` of
    adapter ``name``: the path without the name (and without a container of ``AT_LINEAR``)."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if parts[i] == name and parts[i - 1] in CONTAINERS:
            drop = {i - 1, i} if parts[i - 1] in AT_LINEAR else {i}
            path = ".".join(p for j, p in enumerate(parts) if j not in drop)
            break
    return join(path, param)


def owner(key: str, name: str) -> str | None:
    """The AdapterHub architecture whose container holds a key written with the adapter's name
    (``...loras.<name>.lora_A`` -> "lora"), or None."""
    for container, architecture in CONTAINERS.items():
        if f"{container}.{name}." in key:
            return architecture
    return None
