"""The autograd Function of packed QuantLinear: forward, dx and fused ds from one compute path.

A path is an object with `forward`, `grad_input` and `grad_scales`; the module picks it by device
(Triton kernels on CUDA, cached reference math for CPU training). Codes and zero points are frozen,
so the only gradients are w.r.t. the input, the scales and the bias.
"""
from __future__ import annotations

from typing import Protocol

import torch

from . import reference
from .spec import QuantSpec


class ComputePath(Protocol):
    def forward(self, x: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                keep_for_backward: bool = False) -> torch.Tensor: ...
    def grad_input(self, dy: torch.Tensor, scales: torch.Tensor) -> torch.Tensor: ...
    def grad_scales(self, x: torch.Tensor, dy: torch.Tensor, scales: torch.Tensor) -> torch.Tensor: ...


class TritonPath:
    """The fused GPU kernels; works on CPU tensors only under TRITON_INTERPRET=1 (tests)."""

    def __init__(self, weight, spec: QuantSpec):
        from .triton_kernels import ops  # imported lazily: CPU inference never needs Triton

        self.ops, self.weight, self.spec = ops, weight, spec

    def forward(self, x, scales, bias, keep_for_backward=False):
        return self.ops.forward(x, self.weight, scales, self.spec, bias)

    def grad_input(self, dy, scales):
        return self.ops.grad_input(dy, self.weight, scales, self.spec)

    def grad_scales(self, x, dy, scales):
        return self.ops.grad_scales(x, dy, self.weight, scales, self.spec)[0]


class ReferencePath:
    """CPU training: dense `(q - z)` is cached once (`reference.compact_codes_minus_zeros`), `W_hat` is rebuilt
    from the current scales."""

    def __init__(self, codes_minus_zeros: torch.Tensor, spec: QuantSpec):
        self.cmz, self.spec = codes_minus_zeros, spec
        self._held: tuple | None = None  # W_hat of a training forward, reused once by its backward

    def _weight(self, scales, dtype):
        key = (scales.data_ptr(), scales._version, dtype)
        if self._held is not None and self._held[0] == key:
            return self._held[1]
        return reference.scale_codes(self.cmz, scales, self.spec, dtype)

    def forward(self, x, scales, bias, keep_for_backward=False):
        w = self._weight(scales, x.dtype)
        # Keep W_hat for dx only when a backward will ask for it (one tensor per layer, freed by grad_input).
        self._held = ((scales.data_ptr(), scales._version, x.dtype), w) if keep_for_backward else None
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))

    def grad_input(self, dy, scales):
        w = self._weight(scales, dy.dtype)
        self._held = None
        return dy @ w

    def grad_scales(self, x, dy, scales):
        return reference.grad_scales_from_codes(x, dy, self.cmz, scales, self.spec)[0]


class QuantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scales, bias, path: ComputePath):
        ctx.save_for_backward(x, scales)
        ctx.path = path
        # grad mode is off inside an autograd Function's forward: whether dx will be asked for is needs_input_grad
        return path.forward(x, scales, bias, keep_for_backward=ctx.needs_input_grad[0])

    @staticmethod
    def backward(ctx, dy):
        x, scales = ctx.saved_tensors
        dy = dy.to(x.dtype)  # autocast may hand back a gradient in another dtype
        need_x, need_s, need_b, _ = ctx.needs_input_grad
        dx = ctx.path.grad_input(dy, scales) if need_x else None
        ds = ctx.path.grad_scales(x, dy, scales).to(scales.dtype) if need_s else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if need_b else None
        return dx, ds, db, None
