"""The quantizer of docs/DESIGN.md section 1: min-max init, fake quant with straight-through rounding.

Weights are `[N, K]` (out, in) like `nn.Linear.weight`; scales and zeros are `[G, N]` like the storage
format, so the trainable state packs without transposes.
"""
from __future__ import annotations

import torch

from .spec import QuantSpec

SCALE_MIN, SCALE_MAX = 1e-4, 1e4


def check_finite_weight(weight: torch.Tensor, what: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"{what} has {bad} NaN/Inf values: refusing to quantize non-finite weights")


def expand_groups(per_group: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`[G, N]` -> `[N, K]`: each group's value repeated over its features; the last group may be partial."""
    return per_group.t().repeat_interleave(spec.group, dim=1)[:, : spec.in_features]


def _group_view(weight: torch.Tensor, spec: QuantSpec, pad_value: float) -> torch.Tensor:
    """`[N, K]` -> `[N, G, g]`, padding the partial last group with `pad_value`."""
    padded_k = spec.num_groups * spec.group
    if padded_k != spec.in_features:
        weight = torch.nn.functional.pad(weight, (0, padded_k - spec.in_features), value=pad_value)
    return weight.reshape(spec.out_features, spec.num_groups, spec.group)


def _group_range(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of `[N, K]` weights, `[N, G, 1]` each (padding never counts)."""
    return (_group_view(w, spec, float("inf")).amin(dim=-1, keepdim=True),
            _group_view(w, spec, float("-inf")).amax(dim=-1, keepdim=True))


def range_scale_zero(wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec,
                      ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max grid of the range shrunk by `ratio`: `s = clamp((max-min)*r/qmax)`, `z = round(-min*r/s)`."""
    scales = ((wmax - wmin) * ratio / spec.qmax).clamp(SCALE_MIN, SCALE_MAX)
    return scales, torch.round(-wmin * ratio / scales)


def minmax_init(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group asymmetric min-max: `s = clamp((max-min)/qmax)`, `z = round(-min/s)`; both `[G, N]` fp32."""
    check_finite_weight(weight)
    scales, zeros = range_scale_zero(*_group_range(weight.detach().float(), spec), spec)
    return scales.squeeze(-1).t().contiguous(), zeros.squeeze(-1).t().contiguous()


def clip_search_init(
    weight: torch.Tensor, spec: QuantSpec, ratios: int = 20, min_ratio: float = 0.5,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min-max shrunk by the ratio in `[min_ratio, 1]` that minimises the group's rounding error.

    Why: at 2 bits min-max spends most of the 4 levels on a group's one or two extreme weights; clipping
    them lowers the error of all the others (the grid search of AWQ/OmniQuant's init). `importance`
    (`[K]`, e.g. the mean squared input of each feature) weighs the error by how much each input feature
    contributes to the layer's output. Returns `[G, N]` fp32 like `minmax_init`; ratio 1 is min-max.
    """
    check_finite_weight(weight)
    weight = weight.detach().float()
    w = _group_view(weight, spec, 0.0)
    wmin, wmax = _group_range(weight, spec)
    weigh = torch.ones(spec.num_groups * spec.group, device=w.device)
    if importance is not None:
        if importance.shape != (spec.in_features,):
            raise ValueError(f"importance must have shape ({spec.in_features},), got {tuple(importance.shape)}")
        weigh[: spec.in_features] = importance.float().clamp_min(0)
    weigh[spec.in_features:] = 0.0  # padding of a partial last group counts for nothing
    weigh = weigh.reshape(1, spec.num_groups, spec.group)
    best_err = torch.full(wmax.shape, float("inf"), device=w.device)
    best_s, best_z = torch.ones_like(wmax), torch.zeros_like(wmax)
    for r in torch.linspace(1.0, min_ratio, ratios).tolist():
        s, z = range_scale_zero(wmin, wmax, spec, r)
        z = z.clamp(0, spec.qmax)
        w_hat = (torch.clamp(torch.round(w / s) + z, 0, spec.qmax) - z) * s
        err = ((w - w_hat).pow(2) * weigh).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s.squeeze(-1).t().contiguous(), best_z.squeeze(-1).t().contiguous()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return (x.round() - x).detach() + x


def fake_quantize(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """`W_hat = (clamp(round(W/s') + z', 0, qmax) - z') * s'`, differentiable in W, s and z (LSQ+ gradients)."""
    s = expand_groups(scales.clamp(SCALE_MIN, SCALE_MAX), spec)
    z = expand_groups(round_ste(zeros).clamp(0, spec.qmax), spec)
    q = torch.clamp(round_ste(weight / s) + z, 0, spec.qmax)
    return (q - z) * s


def quantize_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes `[K, N]` (storage orientation) and integer zeros `[G, N]`, both int32."""
    check_finite_weight(weight)
    s = scales.detach().float().clamp(SCALE_MIN, SCALE_MAX)
    z = zeros.detach().float().round().clamp(0, spec.qmax)
    q = torch.clamp(torch.round(weight.detach().float() / expand_groups(s, spec)) + expand_groups(z, spec), 0, spec.qmax)
    return q.t().to(torch.int32).contiguous(), z.to(torch.int32)
