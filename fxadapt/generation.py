"""Generation with a KV cache: the decode steps of an LM as more graphs of an AdaptedModule.

The module's main graph is one forward without a cache. :func:`generate` captures the model's
*steps* once: forwards that take the keys and values of earlier positions and return the logits with
the keys and values grown by the new positions (transformers' ``DynamicCache``, flattened to
tensors). A decoder-only model gets two: a prompt step (two or more new positions) and a token step
(one), since transformers' attention branches on a query of length 1; an encoder-decoder gets a first
decoder step and a token step, and its encoder runs in the main graph. Each active adapter is
planned again on the step graphs' anatomy, by the same dataflow rules, and takes the forward's
placement at each place it finds (:func:`_matched`): the same weights act in every graph (keys and
values reach attention through the cache update here).

A decoder-only model's cache starts with one masked slot (keys and values of zeros that no query
attends to), so the past length is never 0 and torch.export keeps it dynamic. The slot changes no
output: a masked key has weight exactly 0 in the softmax, and positions come from the mask.

Adapters act at each position alone (``Method.positionwise``), so a step computes what the whole
forward computes at its positions, with one exception by design: UniPELT's gates average over the
positions a call sees. The full forward re-gates every earlier position whenever the sequence grows,
which no cache can do; with the cache each step's gates average over its new positions, as
AdapterHub's generation computes them. Prompt tuning and ReFT add or pick positions and are refused.

transformers' ``generate`` drives the loop (sampling, beams, stopping criteria, streamers, generation
configs): it runs on a shallow copy of the captured model whose ``forward`` calls the step graphs.

``generate(..., adapter_names=[...])`` routes each row through its own adapter, as PEFT's: the step
graphs are built in routed form (:func:`routed_step_modules`: :func:`fxadapt.routing.build_graph` on
each step graph, with every routable adapter's placements there), reading the per-row index as one
more input. When ``generate`` expands the batch (``num_beams``, ``num_return_sequences``), the index
is repeated with it, row by row; an encoder-decoder's encoder runs the routed forward on the rows
as given.

A composition block acts in the steps as in the forward; a ``Split``, which divides the positions of
each call, is refused (a step sees only the new positions). Under a ``Parallel`` the prompts are
repeated once per branch before the loop, as AdapterHub's ``generate`` does, and the steps do not
repeat them again: branch ``i`` generates rows ``i*B`` to ``(i+1)*B``, and the beams of a row stay
in its branch's block of rows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.fx.graph import CodeGen

from .errors import CaptureError, InputError
from .methods import METHODS
from .ops import copy_graph, op_name
from .passes.fuse import hoist_attribute_paths
from .plan import annotate, plan
from .sites import Anatomy, anatomy

__all__ = ["generate", "step_modules", "routed_step_modules", "capture_step", "StepCapture"]


@dataclass
class StepGraph:
    """One captured step: its graph without adapters and its anatomy."""

    graph: GraphModule
    anatomy: Anatomy


@dataclass
class StepCapture:
    """The captured steps of a model: ``prompt`` (two or more new positions) and ``token`` (one),
    the shape of each layer's cached keys and values, ``(heads, head_dim)``, and their dtype.
    Two graphs, because transformers' attention branches on a query of length 1."""

    prompt: StepGraph
    token: StepGraph
    layers: list[tuple[int, int]]
    dtype: torch.dtype
    cache_arg: str
    encoder_decoder: bool = False
    encoder_length: int | None = None  # an encoder-decoder whose encoder states have one length only (Whisper)


