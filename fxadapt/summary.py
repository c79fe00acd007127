"""The adapter_summary table, in AdapterHub's format (the seed's table)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["SummaryRow", "format_summary"]

_HEADER = ("name", "architecture", "#param", "%param", "active", "train")
_WIDTH = 80
_HEAD = "{:<25}{:<15}{:>12}{:>12}{:>8}{:>8}"
_ROW = "{:<25}{:<15}{:>12,}{:>12.3f}{:>8}{:>8}"


@dataclass(frozen=True)
class SummaryRow:
    name: str
    architecture: str
    params: int
    active: bool
    train: bool


def format_summary(rows: list[SummaryRow], base_params: int, base_train: bool, as_dict: bool = False) -> str | list[dict]:
    """The table (or its rows as dicts): one line per adapter, then the base model ("Full model").

    ``%Param`` is relative to the base model without adapters; Active and Train print as 0/1.
    """
    records = [{**asdict(r), "%param": 100.0 * r.params / base_params if base_params else 0.0} for r in rows]
    if as_dict:
        return records + [{"name": "Full model", "params": base_params, "%param": 100.0, "train": base_train}]
    lines = ["=" * _WIDTH, _HEAD.format(*(h.title() for h in _HEADER)), "-" * _WIDTH]
    for r in records:
        lines.append(_ROW.format(r["name"], r["architecture"], r["params"], r["%param"], int(r["active"]), int(r["train"])))
    lines.append("-" * _WIDTH)
    lines.append(_ROW.format("Full model", "", base_params, 100.0, "", int(base_train)))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
