"""Adapter checkpoints: the native format, PEFT's format both ways, AdapterHub import, safe loading.

:class:`CheckpointMixin` gives :class:`~fxadapt.AdaptedModule` its ``save_adapter`` /
``load_adapter`` / ``average_adapter`` methods.
"""

from __future__ import annotations

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """Saving, loading and combining adapters (mixed into AdaptedModule)."""