class _Step(nn.Module):
    """``model``'s forward with a cache given as tensors: ``(input_ids, attention_mask, keys,
    values) -> (logits, keys, values)``, the logits of the last position only where the model can
    (``logits_to_keep``), with position ids from the mask (left padding) as
    transformers' ``generate`` makes them. Registers the model's own children, so the parameters
    keep their names (``model.layers.0.self_attn.q_proj.weight``)."""

    def __init__(self, model: nn.Module, cache_arg: str):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.__dict__["_model"] = model
        self.cache_arg = cache_arg
        params = inspect.signature(model.forward).parameters
        self.takes_positions = "position_ids" in params
        self.last_only = "logits_to_keep" in params  # generate reads the last position's logits only
        self.train(model.training)  # the capture puts back this mode, on the model's modules too

    def forward(self, input_ids, attention_mask, keys, values):
        from transformers import DynamicCache

        cache = DynamicCache()
        _store(cache, keys, values)  # the tensors themselves: DynamicCache(ddp_cache_data) would copy them once more
        kwargs = {}
        if self.takes_positions:
            positions = attention_mask.long().cumsum(-1) - 1
            total = attention_mask.shape[1]
            # The last columns by index, not by a slice (whose runtime check torch.compile cannot trace).
            new = torch.arange(total - input_ids.shape[1], total, device=attention_mask.device)
            kwargs["position_ids"] = positions.masked_fill(attention_mask == 0, 1).index_select(1, new)
        if self.last_only:  # as an index: a slice would make torch.export guard on the batch size
            seq = input_ids.shape[1]
            kwargs["logits_to_keep"] = torch.arange(seq - 1, seq, device=input_ids.device)
        out = self._model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{self.cache_arg: cache}, **kwargs)
        return out.logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def _cache_arg(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def capture_step(model: nn.Module, model_name: str) -> StepCapture:
    """Capture the decode step of a decoder-only transformers LM (see the module's docstring)."""
    from transformers import DynamicCache

    first = next(model.parameters())
    cache_arg = _cache_arg(model)
    probe = DynamicCache()
    ids = torch.zeros(1, 2, dtype=torch.long, device=first.device)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            model(input_ids=ids, use_cache=True, **{cache_arg: probe})
        finally:
            model.train(was_training)
    layers = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in probe.layers]
    dtype = probe.layers[0].keys.dtype
    steps = [_capture(model, model_name, cache_arg, layers, dtype, seq) for seq in (3, 1)]
    return StepCapture(*steps, layers, dtype, cache_arg)


def _capture(model: nn.Module, model_name: str, cache_arg: str, layers: list, dtype: torch.dtype, seq: int) -> StepGraph:
    """The step graph for ``seq`` new positions: any number from 2 when ``seq`` > 1, else one."""
    from .capture import trace

    device = next(model.parameters()).device
    batch, past = 2, 4
    keys = [torch.zeros(batch, h, past, d, dtype=dtype, device=device) for h, d in layers]
    mask = torch.ones(batch, past + seq, dtype=torch.long, device=device)
    mask[:, 0] = 0
    # A batch or past length of 1 is as any other: torch.export must not specialise on it (size-oblivious).
    dim = torch.export.Dim
    b, p = dim("batch", min=1), dim("past", min=1)
    dynamic = {"input_ids": {0: b, 1: dim("seq", min=2)} if seq > 1 else {0: b},
               "attention_mask": {0: b, 1: dim("total", min=3) if seq > 1 else p + 1},
               "keys": [{0: b, 2: p}] * len(layers), "values": [{0: b, 2: p}] * len(layers)}
    example = (torch.randint(0, 2, (batch, seq), device=device), mask, keys, [k.clone() for k in keys])
    try:
        with _size_oblivious():
            captured = trace(_Step(model, cache_arg), example, dynamic_shapes=dynamic)
    except CaptureError as e:
        raise CaptureError(f"{model_name}: its decode step with a KV cache could not be captured for generate(): {e}") from e
    return StepGraph(captured.graph, anatomy(captured.graph, model_name))


