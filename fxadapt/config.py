"""Adapter configs: frozen dataclasses with AdapterHub's field names and defaults.

Each config validates itself in ``__post_init__`` and raises :class:`~fxadapt.errors.ConfigError`
naming the field and the value. ``CONFIGS`` maps AdapterHub's config ids to default instances.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["AdapterConfig", "LoRAConfig", "IA3Config", "CONFIGS", "resolve_config"]

ATTN_MATRICES = ("q", "k", "v", "o")
INIT_WEIGHTS = ("lora", "bert", "ia3")
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every adapter config. ``architecture`` is the summary's Architecture column."""

    architecture: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so configs stay hashable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first invalid field."""

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config's fields and its class name, JSON-ready."""
        out = {"config_class": type(self).__name__, "architecture": self.architecture}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Rebuild a config written by :meth:`to_dict`; unknown keys are an error."""
        data = dict(data)
        name = data.pop("config_class", cls.__name__)
        data.pop("architecture", None)
        klass = _CONFIG_CLASSES.get(name)
        if klass is None:
            raise ConfigError(f"unknown config class {name!r}; known: {sorted(_CONFIG_CLASSES)}", field="config_class", value=name)
        if issubclass(klass, ConfigUnion):
            return klass(configs=[AdapterConfig.from_dict(c) for c in data.get("configs", ())])
        known = {f.name for f in dataclasses.fields(klass)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{name} has no field(s) {unknown}", field=unknown[0], value=data[unknown[0]])
        return klass(**data)

    # -- validation helpers ------------------------------------------------------------
    def _fail(self, field: str, message: str) -> None:
        value = getattr(self, field)
        raise ConfigError(f"{type(self).__name__}.{field} {message}, got {value!r}", field=field, value=value)

    def _check_bool(self, *fields: str) -> None:
        for field in fields:
            if not isinstance(getattr(self, field), bool):
                self._fail(field, "must be True or False")

    def _check_choice(self, field: str, choices: tuple) -> None:
        if getattr(self, field) not in choices:
            self._fail(field, f"must be one of {list(choices)}")

    def _check_layers(self, field: str = "leave_out") -> None:
        value = getattr(self, field)
        if not isinstance(value, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
            self._fail(field, "must be a list of layer indices (ints >= 0)")

    def _check_probability(self, field: str) -> None:
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self._fail(field, "must be a number in [0, 1)")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Low-rank adaptation (Hu et al., 2021): ``W x + b + scaling * B A dropout(x)``.

    Fields follow AdapterHub's ``LoRAConfig``:

    - ``selfattn_lora``: adapt the attention projections named in ``attn_matrices`` (q, k, v, o).
    - ``intermediate_lora``: adapt the feed-forward input projection(s) (up, and gate when gated).
    - ``output_lora``: adapt the feed-forward output projection (down).
    - ``leave_out``: layer indices to skip.
    - ``r``, ``alpha``: rank and scaling numerator; ``scaling = alpha / r``, or ``alpha / sqrt(r)``
      with ``use_rslora``.
    - ``dropout``: dropout on the adapter's input, active in ``.train()`` only.
    - ``composition_mode``: ``"add"`` (LoRA) or ``"scale"`` ((IA)^3: the output is multiplied by a
      learned vector; needs ``r == 1``).
    - ``init_weights``: ``"lora"`` (A Kaiming-uniform, B zero), ``"bert"`` (normal, std 0.02) or
      ``"ia3"`` (ones). ``init_weights_seed`` makes the initialisation reproducible.
    - ``targets``: regular expression (full match) or list of names (suffix match, as PEFT's
      ``target_modules``) on module paths; adds any matching linear to the sites above.
    - ``dtype``: dtype of the adapter weights; None uses the dtype of the adapted weight.
    - ``rank_pattern``, ``alpha_pattern``: per-module rank and alpha, as PEFT's (a dict of pattern ->
      value, stored as a tuple of pairs): the first pattern that matches a module path (the path ends
      with it, or it matches the path's tail as a regex) wins; other modules use ``r`` / ``alpha``.
    - ``input_scaling_targets``: (IA)^3 only: module names (as ``targets``) whose *input* is scaled
      (PEFT's ``feedforward_modules``); these linears are adapted on the input side only.

    >>> LoRAConfig(r=8, alpha=16).scaling
    2.0
    >>> LoRAConfig(r=8, rank_pattern={"value": 4}).rank_for("encoder.layer.0.attention.self.value")
    4
    """

    architecture: ClassVar[str] = "lora"

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: tuple[int, ...] = ()
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    attn_matrices: tuple[str, ...] = ("q", "v")
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_rslora: bool = False
    targets: str | tuple[str, ...] | None = None
    dtype: str | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    input_scaling_targets: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Patterns are given as dicts (PEFT's form) and stored as tuples of pairs, so configs stay hashable.
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            try:
                pairs = tuple((k, v) for k, v in (value.items() if isinstance(value, dict) else value))
            except (TypeError, ValueError):
                self._fail(name, "must be a dict of module pattern -> value")
            object.__setattr__(self, name, pairs)
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rank_pattern"], out["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return out

    @property
    def scaling(self) -> float:
        """The factor applied to ``B A x`` (or to the (IA)^3 vector)."""
        if self.composition_mode == "scale":
            return float(self.alpha)
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at a module path: ``rank_pattern``'s first match, else ``r``."""
        return _pattern_value(self.rank_pattern, path, self.r)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at a module path: ``alpha_pattern``'s first match, else ``alpha``."""
        return _pattern_value(self.alpha_pattern, path, self.alpha)

    def scaling_for(self, path: str) -> float:
        """``scaling`` with the module's own rank and alpha."""
        alpha = self.alpha_for(path)
        if self.composition_mode == "scale":
            return float(alpha)
        r = self.rank_for(path)
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    @property
    def method(self) -> str:
        """The insert pass this config uses: ``"lora"`` or ``"ia3"``."""
        return "ia3" if self.composition_mode == "scale" else "lora"

    def validate(self) -> None:
        self._check_bool("selfattn_lora", "intermediate_lora", "output_lora", "use_gating", "use_rslora")
        self._check_layers()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            self._fail("r", "must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            self._fail("alpha", "must be a positive number")
        self._check_probability("dropout")
        if not isinstance(self.attn_matrices, tuple) or not set(self.attn_matrices) <= set(ATTN_MATRICES):
            self._fail("attn_matrices", f"must be a list drawn from {list(ATTN_MATRICES)}")
        self._check_choice("composition_mode", ("add", "scale"))
        self._check_choice("init_weights", INIT_WEIGHTS)
        if self.init_weights_seed is not None and (isinstance(self.init_weights_seed, bool) or not isinstance(self.init_weights_seed, int)):
            self._fail("init_weights_seed", "must be an integer or None")
        if self.composition_mode == "scale" and self.r != 1:
            self._fail("r", 'must be 1 when composition_mode="scale"')
        if self.composition_mode == "scale" and self.dropout > 0:
            self._fail("dropout", 'must be 0 when composition_mode="scale"')
        if self.dtype is not None:
            self._check_choice("dtype", DTYPES)
        self._validate_targets()
        self._validate_targets("input_scaling_targets")
        if self.input_scaling_targets is not None and self.composition_mode != "scale":
            self._fail("input_scaling_targets", 'needs composition_mode="scale" ((IA)^3)')
        self._validate_pattern("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
        self._validate_pattern("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive number")
        if self.composition_mode == "scale" and any(v != 1 for _, v in self.rank_pattern):
            self._fail("rank_pattern", 'must give rank 1 when composition_mode="scale"')
        if (not (self.selfattn_lora and self.attn_matrices) and not self.intermediate_lora and not self.output_lora and not self.targets
                and not self.input_scaling_targets):
            self._fail("selfattn_lora", "selects no site: enable selfattn_lora with attn_matrices, intermediate_lora, output_lora or set targets")

    def _validate_targets(self, field: str = "targets") -> None:
        targets = getattr(self, field)
        if targets is None:
            return
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                self._fail(field, f"is not a valid regular expression ({e})")
        elif not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
            self._fail(field, "must be a regular expression or a non-empty list of module names")

    def _validate_pattern(self, field: str, valid, what: str) -> None:
        for key, value in getattr(self, field):
            if not isinstance(key, str) or not key:
                self._fail(field, "keys must be non-empty module patterns")
            try:
                re.compile(key)
            except re.error as e:
                self._fail(field, f"key {key!r} is not a valid regular expression ({e})")
            if not valid(value):
                self._fail(field, f"value for {key!r} must be {what}")

    def matches_target(self, path: str) -> bool:
        """Whether a module path is selected by ``targets`` (regex: full match; list: suffix match)."""
        return _matches(self.targets, path)

    def matches_input_scaling(self, path: str) -> bool:
        """Whether (IA)^3 scales the input of the linear at this module path (``input_scaling_targets``)."""
        return _matches(self.input_scaling_targets, path)


def _matches(targets: str | tuple[str, ...] | None, path: str) -> bool:
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _pattern_value(pattern: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    # PEFT's get_pattern_key: a key matches when the path ends with it, at a dot or as a regex.
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclass(frozen=True)
class IA3Config(LoRAConfig):
    """(IA)^3 (Liu et al., 2022): learned vectors rescale the k and v projections and the
    feed-forward intermediate output. AdapterHub's defaults: a LoRA config with
    ``composition_mode="scale"``, ``r=1``, ``init_weights="ia3"``.

    >>> IA3Config().method
    'ia3'
    """

    intermediate_lora: bool = True
    r: int = 1
    alpha: float = 1
    attn_matrices: tuple[str, ...] = ("k", "v")
    composition_mode: str = "scale"
    init_weights: str = "ia3"


NON_LINEARITIES = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu", "linear")


@dataclass(frozen=True)
class BnConfig(AdapterConfig):
    """Bottleneck adapters (AdapterHub's ``BnConfig``): ``up(act(down(h)))`` added back around the
    residual connection of the attention block (``mh_adapter``) and/or the feed-forward block
    (``output_adapter``).

    Where the adapter reads and writes, relative to the block's residual add and LayerNorm:
    ``original_ln_before`` (the adapter reads LN(sublayer + residual)), ``original_ln_after``
    (the result goes through residual + LN again), ``residual_before_ln`` (the adapter's own skip
    connection takes the sublayer output, or ``"post_add"`` the sum), ``ln_before``/``ln_after``
    (LayerNorms inside the adapter), ``adapter_residual_before_ln``, ``is_parallel`` (reads the
    block's input, in parallel with the sublayer) and ``scaling`` (a number, ``"learned"`` or
    ``"channel"``). ``reduction_factor`` gives the bottleneck ``hidden_size // reduction_factor``
    (a number, or a mapping from layer index strings to numbers with a ``"default"``).
    ``inv_adapter="nice"`` adds an invertible adapter on the embedding output. ``phm_layer``
    makes the projections Compacter's PHM layers (``phm_*`` fields).

    >>> SeqBnConfig().reduction_factor, ParBnConfig().scaling
    (16, 4.0)
    """

    architecture: ClassVar[str] = "bottleneck"

    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict = 16
    non_linearity: str = "relu"
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: tuple[int, ...] = ()
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    stochastic_depth: float = 0.0

    def validate(self) -> None:
        self._check_bool("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "ln_after",
                         "is_parallel", "use_gating", "adapter_residual_before_ln", "cross_adapter", "phm_layer",
                         "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "learn_phm", "phm_bias")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [self.reduction_factor]
        if isinstance(self.reduction_factor, dict) and "default" not in self.reduction_factor:
            self._fail("reduction_factor", 'as a mapping needs a "default" entry')
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
            self._fail("reduction_factor", "must be a positive number (or a mapping of layer -> positive number)")
        if str(self.non_linearity).lower() not in NON_LINEARITIES:
            self._fail("non_linearity", f"must be one of {list(NON_LINEARITIES)}")
        self._check_choice("init_weights", ("bert", "mam_adapter", "houlsby"))
        if not (isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool) or self.scaling in ("learned", "channel")):
            self._fail("scaling", 'must be a number, "learned" or "channel"')
        if self.residual_before_ln not in (True, False, "post_add"):
            self._fail("residual_before_ln", 'must be True, False or "post_add"')
        if self.inv_adapter not in (None, "nice"):
            self._fail("inv_adapter", 'must be None or "nice"')
        if self.inv_adapter and not (isinstance(self.inv_adapter_reduction_factor, (int, float)) and self.inv_adapter_reduction_factor > 0):
            self._fail("inv_adapter_reduction_factor", "must be a positive number when inv_adapter is set")
        if self.cross_adapter:
            self._fail("cross_adapter", "is not supported (cross-attention adapters)")
        self._check_layers()
        self._check_probability("dropout")
        if self.stochastic_depth:
            self._fail("stochastic_depth", "is not supported (must be 0)")
        if isinstance(self.phm_dim, bool) or not isinstance(self.phm_dim, int) or self.phm_dim < 1:
            self._fail("phm_dim", "must be a positive integer")
        if isinstance(self.phm_rank, bool) or not isinstance(self.phm_rank, int) or self.phm_rank < 1:
            self._fail("phm_rank", "must be a positive integer")
        self._check_choice("phm_c_init", ("normal", "uniform"))
        self._check_choice("hypercomplex_nonlinearity", ("glorot-normal", "glorot-uniform", "normal"))
        if not (self.mh_adapter or self.output_adapter or self.inv_adapter):
            self._fail("output_adapter", "selects no location: set mh_adapter, output_adapter or inv_adapter")

    def factor(self, layer: int) -> float:
        """The reduction factor of a layer."""
        if isinstance(self.reduction_factor, dict):
            return self.reduction_factor.get(str(layer), self.reduction_factor["default"])
        return self.reduction_factor


@dataclass(frozen=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the feed-forward block, reading LN(sublayer + residual)."""

    original_ln_before: bool = True


@dataclass(frozen=True)
class SeqBnInvConfig(SeqBnConfig):
    """Pfeiffer adapter plus an invertible NICE adapter on the embedding output."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(frozen=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after both the attention and the feed-forward block."""

    mh_adapter: bool = True
    non_linearity: str = "swish"


@dataclass(frozen=True)
class DoubleSeqBnInvConfig(DoubleSeqBnConfig):
    """Houlsby adapters plus an invertible NICE adapter on the embedding output."""

    inv_adapter: str | None = "nice"
    inv_adapter_reduction_factor: float | None = 2


@dataclass(frozen=True)
class ParBnConfig(BnConfig):
    """He et al. (2021): a scaled adapter reading the feed-forward block's input, in parallel with it."""

    reduction_factor: float | dict = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclass(frozen=True)
class CompacterConfig(DoubleSeqBnConfig):
    """Mahabadi et al. (2021): Houlsby placement with PHM (Kronecker-product) projections."""

    phm_layer: bool = True
    reduction_factor: float | dict = 32
    non_linearity: str = "gelu"


@dataclass(frozen=True)
class CompacterPlusPlusConfig(SeqBnConfig):
    """Compacter++: Pfeiffer placement with PHM projections."""

    phm_layer: bool = True
    reduction_factor: float | dict = 32
    non_linearity: str = "gelu"


@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning (Li & Liang, 2021): ``prefix_length`` learned keys and values put before every
    self-attention's own, which every query attends to. ``flat=False`` (the default) generates them
    with an Embedding and an MLP (``bottleneck_size``, ``non_linearity``); ``flat=True`` learns them
    directly. ``use_gating`` scales them by a gate computed from the layer input (UniPELT); with
    ``shared_gating`` keys and values share one gate. AdapterHub's fields and defaults.

    >>> PrefixTuningConfig().prefix_length
    30
    """

    architecture: ClassVar[str] = "prefix_tuning"

    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: tuple[int, ...] = ()
    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    init_weights_seed: int | None = None

    def validate(self) -> None:
        self._check_bool("encoder_prefix", "cross_prefix", "flat", "use_gating", "shared_gating")
        self._check_layers()
        for field in ("prefix_length", "bottleneck_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(field, "must be a positive integer")
        if str(self.non_linearity).lower() not in NON_LINEARITIES:
            self._fail("non_linearity", f"must be one of {list(NON_LINEARITIES)}")
        self._check_probability("dropout")


@dataclass(frozen=True, init=False)
class ConfigUnion(AdapterConfig):
    """Several methods under one adapter name (AdapterHub's ``ConfigUnion``), e.g.
    ``ConfigUnion(LoRAConfig(r=8), PrefixTuningConfig(prefix_length=10))``. No two configs may put
    the same method at the same place.

    >>> len(ConfigUnion(LoRAConfig(), SeqBnConfig()).configs)
    2
    """

    architecture: ClassVar[str] = "union"

    configs: tuple[AdapterConfig, ...] = ()

    def __init__(self, *configs: AdapterConfig, **kwargs: Any):
        configs = configs or tuple(kwargs.pop("configs", ()))
        if kwargs:
            raise ConfigError(f"{type(self).__name__} takes configs only, got {sorted(kwargs)}", field=sorted(kwargs)[0], value=None)
        object.__setattr__(self, "configs", tuple(AdapterConfig.from_dict(c) if isinstance(c, dict) else c for c in configs))
        self.validate()

    def validate(self) -> None:
        if not self.configs:
            self._fail("configs", "must hold at least one config")
        for c in self.configs:
            if not isinstance(c, AdapterConfig) or isinstance(c, ConfigUnion):
                self._fail("configs", "must hold adapter configs (not unions)")
            if getattr(c, "use_gating", False) and isinstance(c, LoRAConfig) and c.composition_mode == "scale":
                raise ConfigError(f"{type(self).__name__}: {type(c).__name__} cannot gate ((IA)^3 scales, it adds nothing to gate)",
                                  field="use_gating", value=True)
        seen: dict[str, AdapterConfig] = {}
        for c in self.configs:
            for place in _places(c):
                if place in seen:
                    raise ConfigError(f"{type(self).__name__}: {type(seen[place]).__name__} and {type(c).__name__} both put "
                                      f"{place} in the same union", field="configs", value=place)
                seen[place] = c

    def to_dict(self) -> dict[str, Any]:
        return {"config_class": type(self).__name__, "architecture": self.architecture, "configs": [c.to_dict() for c in self.configs]}



def _places(config: AdapterConfig) -> list[str]:
    """Where a config puts adapters, as "method at location" (for ConfigUnion's overlap check)."""
    if isinstance(config, LoRAConfig):
        roles = list(config.attn_matrices) if config.selfattn_lora else []
        roles += ["ffn_in"] * config.intermediate_lora + ["ffn_out"] * config.output_lora
        return [f"{config.method} at {r}" for r in roles] + ([f"{config.method} at targets"] if config.targets else [])
    if isinstance(config, BnConfig):
        return [f"a bottleneck adapter at {loc}" for loc, on in (("mh", config.mh_adapter), ("output", config.output_adapter),
                                                                   ("the embedding output", bool(config.inv_adapter))) if on]
    return [f"{config.architecture} at every attention"]


@dataclass(frozen=True, init=False)
class MAMConfig(ConfigUnion):
    """Mix-and-Match (He et al., 2021): prefix tuning (bottleneck 800) and a parallel adapter."""

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None, **kwargs: Any):
        if "configs" in kwargs:
            super().__init__(**kwargs)
            return
        super().__init__(prefix_tuning or PrefixTuningConfig(bottleneck_size=800), adapter or ParBnConfig())


@dataclass(frozen=True, init=False)
class UniPELTConfig(ConfigUnion):
    """UniPELT (Mao et al., 2022): gated prefix tuning (length 10), Pfeiffer adapter and LoRA (r=8, alpha=2)."""

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None,
                 lora: LoRAConfig | None = None, **kwargs: Any):
        if "configs" in kwargs:
            super().__init__(**kwargs)
            return
        super().__init__(prefix_tuning or PrefixTuningConfig(prefix_length=10, use_gating=True),
                         adapter or SeqBnConfig(reduction_factor=16, use_gating=True),
                         lora or LoRAConfig(r=8, alpha=2, use_gating=True))


# AdapterHub's older names.
PfeifferConfig = SeqBnConfig
PfeifferInvConfig = SeqBnInvConfig
HoulsbyConfig = DoubleSeqBnConfig
HoulsbyInvConfig = DoubleSeqBnInvConfig
ParallelConfig = ParBnConfig


_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {c.__name__: c for c in (
    LoRAConfig, IA3Config, BnConfig, SeqBnConfig, SeqBnInvConfig, DoubleSeqBnConfig, DoubleSeqBnInvConfig, ParBnConfig,
    CompacterConfig, CompacterPlusPlusConfig, PrefixTuningConfig, ConfigUnion, MAMConfig, UniPELTConfig)}

#: AdapterHub's config ids and the default config each names.
CONFIGS: dict[str, AdapterConfig] = {
    "pfeiffer": SeqBnConfig(),
    "houlsby": DoubleSeqBnConfig(),
    "parallel": ParBnConfig(),
    "scaled_parallel": ParBnConfig(scaling="learned"),
    "pfeiffer+inv": SeqBnInvConfig(),
    "houlsby+inv": DoubleSeqBnInvConfig(),
    "seq_bn": SeqBnConfig(),
    "double_seq_bn": DoubleSeqBnConfig(),
    "par_bn": ParBnConfig(),
    "scaled_par_bn": ParBnConfig(scaling="learned"),
    "seq_bn_inv": SeqBnInvConfig(),
    "double_seq_bn_inv": DoubleSeqBnInvConfig(),
    "compacter++": CompacterPlusPlusConfig(),
    "compacter": CompacterConfig(),
    "prefix_tuning": PrefixTuningConfig(),
    "prefix_tuning_flat": PrefixTuningConfig(flat=True),
    "lora": LoRAConfig(),
    "ia3": IA3Config(),
    "mam": MAMConfig(),
    "unipelt": UniPELTConfig(),
}


def resolve_config(config: AdapterConfig | str) -> AdapterConfig:
    """A config object, or the default config of an id in ``CONFIGS``.

    >>> resolve_config("lora").r
    8
    """
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        if config in CONFIGS:
            return CONFIGS[config]
        raise ConfigError(f"unknown config id {config!r}; valid ids: {', '.join(CONFIGS)}", field="config", value=config)
    raise ConfigError(f"config must be an AdapterConfig or one of {list(CONFIGS)}, got {type(config).__name__}", field="config", value=config)


def config_id(config: AdapterConfig | str) -> str:
    """The CONFIGS id whose default equals this config, else the architecture name."""
    if isinstance(config, str):
        return config
    for key, value in CONFIGS.items():
        if value == config:
            return key
    return config.architecture or type(config).__name__.lower()
