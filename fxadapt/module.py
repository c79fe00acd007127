"""AdaptedModule: a captured model as a GraphModule, with named adapters.

The module keeps the pristine captured graph. Whenever the set of active or merged adapters
changes, the live graph is rebuilt from it: copy, annotate the placements of the active, unmerged
adapters, run the insert passes, lint, recompile. Merged adapters live in the weights instead.

Weights and the user's model: the captured graph reads the model's own Parameter objects (no copy).
``merge_adapter`` never writes into them: it puts new, merged tensors on this module and keeps the
originals, which ``reset_adapter`` puts back (the same objects, so bit for bit).
``train_adapter`` sets ``requires_grad=False`` on the base parameters, which the model shares.

Devices: a captured graph names the device its ops create tensors on (``arange(..., device=cpu)``).
``.to(device)`` / ``.cuda()`` move what the module holds (parameters, buffers, the graph's constant
tensors, the originals of merged weights) and point those ops at the new device.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.fx import GraphModule

from .checkpoint import CheckpointMixin
from .composition import Block, check_call, validate
from .config import AdapterConfig, BnConfig, LoRAConfig, PrefixTuningConfig, resolve_config
from .errors import AdapterError, ConfigError, InputError, MergeError
from .fold import fold
from .fusion import FusionMixin, FusionRecorder
from .fusion import attach_attentions as _attach_fusion_attentions
from .fusion import prepare_call as _prepare_fusion_call
from .methods import METHODS
from .methods.base import frozen_parameters
from .methods.gating import GateRecorder, attach_recorded, connect
from .naming import state_key
from .ops import copy_graph
from .passes import checkpointing
from .passes.dropout import RATE_MODULE, DropoutRate
from .passes.fuse import hoist_attribute_paths
from .passes.insert import OPTIMIZATIONS, insert_adapters
from .placement import Placement
from .plan import annotate, plan
from .sites import Anatomy, Site, anatomy
from .summary import SummaryRow, format_summary

if TYPE_CHECKING:
    from .capture import Captured

__all__ = ["AdaptedModule"]


@dataclass
class _Adapter:
    name: str
    config: AdapterConfig
    placements: list[Placement]
    shared: list[str]  # module paths of weights shared by its placements

    @property
    def modules(self) -> list[str]:
        """Every module path holding this adapter's weights."""
        return [p.module for p in self.placements if p.module is not None] + self.shared


@dataclass
class _Job:
    """One weights module of a new adapter: where it goes, how to build it from the weight it
    follows (device, dtype), and the config and placement that set its size."""

    path: str
    build: Callable[[torch.Tensor], nn.Module]
    like: str
    config: AdapterConfig
    placement: Placement | None = None


# What an AdaptedModule operation may change besides modules, parameters and the graph (see _atomic).
_BOOKKEEPING = ("_fx_adapters", "_fx_active", "_fx_merged", "_fx_originals", "_fx_merge_inactive", "_fx_setup", "_fx_fusions")


