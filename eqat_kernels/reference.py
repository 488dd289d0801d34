"""Plain-PyTorch forward, dx, ds and dequantize on the packed format: the oracle for every kernel.

Slow on purpose (it unpacks on every call); it computes in the dtype it is given, so tests call it in
float64 to get the reference the kernels are held to.
"""
from __future__ import annotations

import torch

from .packing import unpack_qweight, unpack_qzeros
from .quantizer import expand_groups
from .spec import QuantSpec


def codes_minus_zeros(qweight: torch.Tensor, qzeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`(q - z)` as `[N, K]` int32: the part of `W_hat` that stays fixed while scales train."""
    q = unpack_qweight(qweight, spec.bits, spec.in_features).t()
    z = unpack_qzeros(qzeros, spec.bits, spec.out_features)
    return q - expand_groups(z, spec)


def compact_codes_minus_zeros(qweight: torch.Tensor, qzeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`codes_minus_zeros` in the smallest integer type that holds it (|q - z| <= qmax): what a training path
    caches per layer."""
    small = torch.int8 if spec.qmax <= torch.iinfo(torch.int8).max else torch.int16
    return codes_minus_zeros(qweight, qzeros, spec).to(small)


def dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense `W_hat = (q - z) * s`, shape `[N, K]`."""
    return scale_codes(codes_minus_zeros(qweight, qzeros, spec), scales, spec, dtype)


def scale_codes(cmz: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """`W_hat` from precomputed `(q - z)`: what a cached CPU training path recomputes per step."""
    return cmz.to(dtype) * expand_groups(scales.to(dtype), spec)


def forward(x, qweight, qzeros, scales, spec: QuantSpec, bias=None) -> torch.Tensor:
    """`y = x @ W_hat^T (+ bias)` over the last dim of `x`."""
    y = x @ dequantize(qweight, qzeros, scales, spec, x.dtype).t()
    return y if bias is None else y + bias.to(x.dtype)


def grad_input(dy, qweight, qzeros, scales, spec: QuantSpec) -> torch.Tensor:
    """`dx = dy @ W_hat`."""
    return dy @ dequantize(qweight, qzeros, scales, spec, dy.dtype)


def group_sum(values_nk: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Sum `[N, K]` over each group's features -> `[G, N]` (partial last group included)."""
    pad = spec.num_groups * spec.group - spec.in_features
    v = torch.nn.functional.pad(values_nk, (0, pad)) if pad else values_nk
    return v.reshape(spec.out_features, spec.num_groups, spec.group).sum(-1).t()


def grad_scales(x, dy, qweight, qzeros, scales, spec: QuantSpec, with_zeros: bool = False):
    """`ds[g, n] = sum_{k in g} (q - z)[n, k] * (dy^T x)[n, k]`; with `with_zeros`, also `dz = -s * sum (dy^T x)`."""
    return grad_scales_from_codes(x, dy, codes_minus_zeros(qweight, qzeros, spec), scales, spec, with_zeros)


def grad_scales_from_codes(x, dy, cmz: torch.Tensor, scales, spec: QuantSpec, with_zeros: bool = False):
    """`grad_scales` from cached `(q - z)`. The dense `dW = dy^T x` runs in x's dtype (bf16 under autocast:
    the step's largest matmul); the products with `(q - z)` and the group sums in fp32 (fp64 stays fp64)."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    grad_w = dy2.t() @ x2  # [N, K]: the dense weight gradient the Triton kernel never builds
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_w = grad_w.to(compute)
    ds = group_sum(cmz.to(compute) * grad_w, spec)
    if not with_zeros:
        return ds, None
    return ds, -scales.to(compute) * group_sum(grad_w, spec)
