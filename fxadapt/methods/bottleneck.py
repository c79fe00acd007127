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

import operator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.fx import Node

import warnings

from .. import composition
from ..config import MAX_SIZE, BnConfig
from ..formats.common import AdapterHubCheckpoint, Converted, known_fields, layer_and_location, put
from ..errors import AdapterError, ConfigError, SiteError
from ..naming import ADAPTERS, INVERTIBLE, SHARED, state_key, weights_path
from ..placement import Placement, one_per_layer
from ..sites import Anatomy, Block
from .base import Activation, Emitter, Method, seeded
from .gating import Gate
from .invertible import check_sizes as _check_invertible_sizes

if TYPE_CHECKING:
    from ..module import AdaptedModule

aten = torch.ops.aten


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

    def frozen(self) -> list[nn.Parameter]:
        """The rule, when ``learn_phm=False``."""
        return [] if self.learn_phm else [p for n, p in self.named_parameters(recurse=False) if n.startswith("phm_rule")]

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

    def frozen(self) -> list[nn.Parameter]:
        """The rule, when ``learn_phm=False``."""
        return [] if self.learn_phm else [p for n, p in self.named_parameters(recurse=False) if n.startswith("phm_rule")]

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

    label = "bottleneck"  # in fxadapt.draw's pictures

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

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, *shared: torch.Tensor, return_up: bool = False):
        """The adapter's output; with ``return_up`` also ``scaling * up(...)`` before dropout and gate
        (AdapterHub's ``bottleneck_up``, what AdapterFusion attends over)."""
        named = dict(zip(self.shared_names, shared))
        h = x
        for layer in self.adapter_down:
            h = layer(h, named) if isinstance(layer, PHMLinear) else layer(h)
        up = self.adapter_up(h, named) if isinstance(self.adapter_up, PHMLinear) else self.adapter_up(h)
        up = up * self.scaling
        out = self.dropout(up)
        if self.gate is not None:
            out = out * self.gate(x).unsqueeze(-1)
        if self.parallel:
            out = out if self.adapter_norm_after is None else self.adapter_norm_after(out)
        else:
            if not self.residual_after_ln:
                out = out + residual
            if self.adapter_norm_after is not None:
                out = self.adapter_norm_after(out)
            out = out + residual if self.residual_after_ln else out
        return (out, up) if return_up else out


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


class _BnState(NamedTuple):
    """AdapterHub's ``BottleneckState``: the hidden states, the block's residual input, the adapter's residual;
    ``fresh`` while ``hidden`` and ``input_tensor`` are the block's own (its add and norm are reused)."""

    hidden: Node
    input_tensor: Node
    residual: Node
    last: str | None
    fresh: bool
    up: Node | None = None  # the last adapter's scaled up-projection, inside a Fuse


