"""Model-level API: put QuantLinear in place of every eligible nn.Linear of any module tree."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .linear import QuantLinear


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name` inside `root` (the one place modules are swapped); returns `new`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
    return new


def quantize_linears(model: nn.Module, bits: int, group_size: int,
                     include: Callable[[str, nn.Linear], bool] | None = None) -> dict[str, QuantLinear]:
    """Replace each `nn.Linear` (for which `include(name, module)` holds) by a trainable QuantLinear, in place."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (include is None or include(name, m))]
    return {name: replace_module(model, name, QuantLinear.from_linear(linear, bits, group_size))
            for name, linear in targets}


def pack_all(model: nn.Module) -> int:
    """Pack every trainable QuantLinear of `model`; returns how many were packed."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and not m.is_packed]
    for layer in layers:
        layer.pack()
    return len(layers)