class AdaptedModule(FusionMixin, CheckpointMixin, GraphModule):
    """A model captured as a graph, to which named adapters are added, activated, trained,
    merged into the weights and reset. Call it as the model: same inputs, same output type.

    Make one with :func:`fxadapt.capture` or :func:`fxadapt.rewrite`.

    >>> import fxadapt, torch
    >>> gm = fxadapt.capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    >>> gm.add_adapter("lora", fxadapt.LoRAConfig(targets=r"0", selfattn_lora=False), set_active=True)
    >>> gm.active_adapters
    ['lora']
    """

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_captured(cls, captured: Captured) -> AdaptedModule:
        """The module around a captured graph (``fxadapt.capture`` makes it), with no adapters yet."""
        root, inputs, model = captured.graph, captured.inputs, captured.model
        gm = cls(root, root.graph, "AdaptedModule")
        _copy_state(root, gm)
        if not hasattr(gm, RATE_MODULE):
            gm.add_module(RATE_MODULE, DropoutRate())
        for name in ("_in_spec", "_out_spec"):
            if hasattr(root, name):
                setattr(gm, name, getattr(root, name))
        gm._fx_model_name = type(model).__name__
        gm.__dict__["_fx_source"] = model  # for merge_and_unload; not registered: it would list the weights twice
        gm._fx_inputs = inputs
        gm._fx_example = captured.example  # fxadapt.export's default example inputs
        gm._fx_base = copy_graph(root.graph)
        gm._fx_anatomy: Anatomy = anatomy(root, gm._fx_model_name)
        gm._fx_gates = GateRecorder()
        gm._fx_adapters: dict[str, _Adapter] = {}
        gm._fx_active: list[str] = []
        gm._fx_setup: Block | None = None  # the composition block set_active_adapters was given (see _composition)
        gm._fx_merged: list[str] = []
        gm._fx_merge_inactive: set[str] = set()  # merged adapters that were inactive before: inactive again on reset
        gm._fx_originals: dict[str, nn.Parameter] = {}
        gm._fx_fusions: dict = {}  # AdapterFusion layers by name (fxadapt.fusion)
        gm._fx_fusion_recorder = FusionRecorder()
        gm._fx_capture_device, gm._fx_capture_dtype = _single_device(gm), _float_dtype(gm)
        gm.register_forward_pre_hook(_prepare_call, with_kwargs=True)
        gm.register_forward_hook(_attach_gating_scores, always_call=True)
        gm.register_forward_pre_hook(_prepare_fusion_call, with_kwargs=True, prepend=True)  # pops output_adapter_fusion_attentions
        gm.register_forward_hook(_attach_fusion_attentions, always_call=True)
        gm._rebuild()
        gm.train(model.training)
        return gm

    def _rebuild(self) -> None:
        graph = copy_graph(self._fx_base)
        placements = [p for name in self._fx_active if name not in self._fx_merged for p in self._fx_adapters[name].placements]
        annotate(graph, placements)
        insert_adapters(self, graph, self._composition())
        for optimize in OPTIMIZATIONS:
            optimize(self, graph)
        device = _single_device(self)
        if None not in (device, self._fx_capture_device) and device != self._fx_capture_device:
            retarget_devices(graph, self._fx_capture_device, device)
        checkpointing.apply(self, graph)  # activation checkpointing per layer, when enabled (activation_checkpointing_enable)
        graph.lint()
        self.graph = graph  # the setter recompiles

    # What site analysis found, as the placement rules read it.
    _fx_sites = property(lambda self: self._fx_anatomy.sites)
    _fx_linears = property(lambda self: self._fx_anatomy.linears)
    _fx_blocks = property(lambda self: self._fx_anatomy.blocks)
    _fx_attentions = property(lambda self: self._fx_anatomy.attentions)

    # -- adapters --------------------------------------------------------------------------

    def sites(self) -> list[Site]:
        """The sites found in the graph, by layer and role (q, k, v, o, ffn_in, ffn_out)."""
        return list(self._fx_sites)

    @property
    def adapters(self) -> dict[str, AdapterConfig]:
        """Every adapter on the module and its config, in the order they were added."""
        return {name: a.config for name, a in self._fx_adapters.items()}

    @property
    def active_adapters(self) -> list[str] | Block:
        """The adapters that act on the output, merged ones included: the composition block as set
        (``Stack("a", "b")``), or a list of names."""
        setup = self._composition()
        return setup if setup is not None else list(self._fx_active)

    def _composition(self) -> Block | None:
        """The active composition block: the one last set, while its adapters are exactly the active
        ones and none of them is merged (adding, deleting, merging or training others turns it off)."""
        setup = self.__dict__.get("_fx_setup")
        if setup is None or setup.flatten() != self._fx_active or any(n in self._fx_merged for n in self._fx_active):
            return None
        return setup

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters folded into the weights."""
        return list(self._fx_merged)

    def add_adapter(self, name: str, config: AdapterConfig | str, *, set_active: bool = False, autocast_adapter_dtype: bool = True) -> None:
        """Add adapter ``name`` with a config object or a ``fxadapt.CONFIGS`` id ("lora", "ia3", ...).

        Its weights are new parameters on this module (the model is not changed). As in AdapterHub,
        the adapter does not act until activated (``set_active=True``, ``set_active_adapters`` or
        ``train_adapter``).

        Sizes are checked before anything is allocated: weights that would not fit in the memory
        available on their device raise :class:`~fxadapt.ConfigError` naming the field that sets their
        size (``r``, ``rank_pattern``, ``reduction_factor``, ``prefix_length``...) and the bytes
        needed. Any failure leaves the module exactly as it was.

        ``autocast_adapter_dtype`` (PEFT's name and default): on a float16 / bfloat16 model, LoRA and
        (IA)^3 weights are float32, and the adapter's input and output are cast around them; False
        keeps the model's dtype. A config's own ``dtype`` wins over both.
        """
        config = resolve_config(config)
        if not isinstance(name, str) or not name or "." in name or not name.isprintable() or " " in name:
            raise AdapterError(f"adapter name must be a non-empty string without '.' or spaces (it names parameters), got {name!r}")
        if hasattr(nn.ModuleDict(), name):
            raise AdapterError(f"adapter name {name!r} is taken by torch.nn.Module itself (it names submodules); choose another")
        if name in self._fx_adapters:
            raise AdapterError(f"{self._fx_model_name} already has an adapter named {name!r}; delete_adapter({name!r}) first")
        if not isinstance(autocast_adapter_dtype, bool):
            raise ConfigError(f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}",
                              field="autocast_adapter_dtype", value=autocast_adapter_dtype)
        placements = plan(name, config, self._fx_anatomy)
        adapter = _Adapter(name, config, placements, sorted({path for p in placements for path in p.shared}))
        if set_active:
            self._check_composable(self._fx_active + [name], {name: adapter})
        jobs = self._weight_jobs(adapter, autocast_adapter_dtype)
        sizes = self._check_memory(name, jobs)
        with self._atomic():
            built = {}
            for job in jobs:
                try:
                    built[job.path] = job.build(self.get_parameter(job.like))
                except (MemoryError, RuntimeError) as e:
                    if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "out of memory" not in str(e).lower():
                        raise
                    raise _size_error(self._fx_model_name, name, sizes, f"allocating them failed ({type(e).__name__}: {str(e).strip()[:200]})") from e
            for p in placements:
                if p.module is not None:
                    connect(built[p.module], self._fx_gates, name, p.where.layer, METHODS[p.method].gate_location(p))
                    if p.shared and hasattr(built[p.module], "link"):  # weights that read modules they share (VeRA's A and B)
                        built[p.module].link(*(built[path] for path in p.shared))
            for path, weights in built.items():
                _set_module(self, path, weights.train(self.training))  # a new module is in training mode; follow ours
            self._fx_adapters[name] = adapter
            if set_active:
                self._fx_active.append(name)
            self._rebuild()

    def _weight_jobs(self, adapter: _Adapter, autocast: bool) -> list[_Job]:
        """What to build for a new adapter: one weights module per placement that has one, and the
        modules its placements share."""
        jobs = []
        for p in adapter.placements:
            if p.module is not None:
                config = _adapter_dtype(p.config or adapter.config, self.get_parameter(p.where.weight), autocast)
                jobs.append(_Job(p.module, functools.partial(METHODS[p.method].build, p.where, config), p.where.weight, config, p))
        for path in adapter.shared:
            owners = [p for p in adapter.placements if path in p.shared]
            config = _adapter_dtype(owners[0].config or adapter.config, self.get_parameter(owners[0].where.weight), autocast)
            jobs.append(_Job(path, functools.partial(METHODS[owners[0].method].build_shared, config, owners), owners[0].where.weight, config))
        return jobs

    def _check_memory(self, name: str, jobs: list[_Job]) -> list[tuple[int, _Job, nn.Module]]:
        """Build the weights on the meta device (no memory, no random numbers drawn) and compare their
        size with the memory available on each device; ConfigError naming the field that sets the size
        when they do not fit. Returns each job's bytes and meta weights."""
        sizes, needed = [], {}
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            for job in jobs:
                like = self.get_parameter(job.like)
                weights = job.build(torch.empty(0, dtype=like.dtype, device="meta"))
                size = sum(t.numel() * t.element_size() for t in (*weights.parameters(), *weights.buffers()))
                sizes.append((size, job, weights))
                needed[like.device] = needed.get(like.device, 0) + size
        for device, size in needed.items():
            available = _available_memory(device)
            if available is not None and size > available:
                raise _size_error(self._fx_model_name, name, sizes, f"{_bytes(available)} of {device} memory are available")
        return sizes

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its weights (a merged adapter is reset first)."""
        self._adapter(name)
        with self._atomic():
            if name in self._fx_merged:
                self.reset_adapter(name)
            adapter = self._fx_adapters.pop(name)
            for path in adapter.modules:
                _delete_module(self, path)
            if self._composition() is not None and name in self._fx_active:
                self._fx_active = []  # a composition without one of its adapters is no composition: none act
            if name in self._fx_active:
                self._fx_active.remove(name)
            self._fx_merge_inactive.discard(name)
            self._rebuild()

    def set_active_adapters(self, names: str | Iterable[str] | None) -> None:
        """Make exactly these adapters act, composed in this order (None or [] for none).

        Merged adapters act through the weights and must stay active: reset them to deactivate.

        A composition block (``Stack``, ``Parallel``, ``BatchSplit``, ``Split``, ``Average`` of
        :mod:`fxadapt.composition`) composes its adapters as AdapterHub does; AdapterError names the
        block, adapter and rule it breaks, and nothing changes. No adapter may be merged then.
        """
        if isinstance(names, Block):
            setup = names
            validate(setup, self._fx_adapters, self._fx_model_name, self._fx_fusions)
            if self._fx_merged:
                raise AdapterError(f"{type(setup).__name__}: adapter(s) {self._fx_merged} are merged into the weights; "
                                   "reset_adapter() them before activating a composition")
            with self._atomic():
                self._fx_active, self._fx_setup = setup.flatten(), setup
                self._rebuild()
            return
        names = self._names(names)
        dropped = [n for n in self._fx_merged if n not in names]
        if dropped:
            raise AdapterError(f"adapter(s) {dropped} are merged into the weights; reset_adapter() them before deactivating")
        self._check_composable(names)
        with self._atomic():
            self._fx_active, self._fx_setup = names, None
            self._rebuild()

    def train_adapter(self, names: str | Iterable[str], also: Iterable[str] = ()) -> None:
        """Train these adapters: activate them, put the module in training mode and make only their
        parameters, and the base parameters named in ``also``, require gradients.

        ``also`` takes parameter names or module prefixes (e.g. ``"classifier"``). The base
        parameters are the model's own, so the model sees their ``requires_grad`` change too.
        A composition block (``Stack("a", "b")``) trains its adapters and activates the block.
        """
        if isinstance(names, Block):
            setup = names
            validate(setup, self._fx_adapters, self._fx_model_name, self._fx_fusions)
            if self._fx_merged:
                raise AdapterError(f"{type(setup).__name__}: adapter(s) {self._fx_merged} are merged into the weights; "
                                   "reset_adapter() them before training a composition")
            with self._atomic():
                self.train_adapter(setup.flatten(), also)
                self._fx_setup = setup
                self._rebuild()
            return
        names = self._names(names)
        merged = [n for n in names if n in self._fx_merged]
        if merged:
            raise AdapterError(f"adapter(s) {merged} are merged into the weights; reset_adapter() before training")
        trainable = {id(p) for n in names for p in self._adapter_parameters(n)}
        base = dict(self._base_parameters())
        self._check_composable([n for n in self._fx_merged if n not in names] + names)
        for prefix in also:
            hits = [k for k in base if k == prefix or k.startswith(prefix + ".")]
            if not hits:
                raise AdapterError(f"also={prefix!r} names no base parameter of {self._fx_model_name}")
            trainable |= {id(base[k]) for k in hits}
        frozen = {id(p) for n in names for path in self._fx_adapters[n].modules for p in frozen_parameters(self.get_submodule(path))}
        with self._atomic():
            for p in self.parameters():
                p.requires_grad_(id(p) in trainable and id(p) not in frozen)
            self.train()
            self._fx_active, self._fx_setup = [n for n in self._fx_merged if n not in names] + names, None
            self._rebuild()

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's weights keyed by where they sit, without the adapter's name:
        ``<projection path>[.<role>].lora_A`` for LoRA, ``<projection path>.adapter_up.weight`` for a
        bottleneck adapter after that projection, ``invertible_adapters.F.0.weight``,
        ``shared_parameters.phm_rule``."""
        out = {}
        for path in self._adapter(name).modules:
            for pname, tensor in self.get_submodule(path).named_parameters():
                out[state_key(path, name, pname)] = tensor
        return out

    # -- merge -----------------------------------------------------------------------------

    def merge_adapter(self, names: str | Iterable[str], *, safe_merge: bool = False) -> None:
        """Fold LoRA / (IA)^3 adapters into the weights: the graph becomes the base graph again.

        The merged weights are new tensors on this module; the original parameters (shared with
        your model) are kept untouched and come back with ``reset_adapter``. Merged adapters act
        first, before any active unmerged adapter, in the order they were merged. An adapter that
        was not active acts while merged (as in AdapterHub) and is inactive again after the reset.

        ``safe_merge=True`` (PEFT's name) checks that every merged weight is finite before anything
        changes: MergeError names the adapter and the weight otherwise. Any failure leaves the module
        exactly as it was.
        """
        names = [n for n in self._names(names) if n not in self._fx_merged]
        setup = self._composition()
        if setup is not None and set(names) & set(setup.flatten()):
            raise MergeError(f"adapter(s) {sorted(set(names) & set(setup.flatten()))} compose as {setup!r}, which merging them one by one "
                             "would not compute: fold the block with fxadapt.composition.to_lora(gm, name, block), then merge that")
        for name in names:
            adapter = self._fx_adapters[name]
            for p in adapter.placements:
                if METHODS[p.method].fold is None:
                    raise MergeError(f"adapter {name!r} ({type(adapter.config).__name__}) cannot be merged into the weights")
            if getattr(adapter.config, "use_gating", False) or any(getattr(p.config, "use_gating", False) for p in adapter.placements):
                raise MergeError(f"adapter {name!r} is gated: its output depends on the input and cannot be folded")
        with self._atomic():
            self._fx_merge_inactive |= {n for n in names if n not in self._fx_active}
            self._fx_merged += names
            self._fx_active = [n for n in self._fx_active if n not in names] + names
            self._refold(check_finite=safe_merge)
            self._rebuild()

    def reset_adapter(self, name: str | None = None) -> None:
        """Undo ``merge_adapter`` for one adapter (or all): original weights back, bit for bit.

        An adapter that was active before the merge stays active, now acting through the graph
        again; one that was not active is inactive again (AdapterHub's reset: the output is the
        base model's again).
        """
        if name is not None:
            self._adapter(name)
            if name not in self._fx_merged:
                raise AdapterError(f"adapter {name!r} is not merged")
        with self._atomic():
            undone = list(self._fx_merged) if name is None else [name]
            self._fx_merged = [n for n in self._fx_merged if n not in undone]
            self._fx_active = [n for n in self._fx_active if n not in self._fx_merge_inactive or n not in undone]
            self._fx_merge_inactive -= set(undone)
            self._refold()
            self._rebuild()

    def _refold(self, check_finite: bool = False) -> None:
        """Recompute every merged weight from its original; put back originals no adapter folds into.
        With ``check_finite``, MergeError names the adapter whose fold makes a weight non-finite."""
        folds: dict[str, list[Placement]] = {}
        for name in self._fx_merged:
            for p in self._fx_adapters[name].placements:
                folds.setdefault(p.site.weight, []).append(p)
        # A fold may replace a parameter that is no linear's weight (modules_to_save's copies): no bias then.
        bias_of = {w: getattr(self._fx_linears.get(w), "bias", None) for w in folds}
        touched = set(folds) | {b for b in bias_of.values() if b}
        for path in [k for k in self._fx_originals if k not in touched]:
            _set_param(self, path, self._fx_originals.pop(path))
        for weight_path, placements in folds.items():
            bias_path = bias_of[weight_path]
            weight = self._fx_originals.setdefault(weight_path, self.get_parameter(weight_path))
            bias = self._fx_originals.setdefault(bias_path, self.get_parameter(bias_path)) if bias_path else None
            w, b = fold(weight, bias, placements, self.get_submodule, check_finite=check_finite,
                        names=(f"{weight_path} of {self._fx_model_name}", f"{bias_path} of {self._fx_model_name}"))
            _set_param(self, weight_path, nn.Parameter(w.to(weight.dtype), requires_grad=False))
            if bias_path:
                _set_param(self, bias_path, nn.Parameter(b.to(bias.dtype), requires_grad=False))

    @contextlib.contextmanager
    def _atomic(self):
        """Run the body as one change: when it raises (anything, MemoryError and KeyboardInterrupt
        included), every submodule, parameter, buffer, ``requires_grad`` flag, mode, the adapter
        bookkeeping and the graph are put back as they were. Nested uses restore at the outermost."""
        if self.__dict__.get("_fx_in_atomic"):
            yield
            return
        modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training) for m in self.modules()]
        params = {id(p): p for p in (*self.parameters(), *self._fx_originals.values())}
        flags = [(p, p.requires_grad) for p in params.values()]
        state = {k: copy.copy(self.__dict__[k]) for k in _BOOKKEEPING}
        graph = self._graph
        self.__dict__["_fx_in_atomic"] = True
        try:
            yield
        except BaseException:
            for m, children, own, buffers, training in modules:
                for now, then in ((m._modules, children), (m._parameters, own), (m._buffers, buffers)):
                    now.clear()
                    now.update(then)
                m.training = training
            for p, flag in flags:
                p.requires_grad_(flag)
            self.__dict__.update(state)
            if self._graph is not graph:
                self.graph = graph  # the setter recompiles: the code is the code before
            raise
        finally:
            self.__dict__["_fx_in_atomic"] = False

    def merge_and_unload(self, *, inplace: bool = False) -> nn.Module:
        """The model this module was captured from, as a plain module of its own class (e.g.
        ``BertModel``) with every active adapter merged into its weights: ``save_pretrained``,
        ``from_pretrained`` and everything downstream work without fxadapt. Inactive adapters are
        left out.

        Every active adapter must fold into the weights (LoRA, (IA)^3); otherwise
        :class:`~fxadapt.MergeError` names the one that cannot (a bottleneck adapter, prefix tuning,
        a gated adapter) and nothing changes.

        - ``inplace=False`` (default): a copy. The merged weights are new tensors, every other
          tensor is copied; your model and this module stay exactly as they were.
        - ``inplace=True``: the merged weights are written into your model's own parameters (no copy
          of the model) and your model is returned. This module shares those parameters, so it drops
          the merged adapters and goes on computing the same function through the base graph.

        >>> import fxadapt, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> gm = fxadapt.rewrite(model, fxadapt.LoRAConfig(targets=["0"], selfattn_lora=False))
        >>> type(gm.merge_and_unload()).__name__
        'Sequential'
        """
        source = self.__dict__.get("_fx_source")
        if source is None:
            raise MergeError(f"this {self._fx_model_name} module keeps no reference to the model it was captured from")
        active, merged = list(self._fx_active), list(self._fx_merged)
        try:
            self.merge_adapter([n for n in active if n not in merged])
        except MergeError as e:
            raise MergeError(f"{e}; merge_and_unload merges every active adapter: deactivate it first (set_active_adapters)") from None
        folded = {path: (original, self.get_parameter(path)) for path, original in self._fx_originals.items()}
        own = {id(p) for _, p in source.named_parameters(remove_duplicate=False)}
        if any(id(original) not in own for original, _ in folded.values()):
            self._fx_active, self._fx_merged = active, merged
            self._refold()
            self._rebuild()
            raise MergeError(f"the weights of this module are no longer {self._fx_model_name}'s own parameters; capture the model again")
        if inplace:
            with torch.no_grad():
                for path, (original, value) in folded.items():
                    original.copy_(value)  # the user's parameter now holds the merged weight
                    _set_param(self, path, original)
            self._fx_originals, names, self._fx_merged = {}, self._fx_merged, []
            self._fx_merge_inactive -= set(names)
            for name in names:
                self.delete_adapter(name)
            return source
        self._fx_active, self._fx_merged = active, merged
        self._refold()
        self._rebuild()
        # cloned: a fold may return the original tensor itself (a bias that LoRA leaves as it is)
        memo = {id(original): nn.Parameter(value.detach().clone(), requires_grad=original.requires_grad) for original, value in folded.values()}
        return copy.deepcopy(source, memo)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` with this module's adapters, unmerged or merged, and a KV cache:
        the same arguments (``max_new_tokens``, ``do_sample``, ``num_beams``, ``generation_config``,
        streamers...) and results as the captured model's ``generate``. The model's decode step is
        captured once, as a second graph that reads the same adapter weights (see
        :mod:`fxadapt.generation`). The module must come from a model with a language-model head.
        Under a ``Parallel`` block the prompts run once per branch (AdapterHub's ``generate``): the
        result has one block of rows per branch, in order."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    def compile(self, *args, **kwargs) -> None:
        """``torch.nn.Module.compile`` (this module compiled in place, same arguments as
        ``torch.compile``); ``generate`` then runs its decode steps compiled with the same options,
        with dynamic sizes unless ``dynamic`` is given: each step graph compiles once, not per token."""
        super().compile(*args, **kwargs)
        self.__dict__["_fx_compile"] = (args, kwargs)
        self.__dict__.pop("_fx_step_modules", None)

    def eject_prefix_tuning(self, name: str) -> None:
        """Fold an adapter's prefix generator (Embedding + MLP) into the prefixes it makes, as
        AdapterHub's ``eject_prefix_tuning``: same outputs, fewer parameters, no MLP at run time."""
        generators = [self.get_submodule(path) for path in self._adapter(name).shared if hasattr(self.get_submodule(path), "eject")]
        if not generators:
            raise AdapterError(f"adapter {name!r} has no prefix tuning to eject")
        for g in generators:
            g.eject()
        self._rebuild()

    # -- gradient checkpointing ------------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Activation checkpointing, one region per transformer layer (transformers' name and
        arguments, so ``Trainer`` with ``activation_checkpointing=True`` turns it on).

        Each layer's nodes, its adapters included, run under ``torch.utils.checkpoint.checkpoint``
        (``use_reentrant=False``, ``preserve_rng_state=True``: recomputed in the backward pass with
        the same dropout masks), so a training step keeps each layer's input instead of all its
        activations. ``activation_checkpointing_kwargs`` go to ``checkpoint`` over those defaults;
        ``every_n_layers`` checkpoints layers 0, n, 2n, ...; ``offload`` holds what is saved in host
        memory (for a model on an accelerator; eager only). Stays on through adapter changes; eval
        mode and ``torch.no_grad()`` run without it. A bad argument raises ConfigError naming it and
        changes nothing. See :mod:`fxadapt.passes.checkpointing` for how layers are found.
        """
        options = checkpointing.settings(activation_checkpointing_kwargs, every_n_layers, offload)
        self._set_checkpointing(options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1,
                                      offload: bool = False) -> None:
        """:meth:`activation_checkpointing_enable` under its older transformers name (what ``Trainer``
        calls with ``gradient_checkpointing=True`` on models without the new one)."""
        self._set_checkpointing(checkpointing.settings(gradient_checkpointing_kwargs, every_n_layers, offload, "gradient_checkpointing_kwargs"))

    def activation_checkpointing_disable(self) -> None:
        """Turn :meth:`activation_checkpointing_enable` off: the plain graph again."""
        self._set_checkpointing(None)

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on (transformers' name; also ``is_gradient_checkpointing``)."""
        return self.__dict__.get(checkpointing.ENABLED_ATTR) is not None

    is_gradient_checkpointing = is_activation_checkpointing

    def _set_checkpointing(self, options) -> None:
        before = self.__dict__.get(checkpointing.ENABLED_ATTR)
        self.__dict__[checkpointing.ENABLED_ATTR] = options
        try:
            with self._atomic():
                self._rebuild()
        except BaseException:
            self.__dict__[checkpointing.ENABLED_ATTR] = before
            raise

    # -- routing and disabling (fxadapt.routing) -------------------------------------------------

    @torch._dynamo.disable(recursive=False)  # dynamo compiles the frames below, keyed by the regenerated forward's code
    def __call__(self, *args, **kwargs):
        # adapter_names (PEFT's per-sample routing) runs the routed graph instead (fxadapt.routing).
        if "adapter_names" in kwargs:
            from .routing import routed_call

            return routed_call(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    def adapter_indices(self, names: Iterable[str]) -> torch.Tensor:
        """The per-row index tensor of adapter names (``"__base__"`` for the base model), to pass as
        ``adapter_names``: under ``torch.compile`` a tensor routes without recompiling, where a list
        of names is a constant dynamo specialises on. Valid until an adapter is deleted."""
        from .routing import adapter_indices

        return adapter_indices(self, list(names) if not isinstance(names, str) else names)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager (PEFT's): inside, the module computes the base model, merged adapters
        included (their original weights are put in); on leaving, even by an exception, the adapters,
        the merged weights (the same tensors) and the graph are back. Nests."""
        saved = {k: copy.copy(self.__dict__[k]) for k in _BOOKKEEPING if k != "_fx_adapters"}
        merged = {path: self.get_parameter(path) for path in self._fx_originals}
        for path, original in self._fx_originals.items():
            _set_param(self, path, original)
        self._fx_originals, self._fx_active, self._fx_merged, self._fx_merge_inactive = {}, [], [], set()
        self.__dict__["_fx_setup"] = None
        self._rebuild()
        try:
            yield self
        finally:
            for path, value in merged.items():
                _set_param(self, path, value)
            self.__dict__.update(saved)
            self._fx_active = [n for n in self._fx_active if n in self._fx_adapters]  # an adapter deleted inside
            self._rebuild()

    # -- summary ---------------------------------------------------------------------------

    def adapter_summary(self, as_dict: bool = False) -> str | list[dict]:
        """AdapterHub's table: each adapter's architecture, #params, % of the base model, active, train."""
        base = sum(p.numel() for _, p in self._base_parameters())
        rows = []
        for name, adapter in self._fx_adapters.items():
            params = self._adapter_parameters(name)
            rows.append(SummaryRow(
                name=name,
                architecture=adapter.config.architecture,
                params=sum(p.numel() for p in params),
                active=name in self._fx_active,
                train=all(p.requires_grad for p in params),
            ))
        base_train = all(p.requires_grad for _, p in self._base_parameters())
        return format_summary(rows, base, base_train, as_dict=as_dict)

    # -- helpers ---------------------------------------------------------------------------

    def _adapter(self, name: str) -> _Adapter:
        if name not in self._fx_adapters:
            known = ", ".join(self._fx_adapters) or "none"
            raise AdapterError(f"{self._fx_model_name} has no adapter {name!r} (adapters: {known})")
        return self._fx_adapters[name]

    def _names(self, names) -> list[str]:
        if isinstance(names, Block):  # its children are not a list of names (a Stack of LoRAs is no sum of them)
            raise AdapterError(f"{names!r}: this call takes adapter names, not a composition block (set_active_adapters and "
                               "train_adapter take blocks; fxadapt.composition.to_lora folds a Stack / Average of LoRAs into one)")
        names = [] if names is None else [names] if isinstance(names, str) else list(names)
        for n in names:
            self._adapter(n)
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter names repeat: {names}")
        return names

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = {id(p): p for path in self._adapter(name).modules for p in self.get_submodule(path).parameters()}
        return list(params.values())

    def _check_composable(self, names: list[str], extra: dict[str, _Adapter] | None = None) -> None:
        """At most one active adapter of an exclusive method (bottleneck, invertible) per place."""
        adapters = {**self._fx_adapters, **(extra or {})}
        seen: dict[tuple[str, str], str] = {}
        for name in names:
            for p in adapters[name].placements:
                if not METHODS[p.method].exclusive:
                    continue
                for anchor in p.anchors:
                    other = seen.setdefault((p.method, anchor), name)
                    if other != name:
                        where = f"layer {p.block.layer} ({p.block.location})" if p.method == "bottleneck" else "the embedding output"
                        raise AdapterError(f"adapters {other!r} and {name!r} both put a {p.method} adapter at {where}; "
                                           "activate one of them at a time")

    def _base_parameters(self):
        adapter_ids = {id(p) for name in self._fx_adapters for p in self._adapter_parameters(name)}
        adapter_ids |= {id(p) for f in self._fx_fusions.values() for path in f.modules.values() for p in self.get_submodule(path).parameters()}
        return [(k, p) for k, p in self.named_parameters() if id(p) not in adapter_ids]

    def recompile(self):
        """Generate ``forward`` from ``self.graph`` as GraphModule does, from a copy in which each
        submodule is looked up once per call (:func:`~fxadapt.passes.fuse.hoist_attribute_paths`)."""
        graph = self._graph
        self._graph, origin = hoist_attribute_paths(graph)
        try:
            code = super().recompile()
        finally:
            lean, self._graph = self._graph, graph
        spec = self.__dict__.get("_fx_inputs")
        if spec is not None:  # what torch.export binds a call's kwargs to (the generated forward takes the graph's inputs only)
            type(self).forward.__signature__ = spec.forward_signature()
        # Line -> node index, as torch.compile reads it against self.graph to keep node metadata.
        index = {node: i for i, node in enumerate(graph.nodes)}
        lean_nodes = list(lean.nodes)
        self._lineno_map = {line: None if i is None else index.get(origin.get(lean_nodes[i]))
                            for line, i in (self._lineno_map or {}).items()}
        return code

    def _apply(self, fn, recurse=True):
        """What ``.to()``, ``.cuda()``, ``.half()``... do, also to the graph's constant tensors and the
        originals of merged weights; after a move to one device, the graph's ops create tensors there."""
        if "_fx_base" not in self.__dict__:  # still being constructed
            return super()._apply(fn, recurse)
        device_before, dtype_before = _single_device(self), _float_dtype(self)
        super()._apply(fn, recurse)
        with torch.no_grad():
            for node in self._fx_base.nodes:
                if node.op == "get_attr":
                    owner, leaf = _owner(self, node.target)
                    value = owner.__dict__.get(leaf)
                    if isinstance(value, torch.Tensor):  # a constant: neither parameter nor buffer
                        setattr(owner, leaf, fn(value))
            for path, original in self._fx_originals.items():
                applied = fn(original)
                try:
                    original.data = applied  # the same object, as Module._apply keeps parameters
                except RuntimeError:  # another kind of tensor (e.g. meta): a new parameter, as Module._apply makes
                    self._fx_originals[path] = nn.Parameter(applied, original.requires_grad)
        dtype = _float_dtype(self)
        if dtype not in (dtype_before, self._fx_capture_dtype, None):
            warnings.warn(
                f"fxadapt: {self._fx_model_name} was captured in {self._fx_capture_dtype} and its weights are now {dtype}; "
                f"the graph's ops keep the dtypes they were captured with (masks, casts), which may not fit. "
                f"Capture the model in {dtype} to run it in {dtype}", stacklevel=3)
        device = _single_device(self)
        if device is not None and device != device_before:
            if getattr(self, "_fx_example", None) is not None:
                self._fx_example = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), self._fx_example)
            self._rebuild()
        return self

    def __reduce__(self):
        raise InputError(
            "an AdaptedModule cannot be pickled (torch.save of the module): save the adapter with "
            "gm.save_adapter(dir, name), the whole model with gm.merge_and_unload().save_pretrained(dir), "
            "or a deployable program with fxadapt.export(gm, path)"
        )

    def __deepcopy__(self, memo):
        res = type(self).__new__(type(self))
        memo[id(self)] = res
        res.__dict__.update(copy.deepcopy(self.__dict__, memo))
        res.recompile()
        return res


def _attach_gating_scores(module: AdaptedModule, args: tuple, output):
    """Forward hook: ``output.adapter_gating_scores`` after a call that asked for them."""
    return attach_recorded(module, output, module._fx_gates, "adapter_gating_scores", module._fx_gates.scores)


def _prepare_call(module: AdaptedModule, args: tuple, kwargs: dict):
    """Forward pre-hook: bind a call with the model's signature to the graph's inputs (InputError for
    inputs the graph cannot take); turn on the gate recorder for ``output_adapter_gating_scores=True``."""
    module._fx_gates.values.clear()
    module._fx_gates.active = bool(kwargs.pop("output_adapter_gating_scores", False))
    setup = module._composition()
    if setup is not None:  # BatchSplit / Split sizes against the batch and length of this call
        main = kwargs.get(module._fx_inputs.main) if module._fx_inputs is not None and module._fx_inputs.main else None
        main = main if isinstance(main, torch.Tensor) else next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        if main is not None and main.ndim > 0:
            check_call(setup, main.shape[0], main.shape[1] if main.ndim > 1 else None, module._fx_model_name)
    spec = module._fx_inputs
    if spec is None:
        return args, kwargs
    if not args and len(kwargs) == len(spec.names) and all(n in kwargs for n in spec.names):
        if torch.compiler.is_compiling():
            return None
    return (), spec.bind(module._fx_model_name, args, kwargs)


def _single_device(module: nn.Module) -> torch.device | None:
    """The one device all of ``module``'s parameters and buffers are on; None for none or several."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    return devices.pop() if len(devices) == 1 else None


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    """The one floating dtype of ``module``'s parameters; None for none or several."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _adapter_dtype(config: AdapterConfig, like: torch.Tensor, autocast: bool) -> AdapterConfig:
    """The config to build with: LoRA / (IA)^3 weights in float32 on a float16 / bfloat16 model
    (PEFT's ``autocast_adapter_dtype``), unless the config names its own ``dtype``."""
    if autocast and isinstance(config, LoRAConfig) and config.dtype is None and like.dtype in (torch.float16, torch.bfloat16):
        return config.replace(dtype="float32")
    return config


def _size_field(config: AdapterConfig, placement: Placement | None, weights: nn.Module) -> str:
    """The config field that sets the size of these weights (named when they do not fit)."""
    if hasattr(config, "rank_for"):  # LoRA, (IA)^3, LoHa, LoKr: a rank per module
        site = placement.site if placement is not None else None
        return "rank_pattern" if site is not None and config.rank_for(site.path) != config.r else "r"
    if isinstance(config, PrefixTuningConfig):
        wte = getattr(weights, "wte", None)
        if wte is None or wte.weight.numel() >= sum(t.numel() for t in weights.control_trans.parameters()):
            return "prefix_length"
        return "bottleneck_size"
    if isinstance(config, BnConfig):
        if placement is None:
            return "phm_dim"  # the PHM weights an adapter shares across layers
        return "inv_adapter_reduction_factor" if placement.method == "invertible" else "reduction_factor"
    for field in ("prompt_length", "r"):  # prompt tuning; ReFT
        if hasattr(config, field):
            return field
    return "configs"


def _size_error(model_name: str, name: str, sizes: list[tuple[int, _Job, nn.Module]], what: str) -> ConfigError:
    """ConfigError naming the field that sets the size of the adapter's largest weights and the bytes all need."""
    total = sum(size for size, _, _ in sizes)
    _, job, weights = max(sizes, key=lambda item: item[0])
    field = _size_field(job.config, job.placement, weights)
    value = getattr(job.config, field, None)
    return ConfigError(f"adapter {name!r}: {type(job.config).__name__}.{field}={value!r} makes weights of {_bytes(total)} ({total} bytes) "
                       f"on {model_name}; {what}. Lower {field}", field=field, value=value)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory; for the CPU the kernel's
    MemAvailable, capped by a cgroup's limit; None where it cannot be told (meta, other devices)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0]
    if device.type != "cpu":
        return None
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                text = a.read().strip()
                if text != "max":
                    free.append(int(text) - int(b.read().strip()))
        except (OSError, ValueError):
            pass
    if not free:
        try:
            free.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not on this system (macOS)
            return None
    return max(0, min(free))


def retarget_devices(graph: torch.fx.Graph, old: torch.device, new: torch.device) -> None:
    """Point every device argument of ``graph``'s nodes that names ``old`` at ``new``."""

    def retarget(value):
        if isinstance(value, torch.device) and value.type == old.type and (value.index == old.index or None in (value.index, old.index)):
            return new
        return value

    for node in graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, retarget)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, retarget)


# -- attribute plumbing -----------------------------------------------------------------------


def _owner(root: nn.Module, path: str, create: bool = False) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            if not create:
                raise AttributeError(path)
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module, leaf


def _set_param(root: nn.Module, path: str, value: nn.Parameter) -> None:
    owner, leaf = _owner(root, path)
    setattr(owner, leaf, value)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register ``module`` at a dotted path, creating ModuleDict containers on the way."""
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.ModuleDict().train(root.training))
        owner = getattr(owner, part)
    owner.add_module(leaf, module)


def _delete_module(root: nn.Module, path: str) -> None:
    """Remove the module at ``path`` and the ModuleDict containers this leaves empty."""
    owner, leaf = _owner(root, path)
    delattr(owner, leaf)
    parts = path.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        container = root.get_submodule(".".join(parts[:depth]))
        if not (isinstance(container, nn.ModuleDict) and len(container) == 0):
            break
        owner, leaf = _owner(root, ".".join(parts[:depth]))
        delattr(owner, leaf)


def _copy_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` every parameter and buffer of ``src`` the graph does not read, and keep
    constants that GraphModule turned into buffers as plain attributes (as torch.export has them)."""
    for kind, items in (("param", src.named_parameters(remove_duplicate=False)), ("buffer", src.named_buffers(remove_duplicate=False))):
        for path, value in items:
            owner, leaf = _owner(dst, path, create=True)
            if kind == "param" and leaf not in owner._parameters:
                owner.register_parameter(leaf, value)
            elif kind == "buffer" and leaf not in owner._buffers:
                src_owner, _ = _owner(src, path)
                owner.register_buffer(leaf, value, persistent=leaf not in src_owner._non_persistent_buffers_set)
    src_buffers = {p for p, _ in src.named_buffers(remove_duplicate=False)}
    for path, value in list(dst.named_buffers(remove_duplicate=False)):
        if path not in src_buffers:
            owner, leaf = _owner(dst, path)
            del owner._buffers[leaf]
            setattr(owner, leaf, value)