class Composer(composition.Composer):
    """Bottleneck adapters in a composition at one residual block, as AdapterHub's ``BottleneckLayer``:
    ``pre_forward`` of an adapter's config before each adapter of a Stack (and once before a block, with
    its first adapter's config), the adapter, then ``post_forward`` with the last adapter's config."""

    def __init__(self, e: Emitter, placements, weights):
        super().__init__(e, placements, weights)
        self.block = next(iter(placements.values())).block
        if not self.block.direct:
            raise AdapterError(f"the {self.block.location} block of layer {self.block.layer} adds its residual later (parallel "
                               "attention and feed-forward): bottleneck adapters there do not compose in blocks")
        self.add = e.named(self.block.add)
        self.r = self.add.args[self.block.residual_arg]
        self.s = self.add.args[1 - self.block.residual_arg]

    def initial(self):
        return _BnState(self.s, self.r, self.r, None, True)

    def rows(self, state):
        return self.e.call(aten.sym_size.int, state.hidden, 0)

    def _norm(self, added: Node) -> Node:
        return self.e.copy_nodes(self.block.norm, {self.add: added}) if self.block.norm else added

    def pre_block(self, block, state):
        names = [block] if isinstance(block, str) else block.flatten()
        config = self.placements[next(n for n in names if n in self.placements)].config
        if config.is_parallel:  # ParallelAdapter.pre_forward: the block's input, for both
            return state._replace(hidden=state.input_tensor, residual=state.input_tensor, fresh=False)
        hidden, residual = state.hidden, state.residual
        if config.residual_before_ln is True:
            residual = hidden
        if config.original_ln_before:
            if state.fresh:  # LN(s + r): the block's own output
                added, hidden = self.add, self.e.node
            else:
                added = self.e.call(aten.add.Tensor, hidden, state.input_tensor)
                hidden = self._norm(added)
            if config.residual_before_ln == "post_add":
                residual = added
        if config.residual_before_ln is False:
            residual = hidden
        return state._replace(hidden=hidden, residual=residual, fresh=False)

    want_up = False  # inside a Fuse: the adapters' up-projections are read too

    def single(self, name, state):
        p = self.placements[name]
        rule = tuple(self.e.attr(f"{path}.{n}") for path in p.shared for n in PHMShared.names(p.config))
        args = (state.hidden, None if p.config.is_parallel else state.residual, *rule)
        if not self.want_up:
            return state._replace(hidden=self.e.module(p.module, *args), last=name, fresh=False)
        both = self.e._new("call_module", p.module, args, {"return_up": True})
        out, up = (self.e.call(operator.getitem, both, i) for i in (0, 1))
        return state._replace(hidden=out, last=name, fresh=False, up=up)

    def fuse(self, block, state, lvl):
        """AdapterHub's ``compose_fuse``: the last adapter's ``pre_forward`` (which also gives the query), each
        child on that state, then the fusion layer over their up-projections, plus the adapter's residual."""
        names = [n for n in block.flatten() if n in self.placements]
        last = block.last() if block.last() in self.placements else names[-1]
        config, fusion = self.placements[last].config, self.fusions[block.name]
        before = state.hidden
        state = self.pre_block(last, state)
        if config.is_parallel:
            query = state.input_tensor
        else:
            query = before if fusion.config.query_before_ln else state.hidden
        outer, self.want_up = self.want_up, True
        outs = [self.single(c, state) if isinstance(c, str) else composition._run(self, c, state, lvl + 1)
                for c in block.children if self.has_any([c] if isinstance(c, str) else c.flatten())]
        self.want_up = outer
        ups = self.e.call(aten.stack.default, [o.up for o in outs], 2)
        path = fusion.modules[(self.block.layer, self.block.location)]
        fused = self.e.module(path, query, ups, state.residual)
        return state._replace(hidden=fused, last=last, fresh=False, up=None)

    def vslice(self, state, start, stop):
        sl = lambda t: self.slice(t, 0, start, stop)  # noqa: E731
        return _BnState(sl(state.hidden), sl(state.input_tensor), sl(state.residual), state.last, False)

    def cat(self, states):
        if any(s.last is None for s in states) and any(s.last is not None for s in states):
            # AdapterHub's BottleneckLayer fails here: it would finish every row with the last slice's adapter.
            raise AdapterError(f"at the {self.block.location} block of layer {self.block.layer} some rows of a Parallel / BatchSplit "
                               f"pass a bottleneck adapter ({', '.join(self.placements)}) and some none, but the block ends with one "
                               "adapter's post_forward for all its rows: give each child a bottleneck adapter there, or run each row "
                               "through its own adapter with adapter_names (the batch repeated for a Parallel)")
        cat = lambda ts: self.e.call(aten.cat.default, ts, 0)  # noqa: E731
        return _BnState(cat([s.hidden for s in states]), cat([s.input_tensor for s in states]), cat([s.residual for s in states]),
                        states[-1].last, False)

    def seq_slice(self, state, start, stop):
        sl = lambda t: self.slice(t, 1, start, stop)  # noqa: E731
        return _BnState(sl(state.hidden), sl(state.input_tensor), sl(state.residual), None, False)

    def seq_cat(self, states, before):
        last = next((s.last for s in reversed(states) if s.last is not None), None)
        return before._replace(hidden=self.e.call(aten.cat.default, [s.hidden for s in states], 1), last=last, fresh=False)

    def mean(self, outs, state):
        # AdapterHub: torch.mean(stack(outputs) * weights, 0): the weighted sum over the number of outputs
        total = None
        for w, out in outs:
            term = self.e.call(aten.mul.Tensor, out.hidden, w)
            total = term if total is None else self.e.call(aten.add.Tensor, total, term)
        hidden = self.e.call(aten.div.Tensor, total, len(outs))
        return outs[0][1]._replace(hidden=hidden, last=outs[-1][1].last, fresh=False)

    def finish(self, state):
        if state.last is None:
            return
        config, hidden = self.placements[state.last].config, state.hidden
        if config.is_parallel:  # ParallelAdapter.post_forward: plus the sublayer output
            hidden = self.e.call(aten.add.Tensor, hidden, self.s)
        if config.original_ln_after:
            hidden = self._norm(self.e.call(aten.add.Tensor, hidden, state.input_tensor))
        self.e.y = hidden


