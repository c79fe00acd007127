"""Bottleneck adapters (Pfeiffer, Houlsby, parallel, Compacter) and invertible NICE adapters,
following AdapterHub 1.3.0 (``methods/modeling.py``, ``methods/bottleneck.py``, ``methods/invertible.py``).

At a residual block ``out = LN(s + r)`` (post-LN; pre-LN blocks have no LN), with ``s`` the sublayer
output and ``r`` the block's input, a sequential adapter computes::

    h, res = pre(s, r)                  # what the adapter reads, and its own skip connection
    a = adapter(h, res)                 # up(act(down(h))) * scaling (+ gate, LNs), plus res
    out = LN(a + r) if original_ln_after else a

and a parallel adapter ``LN(adapter(r) + s + r)``. The rule rewires the graph around the block's
add and norm (the norm is re-applied by copying its nodes); the adapter body is one ``call_module``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import get_activation

from ..config import BnConfig
from ..plan import Placement
from ..sites import Block
from . import METHODS, Emitter, Method
from .gating import Gate

aten = torch.ops.aten


class Activation(nn.Module):
    """AdapterHub's activation lookup: transformers' ``get_activation``, plus "leakyrelu"."""

    def __init__(self, name: str):
        super().__init__()
        name = name.lower()
        self.f = nn.functional.leaky_relu if name == "leakyrelu" else get_activation(name)

    def forward(self, x):
        return self.f(x)


def kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product over the last two dimensions."""
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1])


