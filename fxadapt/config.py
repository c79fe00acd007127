"""Adapter configs: frozen dataclasses with AdapterHub's field names and defaults.

Each config validates every field in ``__post_init__`` and raises :class:`~fxadapt.errors.ConfigError`
naming the field and the value. ``CONFIGS`` maps AdapterHub's config ids to default instances.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import ConfigError


ATTN_MATRICES = ("q", "k", "v", "o")
INIT_WEIGHTS = ("lora", "bert", "ia3", "vera")
DTYPES = ("float32", "float16", "bfloat16", "float64")
NON_LINEARITIES = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu", "linear")

# The largest size (rank, prefix length, bottleneck, PHM dimension, layer index) a config may name.
# A config knows no model, so it cannot work out the memory an adapter needs (add_adapter does,
# with the model's sizes); but no adapter dimension above 2**31 elements can be allocated on any
# machine fxadapt runs on, and several kernels index with int32. A bigger number is a typo (or a
# hostile file): refusing it here names the field before any model is touched.
MAX_SIZE = 2**31
# torch.manual_seed's range.
SEED_RANGE = (-(2**63), 2**64 - 1)

# -- field checks: each returns None for a good value, else what the value must be -------------
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    # An int too large for a float (10**400) is not finite for what follows (alpha / r, scaling).
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _bool(v: Any) -> str | None:
    # Only real bools: "false" is truthy and 0/1 hide a mistyped field.
    return None if isinstance(v, bool) else "must be True or False"


def _size(v: Any) -> str | None:
    return None if _is_int(v) and 1 <= v <= MAX_SIZE else "must be an integer in [1, 2**31]"


def _positive(v: Any) -> str | None:
    return None if _is_finite(v) and v > 0 else "must be a finite number > 0"


def _probability(v: Any) -> str | None:
    return None if _is_finite(v) and 0 <= v < 1 else "must be a number in [0, 1)"


def _seed(v: Any) -> str | None:
    ok = v is None or (_is_int(v) and SEED_RANGE[0] <= v <= SEED_RANGE[1])
    return None if ok else "must be None or an integer seed in [-2**63, 2**64)"


def _layers(v: Any) -> str | None:
    ok = isinstance(v, tuple) and all(_is_int(i) and 0 <= i < MAX_SIZE for i in v)
    return None if ok else "must be a list of layer indices (integers >= 0)"


def _choice(*options: Any) -> Check:
    def check(v: Any) -> str | None:
        # Type first: `1 in (True, ...)` and `array in (...)` are not what is meant.
        return None if type(v) in {type(o) for o in options} and v in options else f"must be one of {list(options)}"
    return check


def _names(v: Any) -> str | None:
    """None, a regular expression (full match) or a non-empty list of module names (suffix match)."""
    if v is None:
        return None
    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error as e:
            return f"is not a valid regular expression ({e})"
        return None
    if isinstance(v, tuple) and v and all(isinstance(t, str) and t for t in v):
        return None
    return "must be a regular expression or a non-empty list of module names"


def _module_names(v: Any) -> str | None:
    """None or a non-empty list of module names (PEFT's ``modules_to_save``: a module path or its tail)."""
    if v is None or isinstance(v, tuple) and v and all(isinstance(t, str) and t and not t.startswith(".") for t in v):
        return None
    return "must be null or a non-empty list of module names"


def _pattern(valid: Check) -> Check:
    """PEFT's rank_pattern / alpha_pattern: distinct module patterns -> values."""
    def check(v: Any) -> str | None:
        if not isinstance(v, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in v):
            return "must be a dict of module pattern -> value"
        keys = [k for k, _ in v]
        for key, value in v:
            if not isinstance(key, str) or not key:
                return "keys must be non-empty module patterns"
            try:
                # Compiled as _pattern_value uses it: "(?i)x" alone is valid, inside that pattern not.
                re.compile(_pattern_regex(key))
            except re.error as e:
                return f"key {key!r} is not a valid regular expression ({e})"
            if keys.count(key) > 1:
                return f"names {key!r} twice"
            problem = valid(value)
            if problem:
                return f"value for {key!r} {problem}"
        return None
    return check


def _attn_matrices(v: Any) -> str | None:
    ok = isinstance(v, tuple) and all(isinstance(m, str) and m in ATTN_MATRICES for m in v) and len(set(v)) == len(v)
    return None if ok else f"must be a list of distinct names drawn from {list(ATTN_MATRICES)}"


def _non_linearity(v: Any) -> str | None:
    return None if isinstance(v, str) and v.lower() in NON_LINEARITIES else f"must be one of {list(NON_LINEARITIES)}"


_LAYER_KEY = re.compile(r"0|[1-9][0-9]{0,9}")


def _reduction_factor(v: Any) -> str | None:
    """A number, or AdapterHub's mapping of layer index strings ("0", "1", ...) to numbers with a "default"."""
    if isinstance(v, dict):
        if "default" not in v:
            return 'as a mapping needs a "default" entry'
        for key, factor in v.items():
            if not (key == "default" or isinstance(key, str) and _LAYER_KEY.fullmatch(key) and int(key) < MAX_SIZE):
                return f'keys must be layer indices as strings ("0", "1", ...) or "default", not {key!r}'
            if _positive(factor):
                return f"value for {key!r} must be a finite number > 0"
        return None
    return None if _is_finite(v) and v > 0 else "must be a finite number > 0 (or a mapping of layer -> number)"


def _scaling(v: Any) -> str | None:
    return None if _is_finite(v) or isinstance(v, str) and v in ("learned", "channel") else 'must be a finite number, "learned" or "channel"'


def _residual_before_ln(v: Any) -> str | None:
    return None if isinstance(v, bool) or isinstance(v, str) and v == "post_add" else 'must be True, False or "post_add"'


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _zero(v: Any) -> str | None:
    return None if _is_finite(v) and v == 0 else "must be 0 (stochastic depth is not supported)"


def _false(v: Any) -> str | None:
    return None if v is False else "must be False (cross-attention adapters are not supported)"


def _finite(v: Any) -> str | None:
    return None if _is_finite(v) else "must be a finite number"


def _non_negative(v: Any) -> str | None:
    return None if _is_finite(v) and v >= 0 else "must be a finite number >= 0"


#: Every public config class by name (``from_dict`` reads ``config_class``): each registers itself.
_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {}


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every adapter config. ``architecture`` is the summary's Architecture column;
    ``checks`` maps every field to the check of its values (a field without one is a bug)."""

    architecture: ClassVar[str] = ""
    method: ClassVar[str] = ""  # the key of its method in fxadapt.methods.METHODS
    checks: ClassVar[dict[str, Check]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            _CONFIG_CLASSES[cls.__name__] = cls

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so configs stay hashable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first invalid field (in field order), then for fields that do not go together."""
        for f in dataclasses.fields(self):
            problem = self.checks[f.name](getattr(self, f.name))
            if problem:
                self._fail(f.name, problem)
        self.check_combination()

    def check_combination(self) -> None:
        """Raise ConfigError when fields that are each valid do not go together."""

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
        """Rebuild a config written by :meth:`to_dict`; an unknown class or field, or a value of
        the wrong type, is a ConfigError naming it."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a dict (a JSON object), got {type(data).__name__}", field="config", value=data)
        data = dict(data)
        name = data.pop("config_class", cls.__name__)
        klass = _CONFIG_CLASSES.get(name) if isinstance(name, str) else None
        if klass is None:
            raise ConfigError(f"unknown config class {name!r}; known: {sorted(_CONFIG_CLASSES)}", field="config_class", value=name)
        architecture = data.pop("architecture", None)
        if architecture is not None and architecture != klass.architecture:
            raise ConfigError(f"{name}'s architecture is {klass.architecture!r}, the dict says {architecture!r}",
                              field="architecture", value=architecture)
        known = {f.name for f in dataclasses.fields(klass)}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"{name} has no field(s) {unknown}; its fields: {sorted(known)}", field=str(unknown[0]), value=data[unknown[0]])
        return klass(**data)

    # -- validation helpers ------------------------------------------------------------
    def _fail(self, field: str, message: str) -> None:
        value = getattr(self, field)
        raise ConfigError(f"{type(self).__name__}.{field} {message}, got {value!r}", field=field, value=value)


class _Patterns:
    """``rank_pattern`` / ``alpha_pattern`` (PEFT's per-module rank and alpha): given as dicts, PEFT's
    form, and stored as tuples of pairs, so configs stay hashable; anything else is left as it is
    for the check to name. Written back as dicts."""

    def __post_init__(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, tuple(value.items()))
            elif isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(tuple(p) if isinstance(p, list) else p for p in value))
        super().__post_init__()

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rank_pattern"], out["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return out


@dataclass(frozen=True)
class LoRAConfig(_Patterns, AdapterConfig):
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
    - ``use_dora``: DoRA (``DoRAConfig``); ``vera_d`` / ``vera_b``: VeRA's initial d and b vectors
      (``VeraConfig``): AdapterHub's fields, each method acting only once it is in ``METHODS``.
    - ``modules_to_save``: PEFT's: modules (a path or its tail, e.g. ``"classifier"``) of which the
      adapter keeps its own copy; while it is active the model reads the copy, which trains with it
      (``fxadapt.methods.saved_modules``).

    >>> LoRAConfig(r=8, alpha=16).scaling
    2.0
    >>> LoRAConfig(r=8, rank_pattern={"value": 4}).rank_for("encoder.layer.0.attention.self.value")
    4
    """

    architecture: ClassVar[str] = "lora"
    checks: ClassVar[dict[str, Check]] = {
        "selfattn_lora": _bool, "intermediate_lora": _bool, "output_lora": _bool, "leave_out": _layers, "r": _size,
        "alpha": _positive, "dropout": _probability, "attn_matrices": _attn_matrices,
        "composition_mode": _choice("add", "scale"), "init_weights": _choice(*INIT_WEIGHTS), "init_weights_seed": _seed,
        "use_gating": _bool, "use_rslora": _bool, "targets": _names, "dtype": _optional(_choice(*DTYPES)),
        "rank_pattern": _pattern(_size), "alpha_pattern": _pattern(_positive), "input_scaling_targets": _names,
        "use_dora": _bool, "vera_d": _optional(_finite), "vera_b": _optional(_finite), "modules_to_save": _module_names,
    }

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
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    modules_to_save: tuple[str, ...] | None = None

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
    def method(self) -> str:  # type: ignore[override]
        """The method this config uses: ``"lora"``, ``"ia3"``, ``"dora"`` or ``"vera"``."""
        if self.composition_mode == "scale":
            return "ia3"
        return "dora" if self.use_dora else "vera" if self.vera_d is not None or self.vera_b is not None else "lora"

    def check_combination(self) -> None:
        if self.use_dora and (self.vera_d is not None or self.vera_b is not None):
            self._fail("use_dora", "and vera_d / vera_b are two methods: choose DoRA or VeRA")
        if self.composition_mode == "scale" and (self.use_dora or self.vera_d is not None or self.vera_b is not None):
            self._fail("composition_mode", '"scale" ((IA)^3) takes neither use_dora nor vera_d / vera_b')
        if self.composition_mode == "scale":
            if self.r != 1:
                self._fail("r", 'must be 1 when composition_mode="scale"')
            if self.dropout > 0:
                self._fail("dropout", 'must be 0 when composition_mode="scale"')
            if any(v != 1 for _, v in self.rank_pattern):
                self._fail("rank_pattern", 'must give rank 1 when composition_mode="scale"')
        elif self.input_scaling_targets is not None:
            self._fail("input_scaling_targets", 'needs composition_mode="scale" ((IA)^3)')
        if (not (self.selfattn_lora and self.attn_matrices) and not self.intermediate_lora and not self.output_lora and not self.targets
                and not self.input_scaling_targets):
            self._fail("selfattn_lora", "selects no site: enable selfattn_lora with attn_matrices, intermediate_lora, output_lora or set targets")

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


def _pattern_regex(key: str) -> str:
    # PEFT's get_pattern_key: a key matches when the path ends with it, at a dot or as a regex.
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: tuple[tuple[str, Any], ...], path: str, default: Any) -> Any:
    for key, value in pattern:
        if re.match(_pattern_regex(key), path):
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


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """DoRA (Liu et al., 2024, weight-decomposed LoRA): LoRA's update with a learned magnitude per
    output row, ``y = m / ||W + scaling B A|| * (W + scaling B A) x + b`` (the norm per output row,
    treated as a constant in backward, as PEFT). AdapterHub's ``DoRAConfig``: a LoRA config with
    ``use_dora=True``; PEFT's ``LoraConfig(use_dora=True)``.

    >>> DoRAConfig().method
    'dora'
    """

    use_dora: bool = True


@dataclass(frozen=True)
class VeraConfig(LoRAConfig):
    """VeRA (Kopiczko et al., 2024, vector-based random matrix adaptation): frozen random ``A`` (r, in)
    and ``B`` (out, r) shared by every adapted projection (one pair of the largest shapes, sliced per
    projection, as PEFT), and per projection two trained vectors: ``y + scaling * b * (B (d * (A x)))``.
    ``vera_d`` / ``vera_b`` are the vectors' initial values; ``init_weights="vera"`` draws A and B
    Kaiming-uniform (PEFT's draw, from ``init_weights_seed`` when set: PEFT's ``projection_prng_key``).
    AdapterHub's ``VeraConfig`` defaults; ``scaling = alpha / r`` as AdapterHub (PEFT: 1, i.e. alpha = r).

    >>> VeraConfig().method
    'vera'
    """

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    r: int = 8
    vera_d: float | None = 0.1
    vera_b: float | None = 0.0
    init_weights: str = "vera"
    composition_mode: str = "add"


def _unsupported_dropout(v: Any) -> str | None:
    return None if _is_finite(v) and v == 0 else "must be 0 (rank and module dropout are not supported)"


def _lokr_init(v: Any) -> str | None:
    return None if isinstance(v, bool) or isinstance(v, str) and v == "lycoris" else 'must be True, False or "lycoris"'


def _decompose_factor(v: Any) -> str | None:
    return None if _is_int(v) and (v == -1 or 1 <= v <= MAX_SIZE) else "must be -1 (near the square root) or an integer in [1, 2**31]"


@dataclass(frozen=True)
class _LycorisConfig(_Patterns, AdapterConfig):
    """What LoHa and LoKr (PEFT's LyCORIS methods) share with LoRA: where they go (``selfattn_lora``
    with ``attn_matrices``, ``intermediate_lora``, ``output_lora``, ``targets``, ``leave_out``) and
    their size (``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``; ``scaling = alpha / r``).
    PEFT's ``rank_dropout`` and ``module_dropout`` must be 0 (not supported)."""

    _checks: ClassVar[dict[str, Check]] = {
        "selfattn_lora": _bool, "intermediate_lora": _bool, "output_lora": _bool, "leave_out": _layers, "r": _size,
        "alpha": _positive, "rank_dropout": _unsupported_dropout, "module_dropout": _unsupported_dropout,
        "attn_matrices": _attn_matrices, "init_weights": _bool, "init_weights_seed": _seed, "targets": _names,
        "rank_pattern": _pattern(_size), "alpha_pattern": _pattern(_positive), "modules_to_save": _module_names,
    }
    # select_sites reads these of LoRA's fields: LoHa / LoKr never scale inputs.
    input_scaling_targets = None

    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: tuple[int, ...] = ()
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    attn_matrices: tuple[str, ...] = ("q", "v")
    init_weights: bool = True
    init_weights_seed: int | None = None
    targets: str | tuple[str, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    modules_to_save: tuple[str, ...] | None = None

    rank_for = LoRAConfig.rank_for
    alpha_for = LoRAConfig.alpha_for
    matches_target = LoRAConfig.matches_target

    @property
    def scaling(self) -> float:
        """``alpha / r``, PEFT's scaling of the delta weight."""
        return self.alpha / self.r

    def scaling_for(self, path: str) -> float:
        """``scaling`` with the module's own rank and alpha."""
        return self.alpha_for(path) / self.rank_for(path)

    def matches_input_scaling(self, path: str) -> bool:
        return False

    def check_combination(self) -> None:
        if not (self.selfattn_lora and self.attn_matrices) and not self.intermediate_lora and not self.output_lora and not self.targets:
            self._fail("selfattn_lora", "selects no site: enable selfattn_lora with attn_matrices, intermediate_lora, output_lora or set targets")


@dataclass(frozen=True)
class LoHaConfig(_LycorisConfig):
    """LoHa (Hyeon-Woo et al., 2022, PEFT's ``LoHaConfig``): the projection's weight gets
    ``(w1_a w1_b) * (w2_a w2_b) * alpha / r`` added, a Hadamard product of two rank-``r``
    products. ``init_weights=True`` starts ``hada_w2_b`` at zero (the adapter starts as the base
    model), ``False`` all four at random (Kaiming-uniform). Where: as LoRA (q and v by default).

    >>> LoHaConfig(r=4, alpha=8).scaling
    2.0
    """

    architecture: ClassVar[str] = "loha"
    method: ClassVar[str] = "loha"
    checks: ClassVar[dict[str, Check]] = _LycorisConfig._checks


@dataclass(frozen=True)
class LoKrConfig(_LycorisConfig):
    """LoKr (Edalati et al., 2022; LyCORIS, PEFT's ``LoKrConfig``): the projection's weight gets
    ``kron(w1, w2) * alpha / r``, with the output and input sizes factored as PEFT's
    ``factorization(size, decompose_factor)`` does (-1: near the square root). ``w2`` is the
    rank-``r`` product ``w2_a w2_b`` when ``r`` is below half its larger side, ``w1`` too with
    ``decompose_both``. ``init_weights=True`` starts ``w1`` (or ``w1_a``) at zero, ``"lycoris"``
    ``w2`` (or ``w2_b``), ``False`` nothing. ``rank_dropout_scale`` only matters with rank dropout.

    >>> LoKrConfig().decompose_factor
    -1
    """

    architecture: ClassVar[str] = "lokr"
    method: ClassVar[str] = "lokr"
    checks: ClassVar[dict[str, Check]] = {**_LycorisConfig._checks, "init_weights": _lokr_init, "decompose_both": _bool,
                                          "decompose_factor": _decompose_factor, "rank_dropout_scale": _bool}

    init_weights: bool | str = True
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


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
    method: ClassVar[str] = "bottleneck"
    checks: ClassVar[dict[str, Check]] = {
        "mh_adapter": _bool, "output_adapter": _bool, "reduction_factor": _reduction_factor, "non_linearity": _non_linearity,
        "original_ln_before": _bool, "original_ln_after": _bool, "ln_before": _bool, "ln_after": _bool,
        "init_weights": _choice("bert", "mam_adapter", "houlsby"), "init_weights_seed": _seed, "is_parallel": _bool,
        "scaling": _scaling, "use_gating": _bool, "residual_before_ln": _residual_before_ln, "adapter_residual_before_ln": _bool,
        "inv_adapter": _optional(_choice("nice")), "inv_adapter_reduction_factor": _optional(_positive), "cross_adapter": _false,
        "leave_out": _layers, "dropout": _probability, "phm_layer": _bool, "phm_dim": _size, "factorized_phm_W": _bool,
        "shared_W_phm": _bool, "shared_phm_rule": _bool, "factorized_phm_rule": _bool, "phm_c_init": _choice("normal", "uniform"),
        "phm_init_range": _non_negative, "learn_phm": _bool,
        "hypercomplex_nonlinearity": _choice("glorot-normal", "glorot-uniform", "normal"), "phm_rank": _size, "phm_bias": _bool,
        "stochastic_depth": _zero,
    }

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

    def __post_init__(self) -> None:
        # A copy of a per-layer mapping: the caller changing theirs later must not bypass validation.
        if isinstance(self.reduction_factor, dict):
            object.__setattr__(self, "reduction_factor", dict(self.reduction_factor))
        super().__post_init__()

    def check_combination(self) -> None:
        if self.inv_adapter and self.inv_adapter_reduction_factor is None:
            self._fail("inv_adapter_reduction_factor", "must be a positive number when inv_adapter is set")
        if self.phm_layer and self.shared_W_phm and isinstance(self.reduction_factor, dict):
            self._fail("reduction_factor", "must be a number with shared_W_phm=True (one bottleneck size shared by every layer)")
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
    method: ClassVar[str] = "prefix"
    checks: ClassVar[dict[str, Check]] = {
        "encoder_prefix": _bool, "cross_prefix": _bool, "leave_out": _layers, "flat": _bool, "prefix_length": _size,
        "bottleneck_size": _size, "non_linearity": _non_linearity, "dropout": _probability, "use_gating": _bool,
        "shared_gating": _bool, "init_weights_seed": _seed,
    }

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


def _token_ids(v: Any) -> str | None:
    ok = v is None or (isinstance(v, tuple) and v and all(_is_int(i) and 0 <= i < MAX_SIZE for i in v))
    return None if ok else "must be None or a non-empty list of token ids (integers >= 0)"


@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning (Lester et al., 2021): ``prompt_length`` learned embeddings put before the
    embedding output (after positions and the embeddings' LayerNorm, as AdapterHub), the attention
    mask extended by as many ones; the model's outputs include the prompt's positions.
    ``prompt_init="random_uniform"`` draws them from U(-random_uniform_scale, random_uniform_scale);
    ``"from_string"`` copies the word embeddings of a text's tokens, repeated or cut to
    ``prompt_length``. AdapterHub tokenizes ``prompt_init_text`` with the model's tokenizer; fxadapt
    needs no tokenizer: pass the ids, ``prompt_init_ids=tokenizer(text)["input_ids"]`` (beyond
    AdapterHub's fields). ``combine="prefix_after_bos"`` puts the prompt after the first position.
    AdapterHub's fields and defaults.

    >>> PromptTuningConfig().prompt_length
    10
    """

    architecture: ClassVar[str] = "prompt_tuning"
    method: ClassVar[str] = "prompt"
    checks: ClassVar[dict[str, Check]] = {
        "prompt_length": _size, "prompt_init": _choice("random_uniform", "from_string"),
        "prompt_init_text": _optional(lambda v: None if isinstance(v, str) and v else "must be None or a non-empty string"),
        "random_uniform_scale": _non_negative, "combine": _choice("prefix", "prefix_after_bos"),
        "init_weights_seed": _seed, "prompt_init_ids": _token_ids,
    }

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    random_uniform_scale: float = 0.5
    combine: str = "prefix"
    init_weights_seed: int | None = None
    prompt_init_ids: tuple[int, ...] | None = None

    def check_combination(self) -> None:
        if self.prompt_init == "from_string" and self.prompt_init_ids is None:
            self._fail("prompt_init_ids", 'must list the prompt text\'s token ids for prompt_init="from_string" '
                       '(fxadapt does not tokenize: prompt_init_ids=tokenizer(prompt_init_text)["input_ids"])')


def _reft_layers(v: Any) -> str | None:
    return None if v == "all" and isinstance(v, str) or not _layers(v) else 'must be "all" or a list of layer indices (integers >= 0)'


def _positions(v: Any) -> str | None:
    return None if _is_int(v) and 0 <= v <= MAX_SIZE else "must be an integer in [0, 2**31]"


@dataclass(frozen=True)
class ReftConfig(AdapterConfig):
    """Representation fine-tuning (Wu et al., 2024), AdapterHub's ``ReftConfig``: an intervention on
    the hidden states each selected layer outputs (``layers``: "all" or indices), at the first
    ``prefix_positions`` and the last ``suffix_positions`` tokens of each example (found from the
    attention mask, padding on either side), ``h + R^T (act(W h + b) - R h)`` with R of rank ``r``:
    orthogonal rows with ``orthogonality``, ``- R h`` left out without ``subtract_projection``.
    ``tied_weights``: prefix and suffix share one intervention per layer (else one each);
    ``dropout`` acts on the intervened states; ``non_linearity`` is None (identity) or an activation;
    ``output_reft`` is AdapterHub's only location (the layer output). AdapterHub's fields and defaults
    (its ``subtract_projection`` is a class attribute its JSON leaves out; here a field).

    >>> LoReftConfig().prefix_positions
    3
    """

    architecture: ClassVar[str] = "reft"
    method: ClassVar[str] = "reft"
    checks: ClassVar[dict[str, Check]] = {
        "layers": _reft_layers, "prefix_positions": _positions, "suffix_positions": _positions, "r": _size,
        "orthogonality": _bool, "tied_weights": _bool, "subtract_projection": _bool, "dropout": _probability,
        "non_linearity": _optional(_non_linearity), "dtype": _optional(_choice(*DTYPES)),
        "output_reft": lambda v: None if v is True else "must be True (the layer output is ReFT's only location)",
        "init_weights_seed": _seed,
    }

    layers: str | tuple[int, ...]
    prefix_positions: int
    suffix_positions: int
    r: int
    orthogonality: bool
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None
    output_reft: bool = True
    init_weights_seed: int | None = None

    def check_combination(self) -> None:
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            self._fail("prefix_positions", "and suffix_positions are both 0: the adapter would intervene nowhere")


@dataclass(frozen=True)
class LoReftConfig(ReftConfig):
    """LoReFT: low-rank linear subspace ReFT, ``h + R^T (W h + b - R h)`` with orthonormal rows of R."""

    layers: str | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True


@dataclass(frozen=True)
class NoReftConfig(ReftConfig):
    """LoReFT without the orthogonality constraint on R."""

    layers: str | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = False


@dataclass(frozen=True)
class DiReftConfig(ReftConfig):
    """DiReFT: no orthogonality and no subtraction, ``h + R^T (W h + b)``."""

    layers: str | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = False
    subtract_projection: bool = False


def _union_parts(v: Any) -> str | None:
    if not v:
        return "must hold at least one config"
    if not all(isinstance(c, AdapterConfig) and not isinstance(c, ConfigUnion) for c in v):
        return "must hold adapter configs (not unions)"
    return None


@dataclass(frozen=True, init=False)
class ConfigUnion(AdapterConfig):
    """Several methods under one adapter name (AdapterHub's ``ConfigUnion``), e.g.
    ``ConfigUnion(LoRAConfig(r=8), PrefixTuningConfig(prefix_length=10))``. No two configs may put
    adapters at the same place: the same projection role, the same bottleneck location or every
    attention's prefix (parts with ``leave_out`` are checked against the model at ``add_adapter``).

    >>> len(ConfigUnion(LoRAConfig(), SeqBnConfig()).configs)
    2
    """

    architecture: ClassVar[str] = "union"
    checks: ClassVar[dict[str, Check]] = {"configs": _union_parts}

    configs: tuple[AdapterConfig, ...] = ()

    def __init__(self, *configs: AdapterConfig, **kwargs: Any):
        if "configs" in kwargs:
            given = kwargs.pop("configs")
            if configs or not isinstance(given, (list, tuple)):
                raise ConfigError(f"{type(self).__name__}.configs must be a list of configs (given once), got {given!r}",
                                  field="configs", value=given)
            configs = tuple(given)
        if kwargs:
            raise ConfigError(f"{type(self).__name__} takes configs only, got {sorted(kwargs)}", field=sorted(kwargs)[0], value=None)
        object.__setattr__(self, "configs", tuple(_union_part(c) for c in configs))
        self.validate()

    def check_combination(self) -> None:
        for c in self.configs:
            if getattr(c, "use_gating", False) and isinstance(c, LoRAConfig) and c.composition_mode == "scale":
                raise ConfigError(f"{type(self).__name__}: {type(c).__name__} cannot gate ((IA)^3 scales, it adds nothing to gate)",
                                  field="use_gating", value=True)
        for i, later in enumerate(self.configs):
            for j, earlier in enumerate(self.configs[:i]):
                # As AdapterHub: with leave_out the layers two parts share depend on the model, so
                # plan() checks them at add_adapter.
                if later.leave_out or earlier.leave_out:
                    continue
                shared = [place for place in _places(earlier) if place in _places(later)]
                if shared:
                    raise ConfigError(f"{type(self).__name__}: {type(earlier).__name__} and {type(later).__name__} both put {shared[0]} "
                                      f"in the same union (parts {j} and {i}); one place takes one adapter of an adapter name",
                                      field="configs", value=shared[0])

    def to_dict(self) -> dict[str, Any]:
        return {"config_class": type(self).__name__, "architecture": self.architecture, "configs": [c.to_dict() for c in self.configs]}


def _union_part(c: Any) -> Any:
    """A union's part; a dict is read with from_dict, but a union in it is refused before it is read
    (a deeply nested one would otherwise recurse without bound)."""
    if not isinstance(c, dict):
        return c
    klass = _CONFIG_CLASSES.get(c.get("config_class")) if isinstance(c.get("config_class"), str) else None
    if klass is not None and issubclass(klass, ConfigUnion):
        raise ConfigError(f"ConfigUnion.configs must hold adapter configs (not unions), got a {klass.__name__}", field="configs",
                          value=c.get("config_class"))
    return AdapterConfig.from_dict(c)


_ROLE_NAMES = {"q": "query", "k": "key", "v": "value", "o": "attention output", "ffn_in": "feed-forward input",
               "ffn_out": "feed-forward output"}


def _places(config: AdapterConfig) -> list[str]:
    """Where a config puts adapters, whatever the method (for ConfigUnion's overlap check). LoRA and
    (IA)^3 at one projection would share its weights' container (``loras``), so they collide too."""
    if isinstance(config, (LoRAConfig, _LycorisConfig)):
        roles = list(config.attn_matrices) if config.selfattn_lora else []
        roles += ["ffn_in"] * config.intermediate_lora + ["ffn_out"] * config.output_lora
        return [f"a LoRA/(IA)^3 adapter on the {_ROLE_NAMES[r]} projection ({r})" for r in roles]
    if isinstance(config, BnConfig):
        return [f"a bottleneck adapter at {loc}" for loc, on in (("mh", config.mh_adapter), ("output", config.output_adapter),
                                                                   ("the embedding output", bool(config.inv_adapter))) if on]
    where = {"prefix_tuning": "every attention", "prompt_tuning": "the embedding output", "reft": "the layers' outputs"}
    return [f"{config.architecture} at {where.get(config.architecture, 'its places')}"]


def _expect(field: str, value: Any, klass: type) -> Any:
    if value is not None and not isinstance(value, klass):
        raise ConfigError(f"{field} must be a {klass.__name__}, got {value!r}", field=field, value=value)
    return value


@dataclass(frozen=True, init=False)
class MAMConfig(ConfigUnion):
    """Mix-and-Match (He et al., 2021): prefix tuning (bottleneck 800) and a parallel adapter."""

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None, **kwargs: Any):
        if "configs" in kwargs:
            super().__init__(**kwargs)
            return
        super().__init__(_expect("prefix_tuning", prefix_tuning, PrefixTuningConfig) or PrefixTuningConfig(bottleneck_size=800),
                         _expect("adapter", adapter, BnConfig) or ParBnConfig(), **kwargs)


@dataclass(frozen=True, init=False)
class UniPELTConfig(ConfigUnion):
    """UniPELT (Mao et al., 2022): gated prefix tuning (length 10), Pfeiffer adapter and LoRA (r=8, alpha=2)."""

    def __init__(self, prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None,
                 lora: LoRAConfig | None = None, **kwargs: Any):
        if "configs" in kwargs:
            super().__init__(**kwargs)
            return
        super().__init__(_expect("prefix_tuning", prefix_tuning, PrefixTuningConfig) or PrefixTuningConfig(prefix_length=10, use_gating=True),
                         _expect("adapter", adapter, BnConfig) or SeqBnConfig(reduction_factor=16, use_gating=True),
                         _expect("lora", lora, LoRAConfig) or LoRAConfig(r=8, alpha=2, use_gating=True), **kwargs)


# AdapterHub's older names.
PfeifferConfig = SeqBnConfig
PfeifferInvConfig = SeqBnInvConfig
HoulsbyConfig = DoubleSeqBnConfig
HoulsbyInvConfig = DoubleSeqBnInvConfig
ParallelConfig = ParBnConfig

__all__ = ["AdapterConfig", *_CONFIG_CLASSES, "PfeifferConfig", "PfeifferInvConfig", "HoulsbyConfig", "HoulsbyInvConfig",
           "ParallelConfig", "CONFIGS", "resolve_config", "config_id"]


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
    # PEFT's LyCORIS methods (no AdapterHub id): fxadapt's own ids.
    "loha": LoHaConfig(),
    "lokr": LoKrConfig(),
    # AdapterHub 1.3.0's LoRA variants.
    "dora": DoRAConfig(),
    "vera": VeraConfig(),
    # AdapterHub 1.3.0's ReFT family.
    "loreft": LoReftConfig(),
    "noreft": NoReftConfig(),
    "direft": DiReftConfig(),
    "prompt_tuning": PromptTuningConfig(),
}


def resolve_config(config: AdapterConfig | str) -> AdapterConfig:
    """A config object, the default config of an id in ``CONFIGS``, or an AdapterHub config string:
    ids with changed fields in brackets, joined by ``|`` into a union
    (``"prefix_tuning[bottleneck_size=800]|parallel"``).

    >>> resolve_config("lora").r
    8
    >>> resolve_config("lora[r=4, alpha=16]|pfeiffer").configs[0].scaling
    4.0
    """
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        if config in CONFIGS:
            return CONFIGS[config]
        if "[" in config or "|" in config:
            return _parse_config_string(config)
        raise ConfigError(f"unknown config id {config!r}; valid ids: {', '.join(CONFIGS)}", field="config", value=config)
    raise ConfigError(f"config must be an AdapterConfig or one of {list(CONFIGS)}, got {type(config).__name__}", field="config", value=config)


# AdapterHub's config string: an id, then optionally ``[field=value, ...]`` with Python literal values.
_CONFIG_STRING = re.compile(r"(?P<name>[^\[\]|\n]+)(?:\[(?P<fields>.*)\])?")


def _parse_config_string(text: str) -> AdapterConfig:
    """AdapterHub's ``parse_adapter_config_string``: each ``|``-separated part is an id of ``CONFIGS``
    with its fields changed; several parts make a ConfigUnion. Values are read with
    ``ast.literal_eval`` (no code runs); a bad part, id, field or value is a ConfigError naming it."""
    parts = []
    for chunk in text.split("|"):
        match = _CONFIG_STRING.fullmatch(chunk.strip())
        if match is None:
            raise ConfigError(f"config string {text!r}: {chunk.strip()!r} is not `id` or `id[field=value, ...]`", field="config", value=text)
        name = match["name"].strip()
        if name not in CONFIGS:
            raise ConfigError(f"config string {text!r}: unknown config id {name!r}; valid ids: {', '.join(CONFIGS)}", field="config",
                              value=name)
        fields: dict[str, Any] = {}
        if match["fields"] and match["fields"].strip():
            try:
                fields = ast.literal_eval("{" + re.sub(r"(\w+)\s*=", r"'\1':", match["fields"]) + "}")
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise ConfigError(f"config string {text!r}: the fields of {name!r} are not field=value pairs of Python literals ({e})",
                                  field="config", value=match["fields"]) from None
        config = CONFIGS[name]
        known = {f.name for f in dataclasses.fields(config)}
        unknown = [k for k in fields if k not in known]
        if unknown:
            raise ConfigError(f"config string {text!r}: {type(config).__name__} has no field {unknown[0]!r}; its fields: {sorted(known)}",
                              field=unknown[0], value=fields[unknown[0]])
        parts.append(config.replace(**fields))
    return parts[0] if len(parts) == 1 else ConfigUnion(*parts)


def config_id(config: AdapterConfig | str) -> str:
    """The CONFIGS id whose default equals this config, else the architecture name."""
    if isinstance(config, str):
        return config
    for key, value in CONFIGS.items():
        if value == config:
            return key
    return config.architecture or type(config).__name__.lower()
