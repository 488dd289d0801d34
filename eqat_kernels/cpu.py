"""CPU inference through PyTorch's own int4 kernel (`aten._weight_int4pack_mm_for_cpu`).

That kernel computes `W = (q - 8) * scale + offset` per group of 32/64/128/256 features. Our
`(q - z) * s` maps onto it exactly with `scale = s`, `offset = (8 - z) * s`; 2- and 3-bit codes are
valid 4-bit codes. For 2/3 bits the codes are re-centred to `q - z + 8` (still in 0..15), so the offset
is exactly 0: a bf16 offset of `(8 - z) * s` would cancel against `(q - 8) * s` and cost 2-bit layers a
2% relative error (measured: 2.3e-2 vs 2.4e-3 at w2g64). Our group (or a partial last group, or g = -1) is served by the largest kernel
group size dividing both g and K, with scales repeated, so nothing is padded per call.
"""
from __future__ import annotations

import torch

from .packing import unpack_qweight, unpack_qzeros
from .spec import QuantSpec

CPU_GROUP_SIZES = (256, 128, 64, 32)
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpu_group_size(spec: QuantSpec) -> int:
    for size in CPU_GROUP_SIZES:
        if spec.group % size == 0 and spec.in_features % size == 0:
            return size
    raise ValueError(f"no int4 kernel group size divides group {spec.group} and K={spec.in_features}")


def repack_for_cpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, spec: QuantSpec,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """GPTQ-v2 tensors -> (int4-packed weight, scale-and-offset `[K/gc, N, 2]`, gc). Done once per layer."""
    gc = cpu_group_size(spec)
    codes = unpack_qweight(qweight, spec.bits, spec.in_features)  # [K, N]
    zeros = unpack_qzeros(qzeros, spec.bits, spec.out_features)  # [G, N]
    group_of_block = torch.arange(0, spec.in_features, gc) // spec.group  # our group of each kernel block
    s_blocks = scales.float()[group_of_block]
    if spec.bits <= 3:
        codes = codes - zeros.repeat_interleave(spec.group, dim=0)[: spec.in_features] + 8
        offsets = torch.zeros_like(s_blocks)
    else:
        offsets = (8 - zeros[group_of_block].float()) * s_blocks
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous().to(torch.int32), 1)
    scale_and_offset = torch.stack([s_blocks, offsets], dim=-1).to(dtype).contiguous()
    return packed, scale_and_offset, gc


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scale_and_offset: torch.Tensor, group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W_hat^T (+ bias)` for any leading shape of `x`; `scale_and_offset` must be in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scale_and_offset)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