def _build_bottleneck(block: Block, config: BnConfig, like: torch.Tensor) -> Bottleneck:
    return Bottleneck(block, config, like)


def _build_shared(config: BnConfig, placements: list[Placement], like: torch.Tensor) -> PHMShared:
    block = placements[0].block
    with seeded(config.init_weights_seed, "shared"):
        shared = PHMShared(config, block.hidden_size, int(block.hidden_size // config.factor(block.layer)))
    return shared.to(like.device, like.dtype)


# -- where ---------------------------------------------------------------------------------


def place(name: str, config: BnConfig, anatomy: Anatomy) -> list[Placement]:
    """One adapter per selected residual block, and the invertible adapter on the embedding output."""
    blocks, model_name = anatomy.blocks, anatomy.model_name
    wanted = {"mh": config.mh_adapter, "output": config.output_adapter}
    # The first o / ffn_out projection whose output reaches no residual add (sites.find_blocks says why).
    failing = next(((s, why) for s, why in anatomy.unmatched
                    if wanted["mh" if s.role == "o" else "output"] and s.layer not in config.leave_out), None)
    if not blocks:
        because = f": {failing[0].path} ({failing[0].role}, layer {failing[0].layer}) does not close one, {failing[1]}" if failing else ""
        raise SiteError(f"{type(config).__name__} needs residual blocks after attention / feed-forward projections; {model_name} has none{because}")
    if failing is not None:
        site, why = failing
        raise SiteError(f"{type(config).__name__}: the {site.role} projection {site.path} (layer {site.layer}) of {model_name} closes no "
                        f"residual block for the adapter to sit at: {why}; leave_out=[{site.layer}] skips that layer")
    shared = (weights_path(SHARED, name),) if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm) else ()
    placements = []
    for block in blocks:
        if not wanted[block.location] or block.layer in config.leave_out:
            continue
        _check_sizes(config, block)
        # The adapter's weights live under the projection that closes its block.
        placements.append(Placement(name, "bottleneck", block, weights_path(ADAPTERS, name, block.path), config, shared=shared))
    if config.inv_adapter:
        # The first block's residual input is the embedding output.
        first = blocks[0]
        _check_invertible_sizes(config, first.hidden_size)
        placements.append(Placement(name, "invertible", first, weights_path(INVERTIBLE, name), config, anchor=first.residual))
    if not placements:
        raise SiteError(f"{type(config).__name__} selects no block of {model_name} (leave_out={list(config.leave_out)})")
    return one_per_layer(placements)


def _check_sizes(config: BnConfig, block: Block) -> None:
    hidden, factor = block.hidden_size, config.factor(block.layer)
    down = hidden / factor
    # Compared before int(): a tiny factor makes the quotient inf.
    if not down <= MAX_SIZE:
        raise ConfigError(f"{type(config).__name__}.reduction_factor={factor} makes a bottleneck of {down:.3g} on the hidden size {hidden} "
                          f"(layer {block.layer}), more than 2**31", field="reduction_factor", value=factor)
    if down != int(down) or down < 1:
        raise ConfigError(f"{type(config).__name__}.reduction_factor={factor} does not divide the hidden size {hidden} (layer {block.layer})",
                          field="reduction_factor", value=factor)
    if config.phm_layer and (hidden % config.phm_dim or int(down) % config.phm_dim):
        raise ConfigError(f"{type(config).__name__}.phm_dim={config.phm_dim} must divide the hidden size {hidden} and the bottleneck size {int(down)}",
                          field="phm_dim", value=config.phm_dim)


def gate_location(p: Placement) -> str:
    """AdapterHub's gate location of a bottleneck adapter: mh_adapter or output_adapter."""
    return f"{p.block.location}_adapter"


# -- AdapterHub checkpoints ----------------------------------------------------------------


def _bottleneck_key(key: str, name: str, blocks: dict[tuple[int, str], Placement]) -> str:
    for container in (INVERTIBLE, SHARED):
        _, sep, param = key.partition(f"{container}.{name}.")
        if sep:
            return f"{container}.{param}"
    _, sep, param = f".{key}".partition(f".{ADAPTERS}.{name}.")
    p = blocks.get(layer_and_location(key, ADAPTERS)) if sep else None
    return state_key(p.module, "adapter", param) if p is not None else key


def read_adapterhub(gm: AdaptedModule, ckpt: AdapterHubCheckpoint) -> Converted:
    """AdapterHub bottleneck adapters: ``<block>.adapters.<name>.<param>`` by layer and block
    (the same parameter names as fxadapt's), ``invertible_adapters.<name>.<param>`` and the
    Compacter rule ``shared_parameters.<name>.phm_rule``."""
    config = ckpt.make_config(BnConfig, **known_fields(BnConfig, ckpt.config))
    placements = ckpt.placements(place, gm, config)
    blocks = {(p.block.layer, p.block.location): p for p in placements if p.method == "bottleneck"}
    tensors, sources = {}, {}
    for key, tensor in ckpt.tensors.items():
        if ".adapter_norm_before." in key:
            continue  # AdapterHub's alias of adapter_down.0 (ln_before), stored twice
        ours = _bottleneck_key(key, ckpt.name, blocks)
        put(tensors, sources, ours, tensor, key, ckpt.weights_path)
    if config.phm_layer and config.shared_phm_rule and not any(k.startswith("shared_parameters.") for k in tensors):
        # AdapterHub 1.3.0's save_adapter leaves the shared rule out of the file (its own loading
        # then starts from a new one too): say so, and start from AdapterHub's initialisation.
        warnings.warn(f"{ckpt.weights_path} has no Compacter PHM rule (shared_parameters.{ckpt.name}.phm_rule): AdapterHub 1.3.0 "
                      "does not save it. The adapter starts from a new rule, so its outputs differ from the saved model's; "
                      "load the rule you trained with into adapter_state_dict()['shared_parameters.phm_rule']", stacklevel=4)
        with torch.random.fork_rng(devices=[]):
            n = config.phm_dim
            tensors["shared_parameters.phm_rule"] = torch.empty(n, n, n).normal_(0, config.phm_init_range)
    return Converted(ckpt.name, config, tensors, ckpt.weights_path, sources)


METHOD = Method("bottleneck", "bottleneck", _build_bottleneck, insert_bottleneck, place, exclusive=True, build_shared=_build_shared,
                gate_location=gate_location, adapterhub=read_adapterhub)