class PHMLinear(nn.Module):
    """Compacter's parameterised hypercomplex multiplication: ``y = x H + b`` with
    ``H = sum_i kron(rule_i, W_i)``; ``W`` factorised as ``W_left @ W_right`` (rank ``phm_rank``).
    The rule is this layer's own, or passed in when shared by all layers of the adapter."""

    def __init__(self, in_features: int, out_features: int, config: BnConfig):
        super().__init__()
        n = config.phm_dim
        self.factorized = config.factorized_phm_W
        self.factorized_rule = config.factorized_phm_rule
        if config.factorized_phm_W:
            self.W_left = nn.Parameter(_xavier(torch.empty(n, in_features // n, config.phm_rank)))
            self.W_right = nn.Parameter(_xavier(torch.empty(n, config.phm_rank, out_features // n)))
        else:
            self.W = nn.Parameter(_xavier(torch.empty(n, in_features // n, out_features // n)))
        if not config.shared_phm_rule:
            for name, shape in _rule_shapes(config).items():
                self.register_parameter(name, nn.Parameter(_rule_init(torch.empty(shape), config), requires_grad=config.learn_phm))
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None

    def forward(self, x: torch.Tensor, rule: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        rule = rule or tuple(getattr(self, name) for name in ("phm_rule_left", "phm_rule_right", "phm_rule") if hasattr(self, name))
        r = torch.bmm(*rule) if self.factorized_rule else rule[0]
        w = torch.bmm(self.W_left, self.W_right) if self.factorized else self.W
        y = x @ kronecker(r, w).sum(0)
        return y if self.b is None else y + self.b


def _rule_shapes(config: BnConfig) -> dict[str, tuple[int, ...]]:
    n = config.phm_dim
    return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config.factorized_phm_rule else {"phm_rule": (n, n, n)}


def _rule_init(t: torch.Tensor, config: BnConfig) -> torch.Tensor:
    return t.normal_(0, config.phm_init_range) if config.phm_c_init == "normal" else t.uniform_(-1, 1)


def _xavier(t: torch.Tensor) -> torch.Tensor:
    # AdapterHub initialises every PHM weight slice with xavier_normal (its glorot-uniform branch is unreachable).
    for i in range(t.shape[0]):
        nn.init.xavier_normal_(t[i])
    return t


class PHMRule(nn.Module):
    """The PHM rule one adapter shares across all its layers (AdapterHub's ``shared_parameters``)."""

    def __init__(self, config: BnConfig):
        super().__init__()
        for name, shape in _rule_shapes(config).items():
            self.register_parameter(name, nn.Parameter(_rule_init(torch.empty(shape), config), requires_grad=config.learn_phm))


class Bottleneck(nn.Module):
    """The adapter body, AdapterHub's ``Adapter`` / ``ParallelAdapter`` with the same parameter names:
    ``adapter_down`` (LN?, down projection, activation), ``adapter_up``, ``scaling``,
    ``adapter_norm_after``, ``gate``."""

    def __init__(self, block: Block, config: BnConfig, like: torch.Tensor):
        super().__init__()
        hidden = block.hidden_size
        down = max(1, int(hidden // config.factor(block.layer)))
        self.parallel = config.is_parallel
        self.residual_after_ln = not config.adapter_residual_before_ln
        self.gated = config.use_gating
        layers: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.append(self.adapter_norm_before)
        layers += [PHMLinear(hidden, down, config) if config.phm_layer else nn.Linear(hidden, down), Activation(config.non_linearity)]
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = PHMLinear(down, hidden, config) if config.phm_layer else nn.Linear(down, hidden)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        self.adapter_norm_after = nn.LayerNorm(hidden) if config.ln_after else None
        self.gate = Gate(hidden, 1) if config.use_gating else None
        self.dropout = nn.Dropout(config.dropout)
        self._init(config)
        self.to(device=like.device, dtype=like.dtype)

    def _init(self, config: BnConfig) -> None:
        linears = [m for m in (*self.adapter_down, self.adapter_up) if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for m in linears:
                if config.init_weights == "houlsby":
                    nn.init.trunc_normal_(m.weight, std=1e-2, a=-2e-2, b=2e-2)
                else:
                    m.weight.normal_(0.0, 0.02)
                m.bias.zero_()

            if config.init_weights == "mam_adapter":
                for m in linears[:-1]:
                    nn.init.kaiming_uniform_(m.weight, a=5**0.5)
                if isinstance(self.adapter_up, nn.Linear):
                    self.adapter_up.weight.zero_()

    def _project(self, module: nn.Module, x: torch.Tensor, rule: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return module(x, rule) if isinstance(module, PHMLinear) else module(x)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *rule: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.adapter_down:
            h = self._project(layer, h, rule)
        out = self.dropout(self._project(self.adapter_up, h, rule) * self.scaling)
        if self.gate is not None:
            out = out * self.gate(x).unsqueeze(-1)
        if self.parallel:
            return out if self.adapter_norm_after is None else self.adapter_norm_after(out)
        if not self.residual_after_ln:
            out = out + residual
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        return out + residual if self.residual_after_ln else out


class NICE(nn.Module):
    """Invertible NICE coupling block on the embedding output (AdapterHub's ``NICECouplingBlock``):
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``."""

    def __init__(self, hidden: int, config: BnConfig, like: torch.Tensor):
        super().__init__()
        self.split = hidden // 2
        factor = config.inv_adapter_reduction_factor

        def subnet(n_in: int, n_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(n_in, int(n_in // factor)), Activation(config.non_linearity), nn.Linear(int(n_in // factor), n_out))

        self.F = subnet(hidden - self.split, self.split)
        self.G = subnet(self.split, hidden - self.split)
        with torch.no_grad():
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


# -- rewrite rules ----------------------------------------------------------------------------


def insert_bottleneck(e: Emitter, p: Placement, w: Bottleneck) -> None:
    config, block = p.config, p.block
    assert isinstance(config, BnConfig) and block is not None
    add = e.named(block.add)
    r, s = add.args[block.residual_arg], add.args[1 - block.residual_arg]
    names = ("phm_rule_left", "phm_rule_right") if config.factorized_phm_rule else ("phm_rule",)
    rule = tuple(e.attr(f"{path}.{n}") for path in p.shared for n in names)
    if config.is_parallel:
        out = e.call(aten.add.Tensor, e.module(p.module, r, None, *rule), s)
    else:
        residual = s if config.residual_before_ln is True else None
        if config.original_ln_before:
            h = e.node  # LN(s + r), or s + r in a pre-LN block: the block's own output
            if config.residual_before_ln == "post_add":
                residual = add
        else:
            h = s
        if config.residual_before_ln is False:
            residual = h
        out = e.module(p.module, h, residual, *rule)
    if config.original_ln_after:
        out = e.call(aten.add.Tensor, out, r)
        if block.norm:
            out = e.copy_nodes(block.norm, {add: out})
    e.y = out


def insert_invertible(e: Emitter, p: Placement, w: NICE) -> None:
    e.y = e.module(p.module, e.node)


def _build_bottleneck(block: Block, config: BnConfig, like: torch.Tensor) -> Bottleneck:
    return Bottleneck(block, config, like)


def _build_invertible(block: Block, config: BnConfig, like: torch.Tensor) -> NICE:
    return NICE(block.hidden_size, config, like)


METHODS["bottleneck"] = Method("bottleneck", _build_bottleneck, insert_bottleneck, exclusive=True,
                               build_shared=lambda config, placements, like: PHMRule(config).to(like.device, like.dtype))
METHODS["invertible"] = Method("bottleneck", _build_invertible, insert_invertible, exclusive=True)
