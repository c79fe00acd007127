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
from . import METHODS, Emitter, Method, seeded
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


def _phm_weights(config: BnConfig, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
    n, rank = config.phm_dim, config.phm_rank
    if config.factorized_phm_W:
        return {"W_left": (n, in_features // n, rank), "W_right": (n, rank, out_features // n)}
    return {"W": (n, in_features // n, out_features // n)}


def _rule_shapes(config: BnConfig) -> dict[str, tuple[int, ...]]:
    n = config.phm_dim
    return {"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config.factorized_phm_rule else {"phm_rule": (n, n, n)}


def _init_w(t: torch.Tensor, config: BnConfig) -> torch.Tensor:
    for i in range(t.shape[0]):
        if config.hypercomplex_nonlinearity == "normal":
            t[i].normal_(0, config.phm_init_range)
        elif config.hypercomplex_nonlinearity == "glorot-uniform":
            nn.init.xavier_uniform_(t[i])
        else:
            nn.init.xavier_normal_(t[i])
    return t


def _init_rule(t: torch.Tensor, config: BnConfig, shared: bool) -> torch.Tensor:
    # AdapterHub's ranges: a shared rule N(0, phm_init_range) or U(-1, 1); a layer's own N(0, 0.01) or U(-0.01, 0.01).
    if config.phm_c_init == "normal":
        return t.normal_(0, config.phm_init_range if shared else 0.01)
    return t.uniform_(-1, 1) if shared else t.uniform_(-0.01, 0.01)


def _parameter(shape, init, learn: bool = True) -> nn.Parameter:
    return nn.Parameter(init(torch.empty(shape)), requires_grad=learn)


def frozen_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters an adapter keeps fixed while it trains: PHM rules with ``learn_phm=False``."""
    return [p for m in module.modules() if isinstance(m, (PHMShared, PHMLinear)) and not m.learn_phm
            for name, p in m.named_parameters(recurse=False) if name.startswith("phm_rule")]


class PHMShared(nn.Module):
    """What an adapter's PHM layers share across layers (AdapterHub's ``shared_parameters``): the
    rule (``shared_phm_rule``) and the down / up weights (``shared_W_phm``)."""

    def __init__(self, config: BnConfig, hidden: int, down: int):
        super().__init__()
        self.learn_phm = config.learn_phm
        if config.shared_phm_rule:
            for name, shape in _rule_shapes(config).items():
                self.register_parameter(name, _parameter(shape, lambda t: _init_rule(t, config, True), config.learn_phm))
        if config.shared_W_phm:
            for position, (i, o) in (("down", (hidden, down)), ("up", (down, hidden))):
                for name, shape in _phm_weights(config, i, o).items():
                    self.register_parameter(name.replace("W", f"W_{position}"), _parameter(shape, lambda t: _init_w(t, config)))

    @staticmethod
    def names(config: BnConfig) -> list[str]:
        """The shared tensors, in the order the graph passes them to the adapters."""
        names = list(_rule_shapes(config)) if config.shared_phm_rule else []
        if config.shared_W_phm:
            names += [n.replace("W", f"W_{pos}") for pos in ("down", "up") for n in _phm_weights(config, 4, 4)]
        return names


class PHMLinear(nn.Module):
    """Compacter's parameterised hypercomplex multiplication: ``y = x H + b``,
    ``H = sum_i kron(rule_i, W_i)``, ``W = W_left @ W_right`` (rank ``phm_rank``) when factorised.
    Rule and weights are the layer's own or, when shared, passed in by name."""

    def __init__(self, in_features: int, out_features: int, config: BnConfig, position: str):
        super().__init__()
        self.position = position
        self.learn_phm = config.learn_phm
        self.factorized = config.factorized_phm_W
        self.factorized_rule = config.factorized_phm_rule
        if not config.shared_W_phm:
            for name, shape in _phm_weights(config, in_features, out_features).items():
                self.register_parameter(name, _parameter(shape, lambda t: _init_w(t, config)))
        if not config.shared_phm_rule:
            for name, shape in _rule_shapes(config).items():
                self.register_parameter(name, _parameter(shape, lambda t: _init_rule(t, config, False), config.learn_phm))
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None

    def forward(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        get = lambda name: shared.get(name) if name in shared else getattr(self, name)  # noqa: E731
        r = torch.bmm(get("phm_rule_left"), get("phm_rule_right")) if self.factorized_rule else get("phm_rule")
        w = f"W_{self.position}" if f"W_{self.position}_left" in shared or f"W_{self.position}" in shared else "W"
        w = torch.bmm(get(f"{w}_left"), get(f"{w}_right")) if self.factorized else get(w)
        y = x @ kronecker(r, w).sum(0)
        return y if self.b is None else y + self.b


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
        self.shared_names = PHMShared.names(config) if config.phm_layer else []
        with seeded(config.init_weights_seed, block.layer, block.location):
            layers: list[nn.Module] = [nn.LayerNorm(hidden)] if config.ln_before else []
            layers += [PHMLinear(hidden, down, config, "down") if config.phm_layer else nn.Linear(hidden, down),
                       Activation(config.non_linearity)]
            self.adapter_down = nn.Sequential(*layers)
            self.adapter_up = PHMLinear(down, hidden, config, "up") if config.phm_layer else nn.Linear(down, hidden)
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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *shared: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.shared_names, shared))
        h = x
        for layer in self.adapter_down:
            h = layer(h, named) if isinstance(layer, PHMLinear) else layer(h)
        up = self.adapter_up(h, named) if isinstance(self.adapter_up, PHMLinear) else self.adapter_up(h)
        out = self.dropout(up * self.scaling)
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


# -- rewrite rules ----------------------------------------------------------------------------


def insert_bottleneck(e: Emitter, p: Placement, w: Bottleneck) -> None:
    config, block = p.config, p.block
    assert isinstance(config, BnConfig) and block is not None
    add = e.named(block.add)
    r = add.args[block.residual_arg]
    rule = tuple(e.attr(f"{path}.{n}") for path in p.shared for n in PHMShared.names(config))
    if not block.direct:
        # Parallel-residual layer: the residual comes in later, after the other sublayer's output
        # (AdapterHub's Phi): the adapter works on the sublayer output alone.
        s = e.node
        out = e.module(p.module, r if config.is_parallel else s, None if config.is_parallel else s, *rule)
        e.y = e.call(aten.add.Tensor, out, s) if config.is_parallel else out
        return
    s = add.args[1 - block.residual_arg]
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


def _build_shared(config: BnConfig, placements: list[Placement], like: torch.Tensor) -> PHMShared:
    block = placements[0].block
    with seeded(config.init_weights_seed, "shared"):
        shared = PHMShared(config, block.hidden_size, int(block.hidden_size // config.factor(block.layer)))
    return shared.to(like.device, like.dtype)


METHODS["bottleneck"] = Method("bottleneck", _build_bottleneck, insert_bottleneck, exclusive=True, build_shared=_build_shared)
METHODS["invertible"] = Method("bottleneck", _build_invertible, insert_invertible, exclusive=True)
