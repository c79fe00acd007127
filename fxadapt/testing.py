"""Helpers to property-test rewrites: hypothesis strategies for configs, and output comparison.

>>> import torch, fxadapt
>>> from fxadapt.testing import assert_equivalent
>>> m = torch.nn.Linear(4, 4)
>>> assert_equivalent(fxadapt.capture(m, (torch.randn(2, 4),)), m, (torch.randn(3, 4),))

The strategies need ``hypothesis`` (``pip install fxadapt[test]``)::

    from hypothesis import given
    from fxadapt.testing import lora_configs

    @given(lora_configs())
    def test_zero_init_is_base(config):
        gm = fxadapt.rewrite(model, config)
        assert_equivalent(gm, model, inputs)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .config import IA3Config, LoRAConfig

__all__ = ["assert_equivalent", "assert_outputs_close", "rounding_tolerance", "relative_error", "snapshot", "assert_unchanged", "lora_configs", "ia3_configs", "adapter_configs", "adapter_names"]


def _leaves(output: Any) -> list[torch.Tensor]:
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        output = output.to_tuple()
    return [x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor)]


def rounding_tolerance(dtype: torch.dtype, reduction: int, depth: int = 1, safety: float = 8.0) -> float:
    """A relative tolerance for two computations of one function in ``dtype`` that round differently
    (a merged weight against the unmerged sum, another summation order, another BLAS or thread count).

    Each sum of ``reduction`` rounded products is off by about ``eps * sqrt(reduction)`` of its scale
    (errors of random sign add in quadrature); ``depth`` such sums chained (layers) add up; ``safety``
    covers what the layers between amplify (normalisations, softmax). Compare with
    ``atol = tolerance * max|expected|``, as :func:`assert_outputs_close` does.

    >>> round(rounding_tolerance(torch.float32, 64, depth=2), 7)
    1.53e-05
    """
    return safety * depth * torch.finfo(dtype).eps * reduction ** 0.5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``: a difference on the scale of the values compared.

    >>> round(relative_error(torch.tensor([100.0, 1.0]), torch.tensor([100.0, 1.01])), 6)
    0.0001
    """
    expected = expected.detach().double()
    scale = expected.abs().max().item()
    difference = (actual.detach().double() - expected).abs().max().item()
    return difference / scale if scale else difference


def assert_outputs_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float | None = None, mask: torch.Tensor | None = None) -> None:
    """Assert two model outputs (tensors, tuples, ModelOutputs) have the same type and close tensors.

    Tolerances are relative to the values compared: each element may differ by ``rtol`` of itself plus
    ``atol``, which defaults to ``rtol`` times the largest magnitude in that expected tensor (so elements
    near zero are judged on the tensor's scale, on any CPU or BLAS). Tensors that are not floating
    point compare exactly. Pass ``rtol`` for half precision or long reductions
    (:func:`rounding_tolerance`).

    ``mask`` (batch, seq), e.g. an attention mask, zeroes padded positions of (batch, seq, ...)
    tensors before comparing, since implementations may differ there.
    """
    assert type(actual) is type(expected), f"output types differ: {type(actual).__name__} != {type(expected).__name__}"
    a, e = _leaves(actual), _leaves(expected)
    assert len(a) == len(e), f"outputs hold {len(a)} and {len(e)} tensors"
    for i, (x, y) in enumerate(zip(a, e)):
        if mask is not None and x.ndim >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
            m = mask.reshape(*mask.shape, *([1] * (x.ndim - 2))).to(x.dtype)
            x, y = x * m, y * m
        if not y.is_floating_point():
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda msg: f"output tensor {i}: {msg}")
            continue
        tol = rtol * y.detach().abs().max().item() if atol is None and y.numel() else (atol or 0.0)
        torch.testing.assert_close(x, y, rtol=rtol, atol=tol, msg=lambda msg: f"output tensor {i}: {msg}")


def assert_equivalent(actual: torch.nn.Module, expected: torch.nn.Module, inputs: dict | tuple, *, rtol: float = 1e-5,
                      atol: float | None = None) -> None:
    """Run both modules on the same inputs (a tuple of args or a dict of kwargs), without
    gradients, and assert their outputs match (padded positions ignored when the inputs have an
    ``attention_mask``), relative to the expected values' magnitude as in :func:`assert_outputs_close`."""
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
    with torch.no_grad():
        a, e = actual(*args, **kwargs), expected(*args, **kwargs)
    assert_outputs_close(a, e, rtol=rtol, atol=atol, mask=kwargs.get("attention_mask"))


