"""The fold stage: adapters merged into the weight of the linear they adapt.

Each method that merges gives ``Method.fold(W, b, placement, weights) -> (W', b')``; :func:`fold`
applies the placements at one linear in order. It works on tensors only: ``AdaptedModule`` keeps the
originals and puts the results in place of the weights (``merge_adapter``), or the originals back
(``reset_adapter``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .errors import MergeError
from .methods import METHODS
from .placement import Placement

__all__ = ["fold"]


def fold(weight: torch.Tensor, bias: torch.Tensor | None, placements: Sequence[Placement], weights_of: Callable[[str], nn.Module], *,
         check_finite: bool = False, names: tuple[str, str | None] = ("the weight", "the bias")) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` and ``bias`` (``W`` and ``b`` of one linear) with the placements folded in, in
    order, in the dtype each method computes in; ``weights_of(path)`` gives a placement's weights.
    With ``check_finite``, MergeError names the adapter whose fold makes the weight or the bias
    (``names``) non-finite."""
    w, b = weight.detach(), None if bias is None else bias.detach()
    with torch.no_grad():
        for p in placements:
            w, b = METHODS[p.method].fold(w, b, p, weights_of(p.module))
            if check_finite and not (w.isfinite().all() and (b is None or b.isfinite().all())):
                which = names[0] if not w.isfinite().all() else names[1]
                raise MergeError(f"merging adapter {p.adapter!r} makes {which} non-finite (NaN or inf): the adapter seems broken; "
                                 "nothing was merged")
    return w, b
