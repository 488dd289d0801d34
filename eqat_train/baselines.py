"""Baselines through the same block driver, quantizer and packer: RTN (min-max) and GPTQ."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqat_kernels import QuantLinear, quantizer

from .activations import INFER_BATCH, ActivationStore, BlockContext, observe_linear_inputs
from .blockwise import BlockData, BlockwiseConfig
from .models import swap_in_trainable
from .configs import option


@dataclass
class RTNConfig(BlockwiseConfig):
    """Round to nearest: per-group min-max scales and zero points, no data."""

    method = "rtn"
    needs_inputs = False

    def quantize_block(self, data: BlockData) -> dict:
        for m in swap_in_trainable(data.block, self.bits, self.group_size).values():
            m.pack()
        return {}


@dataclass
class GPTQConfig(BlockwiseConfig):
    """GPTQ: column-by-column rounding with the Hessian of the layer's calibration inputs."""

    method = "gptq"
    needs_targets = False

    damp: float = option(0.01, "GPTQ dampening, relative to the mean Hessian diagonal")

    def quantize_block(self, data: BlockData) -> dict:
        hessians = _hessians(data.block, data.ctx, data.inputs, INFER_BATCH, data.bf16)
        for name, layer in swap_in_trainable(data.block, self.bits, self.group_size).items():
            gptq_quantize(layer, hessians[name], self.damp)
        return {}


@torch.no_grad()
def _hessians(block: nn.Module, ctx: BlockContext, q_in: ActivationStore, batch: int,
              bf16: bool = False) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T of every linear's input, from the block run on the quantized-path inputs.

    Accumulated in fp32 per batch (fp64 sums across batches); layers fed the same tensor (q/k/v,
    gate/up) share one product instead of recomputing it."""
    hs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: dict = {}

    def accumulate(name: str, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1]).float()
        if last.get("input") is not inp:  # holding the tensor keeps its address from being reused
            last["input"], last["xtx"] = inp, (x.t() @ x).double()
        hs[name] = hs.get(name, 0) + 2 * last["xtx"]
        counts[name] = counts.get(name, 0) + x.shape[0]

    observe_linear_inputs(block, ctx, q_in, batch, accumulate, bf16=bf16)
    return {n: hs[n] / max(counts[n], 1) for n in hs}


@torch.no_grad()
def gptq_quantize(layer: QuantLinear, hessian: torch.Tensor, damp: float, block: int = 128) -> None:
    """GPTQ (Frantar et al.) on a trainable QuantLinear: per-group min-max scales computed on the
    error-updated weights as each group starts, codes with our quantizer; then pack()."""
    spec = layer.spec
    w = layer.weight.detach().double().clone()  # [N, K]
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, damp)
    scales = torch.empty(spec.scales_shape, dtype=torch.float64)
    zeros = torch.empty(spec.scales_shape, dtype=torch.float64)
    k_total = spec.in_features
    for b0 in range(0, k_total, block):
        b1 = min(b0 + block, k_total)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            g = col // spec.group
            if col % spec.group == 0:
                g_end = min(col + spec.group, k_total)
                seg = torch.cat([w1[:, j:], w[:, b1:g_end]], dim=1)[:, : g_end - col]
                # GPTQ's range always includes 0
                scales[g], zeros[g] = quantizer.range_scale_zero(seg.amin(1).clamp_max(0), seg.amax(1).clamp_min(0), spec)
            s, z = scales[g], zeros[g]
            q = torch.clamp(torch.round(w1[:, j] / s) + z, 0, spec.qmax)
            deq = (q - z) * s
            e = (w1[:, j] - deq) / hinv1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * hinv1[j, j:].unsqueeze(0)
            w1[:, j] = deq
            err[:, j] = e
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    layer.weight.data.copy_(w.to(layer.weight.dtype))
    layer.scales.data.copy_(scales.float())
    layer.zeros.data.copy_(zeros.float())
    layer.pack()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 with GPTQ's relative dampening, raised tenfold while H is not
    positive definite (low-precision activations can leave it just short)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(4):
        try:
            damped = h + damp * 10**attempt * torch.mean(torch.diag(h)) * eye
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("GPTQ: the layer's Hessian is not positive definite even with 1000x dampening "
                     "(calibration activations degenerate?)")
