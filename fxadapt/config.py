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

    >>> LoRAConfig(r=8, alpha=16).scaling
    2.0
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

    @property
    def scaling(self) -> float:
        """The factor applied to ``B A x`` (or to the (IA)^3 vector)."""
        if self.composition_mode == "scale":
            return float(self.alpha)
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

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
        if not (self.selfattn_lora and self.attn_matrices) and not self.intermediate_lora and not self.output_lora and not self.targets:
            self._fail("selfattn_lora", "selects no site: enable selfattn_lora with attn_matrices, intermediate_lora, output_lora or set targets")

    def _validate_targets(self) -> None:
        targets = self.targets
        if targets is None:
            return
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as e:
                self._fail("targets", f"is not a valid regular expression ({e})")
        elif not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
            self._fail("targets", "must be a regular expression or a non-empty list of module names")

    def matches_target(self, path: str) -> bool:
        """Whether a module path is selected by ``targets`` (regex: full match; list: suffix match)."""
        if self.targets is None:
            return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.targets)


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


_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {c.__name__: c for c in (LoRAConfig, IA3Config)}

#: AdapterHub's config ids and the default config each names.
CONFIGS: dict[str, AdapterConfig] = {
    "lora": LoRAConfig(),
    "ia3": IA3Config(),
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
