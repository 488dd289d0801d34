"""Shared test helpers: random packed layers and error measures."""
import torch

from eqat_kernels import packing
from eqat_kernels.spec import QuantSpec


def random_packed(spec: QuantSpec, generator: torch.Generator | None = None):
    """Fresh random codes, zeros and fp16 scales in the storage format: (qweight, qzeros, scales)."""
    g = generator or torch.Generator().manual_seed(torch.seed() % 2**31)
    codes = torch.randint(0, spec.qmax + 1, (spec.in_features, spec.out_features), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, spec.qmax + 1, spec.scales_shape, generator=g, dtype=torch.int32)
    scales = (torch.rand(spec.scales_shape, generator=g) * 0.02 + 0.005).half()
    return packing.pack_qweight(codes, spec.bits), packing.pack_qzeros(zeros, spec.bits), scales


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values in the result (unwritten or overflowed)"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