class _Seq2SeqStep(nn.Module):
    """An encoder-decoder's decoder step: ``(decoder_input_ids, encoder_hidden_states,
    attention_mask[, keys, values]) -> (logits, keys, values, cross_keys, cross_values)``, the
    self-attention cache as tensors (none on the first step). Cross-attention reads the encoder's
    states each step (its keys and values are not read from the cache), so adapters on
    cross-attention act as in the full forward; the step returns those keys and values too, so that
    the cache ``generate`` returns is complete, as the model's own."""

    def __init__(self, model: nn.Module, cache_arg: str):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.__dict__["_model"] = model
        self.cache_arg = cache_arg
        self.train(model.training)

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, keys=None, values=None):
        from transformers import DynamicCache, EncoderDecoderCache

        own = DynamicCache()
        if keys is not None:
            _store(own, keys, values)
        cross = DynamicCache()
        out = self._model(encoder_outputs=(encoder_hidden_states,), attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          use_cache=True, **{self.cache_arg: EncoderDecoderCache(own, cross)})
        return (out.logits, [layer.keys for layer in own.layers], [layer.values for layer in own.layers],
                [layer.keys for layer in cross.layers], [layer.values for layer in cross.layers])


def capture_seq2seq_step(model: nn.Module, model_name: str, example: dict) -> StepCapture:
    """Capture the decoder steps of an encoder-decoder (the first, without a past; then one token
    with a past of any length); ``example`` holds the encoder's inputs as the capture had them."""
    from .capture import trace

    cache_arg = _cache_arg(model)
    device = next(model.parameters()).device
    main = model.main_input_name
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            states = model.get_encoder()(**{main: example[main][:2]}).last_hidden_state
            step = _Seq2SeqStep(model, cache_arg)
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=device)
            _, keys, *_ = step(torch.zeros(states.shape[0], 1, dtype=torch.long, device=device), states, mask)
        finally:
            model.train(was_training)
    layers = [(k.shape[1], k.shape[3]) for k in keys]
    dtype = keys[0].dtype
    dim = torch.export.Dim
    # The encoder's length is dynamic where the model allows (AUTO: Whisper's is fixed by its positions).
    b, s, p = dim("batch", min=1), dim.AUTO, dim("past", min=1)
    graphs = []
    for first in (True, False):
        ids = torch.zeros(states.shape[0], 1, dtype=torch.long, device=device)
        dynamic = {"decoder_input_ids": {0: b}, "encoder_hidden_states": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
        inputs = (ids, states, mask)
        if not first:
            past = [torch.zeros(states.shape[0], h, 3, d, dtype=dtype, device=device) for h, d in layers]
            inputs += (past, [t.clone() for t in past])
            dynamic.update(keys=[{0: b, 2: p}] * len(layers), values=[{0: b, 2: p}] * len(layers))
        try:
            with _size_oblivious():
                captured = trace(_Seq2SeqStep(model, cache_arg), inputs, dynamic_shapes=dynamic)
        except CaptureError as e:
            raise CaptureError(f"{model_name}: its decoder step with a KV cache could not be captured for generate(): {e}") from e
        graphs.append(StepGraph(captured.graph, anatomy(captured.graph, model_name)))
    states_in = next(n for n in graphs[1].graph.graph.nodes if n.op == "placeholder" and n.name == "encoder_hidden_states")
    length = states_in.meta["val"].shape[1]
    return StepCapture(*graphs, layers, dtype, cache_arg, encoder_decoder=True, encoder_length=length if isinstance(length, int) else None)


def _size_oblivious():
    """torch.export treats sizes of 1 as any other (torch >= 2.7; a no-op before)."""
    import torch.fx.experimental._config as fx_config

    if hasattr(fx_config, "backed_size_oblivious"):
        return fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def step_modules(gm) -> tuple[nn.Module, nn.Module]:
    """The prompt and token step graphs of ``gm`` with its active, unmerged adapters, as
    GraphModules that read ``gm``'s own weights, in ``gm``'s mode; compiled with the options of
    ``gm.compile(...)`` when it was called. Rebuilt when ``gm``'s graph changed since."""
    step = _step_capture(gm)
    built = gm.__dict__.get("_fx_step_modules")
    if built is None or built[0] is not gm._graph:
        options = gm.__dict__.get("_fx_compile")
        built = (gm._graph, *(_callable(gm, graph_of, _with_adapters(gm, graph_of), options) for graph_of in (step.prompt, step.token)))
        gm.__dict__["_fx_step_modules"] = built
    for module in built[1:]:
        module.train(gm.training)
    return built[1], built[2]


def _callable(gm, step: StepGraph, graph: Graph, options: tuple | None) -> nn.Module:
    """``graph`` (a form of ``step``'s) without torch.export's input checks, as a module on ``gm``'s
    weights (:func:`_module`), compiled when ``gm.compile(...)`` gave ``options``."""
    _drop_checks(graph)
    module = _module(gm, step, graph, lean=options is None)
    if options is None:
        return module
    args, kwargs = options
    # Dynamic sizes from the first call: the past grows by one every token.
    return torch.compile(module, *args, **{"dynamic": True, **kwargs})


def _with_adapters(gm, step: StepGraph) -> Graph:
    """``step``'s graph with ``gm``'s active, unmerged adapters planned on it by the same rules."""
    from .module import _single_device, retarget_devices
    from .passes.insert import OPTIMIZATIONS, insert_adapters

    graph: Graph = copy_graph(step.graph.graph)
    placements = []
    for name in gm._fx_active:
        if name not in gm._fx_merged:
            placements += _step_placements(gm, name, step)
    from .composition import Split

    setup = gm._composition()
    if setup is not None and setup.contains(Split):
        raise InputError(f"generate() cannot run {setup!r}: Split divides the positions of each call, and a step with a KV cache "
                         "sees only the new ones; activate its branches one at a time")
    annotate(graph, placements)
    insert_adapters(gm, graph, setup, replicated=True)  # generate repeats a Parallel's prompts itself
    for optimize in OPTIMIZATIONS:
        optimize(gm, graph)
    device = _single_device(gm)
    if None not in (device, gm._fx_capture_device) and device != gm._fx_capture_device:
        retarget_devices(graph, gm._fx_capture_device, device)
    graph.lint()
    return graph


def _step_placements(gm, name: str, step: StepGraph) -> list:
    """Adapter ``name``'s placements on ``step``'s graph (see :func:`_matched`); InputError for a
    method a step over the new positions cannot run."""
    for p in gm._fx_adapters[name].placements:
        if not METHODS[p.method].positionwise:
            raise InputError(f"generate() cannot run adapter {name!r} ({p.method}) with a KV cache: it adds positions or picks them "
                             "by index, so a step over the new positions is not the whole forward; deactivate it, or call "
                             "the module on the whole sequence each step")
    return _matched(gm, name, plan(name, gm._fx_adapters[name].config, step.anatomy))


def _module(gm, step: StepGraph, graph: Graph, lean: bool) -> GraphModule:
    """``graph`` (a form of ``step``'s) as a GraphModule that reads ``gm``'s weights, in ``gm``'s mode,
    called as ``module(inputs)`` with the list of its flat inputs, which it empties
    (:func:`_take_inputs`), and returning its flat outputs. ``module.step_graph`` is ``graph``, as
    captured (its inputs and outputs nested: what serving exports)."""
    # gm's parameters and buffers (merged weights included) and adapters; the step's own constants.
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    owners = {node.target: tensors[node.target] if node.target in tensors else _lookup(node.target, step.graph, gm)
              for node in graph.nodes if node.op in ("get_attr", "call_module")}
    taking = copy_graph(graph)
    _take_inputs(taking)
    module = GraphModule(owners, taking, "DecodeStep")
    if lean:  # code that looks each submodule up once per call, as AdaptedModule's (not for dynamo, which reads the graph)
        module._graph = hoist_attribute_paths(taking)[0]
        module.recompile()
        module._graph = taking
    module.step_graph = graph
    module.train(gm.training)
    return module


def _take_inputs(graph: Graph) -> None:
    """Make ``graph`` one input, the list of its inputs, which it empties first (:func:`_take`),
    and a flat tuple of outputs (no pytree packing on each token)."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(inputs[0]):
        holder = graph.placeholder("inputs")
    with graph.inserting_after(inputs[-1]):
        taken = graph.call_function(_take, (holder,))
    last = taken
    for i, node in enumerate(inputs):
        with graph.inserting_after(last):
            last = graph.call_function(operator.getitem, (taken, i))
        node.replace_all_uses_with(last)
        last.name = node.name
        graph.erase_node(node)
    graph._codegen = CodeGen()


def _take(inputs: list) -> tuple:
    """A step's inputs, taken out of the list its caller passed: the step then holds the only
    references, so each layer's past keys and values are freed as soon as the layer has grown them,
    as transformers' own cache update frees them, not after the whole step (fresh allocations are
    slower, and the cache would be held twice)."""
    taken = tuple(inputs)
    inputs.clear()
    return taken


def routed_step_modules(gm) -> tuple[nn.Module, nn.Module]:
    """The prompt and token steps (an encoder-decoder's first and token steps) with every routable
    adapter of ``gm`` gathered per row (:func:`fxadapt.routing.build_graph` on each step graph, with
    the adapters' placements there), called as the plain steps are with the per-row index as the
    last input. Cached until the routable adapters, the device or the compile options change."""
    from .routing import build_graph, routable, routing_key

    step = _step_capture(gm)
    options = gm.__dict__.get("_fx_compile")
    key = (routing_key(gm), options)
    built = gm.__dict__.get("_fx_routed_steps")
    if built is None or built[0] != key:
        names = routable(gm)
        graphs = [(graph_of, build_graph(gm, names, graph_of.graph.graph, {name: _step_placements(gm, name, graph_of) for name in names}))
                  for graph_of in (step.prompt, step.token)]
        built = (key, *(_callable(gm, graph_of, graph, options) for graph_of, graph in graphs))
        gm.__dict__["_fx_routed_steps"] = built
    for module in built[1:]:
        module.train(gm.training)
    return built[1], built[2]


def _expand(index: torch.Tensor, batch: int) -> torch.Tensor:
    """The per-row index for a batch that ``generate`` expanded (beams, ``num_return_sequences``):
    each row's index repeated as transformers repeats the row (``repeat_interleave``)."""
    rows = index.shape[0]
    if rows == batch:
        return index
    if batch % rows:
        raise InputError(f"adapter_names has {rows} entries, and generate() runs a batch of {batch} rows, no multiple of them")
    return index.repeat_interleave(batch // rows)


def _drop_checks(graph: Graph) -> None:
    """Remove what torch.export adds to check a call's inputs (the guards of the captured sizes, each
    tensor's metadata): the steps are called by ``generate`` only, with inputs it makes, and the checks
    cost a token step about a tenth of its time on a small model."""
    for node in reversed(list(graph.nodes)):
        if not node.users and ((node.op == "call_module" and node.target == "_guards_fn") or op_name(node).startswith("_assert")):
            graph.erase_node(node)


def _place(p) -> tuple:
    """Where a placement acts, in terms both graphs share: method, weights, module path, side."""
    return p.method, p.module, getattr(p.where, "path", None) or p.where.weight, p.side  # an Attention: its query's weight


def _matched(gm, name: str, mine: list) -> list:
    """The forward's placements of adapter ``name`` at the places the step's plan found (``mine``), on
    the step graph's nodes: what the forward numbers by its own layers (a shared prefix generator's
    slot, per-layer settings) stays as the forward has it. InputError when the places differ, apart
    from an encoder-decoder's encoder, which the steps do not run."""
    theirs = {_place(p): p for p in gm._fx_adapters[name].placements}
    encoder = _encoder_prefix(gm)
    wanted = {key for key in theirs if encoder is None or not key[2].startswith(encoder)}  # key[2]: the module path
    found = {_place(p) for p in mine}
    if found != wanted:
        raise InputError(f"adapter {name!r}: the decode step of {gm._fx_model_name} has other adapter places than its forward "
                         f"({len(found)} and {len(wanted)}), so generate() cannot run it with a KV cache")
    return [dataclasses.replace(theirs[_place(p)], where=p.where, anchor=p.anchor) for p in mine]


def _encoder_prefix(gm) -> str | None:
    """``"<encoder path>."`` of an encoder-decoder (the steps do not run its encoder), else None."""
    source = gm.__dict__["_fx_source"]
    if not getattr(source.config, "is_encoder_decoder", False):
        return None
    encoder = source.get_encoder()
    path = next((path for path, m in source.named_modules() if m is encoder), None)
    return None if path is None else path + "."


def _lookup(target: str, *roots: nn.Module):
    """The object at dotted path ``target`` on the first of ``roots`` that has it."""
    for root in roots:
        obj = root
        try:
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AttributeError(target)


def _step_capture(gm) -> StepCapture:
    step = gm.__dict__.get("_fx_step")
    if step is None:
        source = gm.__dict__.get("_fx_source")
        if source is None or not callable(getattr(source, "generate", None)) or not _can_generate(source):
            name = gm._fx_model_name
            raise InputError(f"generate() needs a model with a language-model head; {name} has none: capture a *ForCausalLM or "
                             f"*LMHeadModel model (e.g. {name.replace('Model', 'ForCausalLM') if name.endswith('Model') else 'LlamaForCausalLM'})")
        if getattr(source.config, "is_encoder_decoder", False):
            example = gm._fx_example[1] if gm._fx_example is not None else {}
            if source.main_input_name not in example:
                raise InputError(f"generate() on {gm._fx_model_name}: capture it with example inputs that name {source.main_input_name!r}")
            step = capture_seq2seq_step(source, gm._fx_model_name, example)
        else:
            step = capture_step(source, gm._fx_model_name)
        gm.__dict__["_fx_step"] = step
    return step


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def generate(gm, *args, **kwargs):
    """transformers' ``generate`` on ``gm``'s model, with ``gm``'s adapters and a KV cache (see the
    module docstring). Takes what the model's ``generate`` takes; returns what it returns.
    ``adapter_names`` (one name per row, ``"__base__"`` for the base model, or their index tensor)
    runs each row, its beams and its returned sequences through its own adapter, as PEFT's."""
    names = kwargs.pop("adapter_names", None)
    index = None if names is None else _routing_index(gm, args, kwargs, names)
    source = gm.__dict__.get("_fx_source")
    modules = step_modules(gm) if index is None else routed_step_modules(gm)
    step = gm.__dict__["_fx_step"]
    setup = gm._composition() if index is None else None
    channels = setup.parallel_channels if setup is not None else 1
    if channels > 1:  # a Parallel: the prompts once per branch, as AdapterHub's generate (branch i: rows i*B to (i+1)*B)
        args, kwargs = _replicate(source, args, kwargs, channels)
    check = _rows_check(gm, setup, channels)
    runner = copy.copy(source)  # shares the model's modules and config; only ``forward`` differs
    if step.encoder_decoder:
        runner.forward = _Seq2SeqForward(*modules, step, index, check)
        encoder = _Encoder(gm, source, index, channels)  # the encoder runs before generate expands the batch
        runner.get_encoder = lambda *args, **kwargs: encoder
    else:
        runner.forward = _StepForward(*modules, step, index, check)
    if kwargs.get("past_key_values") is not None or kwargs.get(step.cache_arg) is not None:
        raise InputError("generate() on an AdaptedModule keeps its own KV cache: leave out past_key_values")
    from transformers import DynamicCache, EncoderDecoderCache

    _check_length(gm, source, args, kwargs)
    kwargs[step.cache_arg] = EncoderDecoderCache(DynamicCache(), DynamicCache()) if step.encoder_decoder else DynamicCache()
    with torch.no_grad():
        return type(source).generate(runner, *args, **kwargs)


def _replicate(source: nn.Module, args: tuple, kwargs: dict, channels: int) -> tuple[tuple, dict]:
    """``generate``'s arguments with the prompt's batch repeated ``channels`` times: the main input
    and every tensor keyword argument with as many rows (attention mask, encoder inputs, ...)."""
    main = _prompt(source, args, kwargs)
    if not isinstance(main, torch.Tensor) or main.ndim == 0:
        raise InputError("generate() with a Parallel block needs the prompt as a tensor (input_ids or the model's main input)")
    batch = main.shape[0]

    def repeat(t):
        return t.repeat(channels, *[1] * (t.ndim - 1)) if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == batch else t

    return tuple(repeat(a) for a in args[:1]) + args[1:], {k: repeat(v) for k, v in kwargs.items()}


def _rows_check(gm, setup, channels: int):
    """For a block with a BatchSplit: a check of the rows each step gets against its ``batch_sizes``
    (an InputError before the step runs); None otherwise."""
    from .composition import BatchSplit, check_call

    if setup is None or not setup.contains(BatchSplit):
        return None

    def check(rows: int) -> None:
        try:
            check_call(setup, rows // channels, None, gm._fx_model_name)
        except InputError as error:
            raise InputError(f"generate(): {error} (num_beams and num_return_sequences repeat each prompt's rows; "
                             "adapter_names routes each row with its beams)") from None

    return check


def _routing_index(gm, args: tuple, kwargs: dict, names) -> torch.Tensor:
    """The per-row index of ``adapter_names`` for the prompt's batch (see :mod:`fxadapt.routing`);
    InputError for bad names, a length other than the batch's, or merged adapters."""
    from .routing import _index

    if gm._fx_merged:
        raise InputError(f"generate(adapter_names=...) cannot be used while adapters {gm._fx_merged} are merged into the weights: "
                         "reset_adapter() them first")
    _step_capture(gm)  # InputError for a model without a language-model head, before the names
    inputs = _prompt(gm.__dict__["_fx_source"], args, kwargs)
    batch = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.ndim else None
    return _index(gm, names, batch)


def _prompt(source: nn.Module, args: tuple, kwargs: dict):
    """The prompt ``generate`` was given: its first argument, or the keyword that names it."""
    if args:
        return args[0]
    for key in ("inputs", source.main_input_name, "input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def _check_length(gm, source: nn.Module, args: tuple, kwargs: dict) -> None:
    """InputError for a prompt longer than the model has positions (``max_position_embeddings``)."""
    ids = args[0] if args else kwargs.get("input_ids")
    limit = getattr(source.config.get_text_config(), "max_position_embeddings", None)
    if isinstance(ids, torch.Tensor) and ids.ndim == 2 and isinstance(limit, int) and ids.shape[1] > limit:
        raise InputError(f"generate(): the prompt has {ids.shape[1]} positions; {gm._fx_model_name} has {limit} "
                         "(max_position_embeddings), which bounds the prompt and its KV cache")


class _StepForward:
    """The ``forward`` transformers' ``generate`` calls: one run of a step graph (``prompt`` for two
    or more new positions, ``token`` for one), the cache's layers set to the keys and values it
    returns. Signature as a causal LM's, so that ``generate`` passes the inputs it passes a model."""

    def __init__(self, prompt, token, step: StepCapture, index: torch.Tensor | None = None, check=None):
        self.prompt, self.token, self.step, self.index, self.check = prompt, token, step, index, check
        self.compiled = not isinstance(token, GraphModule)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                 cache_position=None, use_cache=True, return_dict=True, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = cache if cache is not None else past_key_values  # transformers' name from 5.24 on, and before
        batch, seq = input_ids.shape
        if self.check is not None:
            self.check(batch)
        device = input_ids.device
        past = cache.get_seq_length()  # the masked slot included, once there is a past
        if attention_mask is None:
            attention_mask = torch.ones(batch, max(past - 1, 0) + seq, dtype=torch.long, device=device)
        if past == 0:
            keys = [torch.zeros(batch, h, 1, d, dtype=self.step.dtype, device=device) for h, d in self.step.layers]
            values = [k.clone() for k in keys]
        else:
            keys, values = _release(cache)
        slot = torch.zeros(batch, 1, dtype=attention_mask.dtype, device=device)
        if self.compiled:
            for t in (*keys, *values):
                torch._dynamo.maybe_mark_dynamic(t, 2)  # the past grows every token: one graph for all
        inputs = [input_ids, torch.cat([slot, attention_mask], dim=1), *keys, *values]
        del keys, values  # the step takes the only references
        if self.index is not None:
            inputs.append(_expand(self.index, batch))  # a routed step's last input
        out = (self.token if seq == 1 else self.prompt)(inputs)
        n = len(self.step.layers)
        _store(cache, out[1:n + 1], out[n + 1:])
        logits = out[0]
        field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(logits=logits, **{field: cache})


class _Seq2SeqForward:
    """The ``forward`` of an encoder-decoder's ``generate``: the first decoder step, then one token
    at a time, the self-attention cache's layers set to the keys and values the step returns."""

    def __init__(self, first, token, step: StepCapture, index: torch.Tensor | None = None, check=None):
        self.first, self.token, self.step, self.index, self.check = first, token, step, index, check
        self.compiled = not isinstance(token, GraphModule)

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None, cache=None,
                 past_key_values=None, use_cache=True, return_dict=True, **kwargs):
        from transformers.modeling_outputs import Seq2SeqLMOutput

        cache = cache if cache is not None else past_key_values
        states = encoder_outputs[0]
        if self.check is not None:
            self.check(states.shape[0])
        fixed = self.step.encoder_length
        if fixed is not None and states.shape[1] != fixed:
            raise InputError(f"generate(): the encoder states have {states.shape[1]} positions; the model's decoder step was captured "
                             f"for {fixed}, the only length it takes")
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        own = cache.self_attention_cache
        routing = [] if self.index is None else [_expand(self.index, states.shape[0])]
        if own.get_seq_length() == 0:
            out = self.first([decoder_input_ids, states, attention_mask, *routing])
        else:
            keys, values = _release(own)
            if self.compiled:
                for t in (*keys, *values):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            inputs = [decoder_input_ids[:, -1:], states, attention_mask, *keys, *values, *routing]
            del keys, values  # the step takes the only references
            out = self.token(inputs)
        n = len(self.step.layers)
        _store(own, out[1:n + 1], out[n + 1:2 * n + 1])
        _store(cache.cross_attention_cache, out[2 * n + 1:3 * n + 1], out[3 * n + 1:])  # the same each step: the returned cache is complete
        cache.is_updated.update(dict.fromkeys(range(n), True))
        logits = out[0]
        field = "cache" if "cache" in Seq2SeqLMOutput.__dataclass_fields__ else "past_key_values"
        return Seq2SeqLMOutput(logits=logits, **{field: cache})


class _Encoder(nn.Module):
    """What ``generate`` calls as the encoder: the module's main graph (its adapters act in the
    encoder), with a one-token decoder input, read for ``encoder_last_hidden_state``."""

    def __init__(self, gm, source: nn.Module, index: torch.Tensor | None = None, channels: int = 1):
        super().__init__()
        self.__dict__["_gm"] = gm
        self.index = index  # routes the encoder's rows (adapter_names), as the forward does
        self.channels = channels  # a Parallel's branches: the main graph repeats the prompts itself
        self.main = source.main_input_name
        self.start = source.generation_config.decoder_start_token_id or 0

    def forward(self, input_ids=None, attention_mask=None, input_features=None, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        inputs = input_ids if self.main == "input_ids" else input_features
        if self.channels > 1:  # generate repeated the prompts for the decoder steps; the main graph repeats them again
            rows = inputs.shape[0] // self.channels
            inputs = inputs[:rows]
            attention_mask = attention_mask[:rows] if attention_mask is not None else None
        call = {self.main: inputs, "decoder_input_ids": torch.full((inputs.shape[0], 1), self.start, dtype=torch.long, device=inputs.device)}
        if attention_mask is not None:
            call["attention_mask"] = attention_mask
        if self.index is not None:
            call["adapter_names"] = self.index
        return BaseModelOutput(last_hidden_state=self._gm(**call).encoder_last_hidden_state)


def _release(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The keys and values of ``cache``'s layers, which no longer hold them (a step takes them over)."""
    keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    for layer in cache.layers:
        layer.keys = layer.values = None
    return keys, values


def _store(cache, keys, values) -> None:
    """Make ``cache``'s layers hold the step's keys and values (the whole sequence, a masked slot first)."""
    from transformers.cache_utils import DynamicLayer

    while len(cache.layers) < len(keys):
        cache.layers.append(DynamicLayer())
    for layer, k, v in zip(cache.layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
