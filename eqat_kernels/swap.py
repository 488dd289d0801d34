"""Model-level API: put QuantLinear in place of every eligible nn.Linear of any module tree."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .linear import QuantLinear


def quantize_linears(model: nn.Module, bits: int, group_size: int,
                     include: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, QuantLinear]:
    """Replace each `nn.Linear` (for which `include(name, module)` holds) by a trainable QuantLinear, in place."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (include is None or include(name, m))]
    replaced = {}
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replaced[name] = QuantLinear.from_linear(linear, bits, group_size)
        setattr(parent, child, replaced[name])
    return replaced


def pack_all(model: nn.Module) -> int:
    """Pack every trainable QuantLinear of `model`; returns how many were packed."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.is_packed]
    for layer in layers:
        layer.pack()
    return len(layers)