def snapshot(module: torch.nn.Module) -> dict[str, Any]:
    """Everything a failed operation must leave as it was: every parameter and buffer (keys,
    values bit for bit, dtypes, ``requires_grad``), the training flag, the generated code and,
    on an ``AdaptedModule``, its adapters, their configs, the active and merged ones.
    Compare with :func:`assert_unchanged`."""
    state = {k: (v.detach().clone(), v.dtype, v.requires_grad) for k, v in module.state_dict(keep_vars=True).items()}
    adapters = getattr(module, "adapters", None)
    return {
        "state": state,
        "parameters": sorted(k for k, _ in module.named_parameters(remove_duplicate=False)),
        "modules": sorted(k for k, _ in module.named_modules(remove_duplicate=False)),
        "training": [m.training for m in module.modules()],
        "code": getattr(module, "code", None),
        "adapters": dict(adapters) if isinstance(adapters, dict) else None,
        "active": list(getattr(module, "active_adapters", []) or []),
        "merged": list(getattr(module, "merged_adapters", []) or []),
    }


def assert_unchanged(module: torch.nn.Module, before: dict[str, Any]) -> None:
    """Assert ``module`` is bit for bit as :func:`snapshot` saw it."""
    after = snapshot(module)
    for key in ("parameters", "modules", "training", "code", "adapters", "active", "merged"):
        assert after[key] == before[key], f"{key} changed: {before[key]!r} -> {after[key]!r}"
    assert after["state"].keys() == before["state"].keys(), f"state_dict keys changed: {sorted(after['state'].keys() ^ before['state'].keys())}"
    for k, (value, dtype, grad) in before["state"].items():
        new, new_dtype, new_grad = after["state"][k]
        assert (new_dtype, new_grad) == (dtype, grad), f"{k}: dtype/requires_grad {dtype}/{grad} -> {new_dtype}/{new_grad}"
        assert new.shape == value.shape and torch.equal(new, value) or (new.is_floating_point() and torch.equal(new.isnan(), value.isnan())
                                                                        and torch.equal(new.nan_to_num(), value.nan_to_num())), f"{k} changed"


def _st():
    try:
        from hypothesis import strategies
    except ImportError as e:  # pragma: no cover
        raise ImportError("fxadapt.testing strategies need hypothesis: pip install 'fxadapt[test]'") from e
    return strategies


def lora_configs(*, layers: int = 2, max_r: int = 8, init_weights=("lora", "bert")):
    """LoRAConfigs over sites, rank, alpha, rsLoRA, init and leave_out (dropout 0: deterministic)."""
    st = _st()

    @st.composite
    def build(draw):
        matrices = draw(st.lists(st.sampled_from(["q", "k", "v", "o"]), unique=True, max_size=4))
        intermediate, output = draw(st.booleans()), draw(st.booleans())
        if not matrices and not intermediate and not output:
            matrices = ["q"]
        leave_out = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers - 1))
        return LoRAConfig(
            selfattn_lora=bool(matrices), attn_matrices=matrices or ["q", "v"], intermediate_lora=intermediate, output_lora=output,
            r=draw(st.integers(1, max_r)), alpha=draw(st.sampled_from([1, 2, 8, 16])), use_rslora=draw(st.booleans()),
            init_weights=draw(st.sampled_from(list(init_weights))), leave_out=sorted(leave_out),
        )

    return build()


def ia3_configs(*, layers: int = 2):
    """IA3Configs over sites and leave_out."""
    st = _st()

    @st.composite
    def build(draw):
        matrices = draw(st.lists(st.sampled_from(["q", "k", "v", "o"]), unique=True, max_size=4))
        intermediate, output = draw(st.booleans()), draw(st.booleans())
        if not matrices and not intermediate and not output:
            intermediate = True
        leave_out = draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers - 1))
        return IA3Config(selfattn_lora=bool(matrices), attn_matrices=matrices or ["k", "v"], intermediate_lora=intermediate,
                         output_lora=output, leave_out=sorted(leave_out))

    return build()


def adapter_configs(*, layers: int = 2):
    """Any config fxadapt can merge: LoRA or (IA)^3."""
    st = _st()
    return st.one_of(lora_configs(layers=layers), ia3_configs(layers=layers))


def adapter_names():
    """Valid adapter names."""
    st = _st()
    return st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
