"""Measure the curated configs once on the real GPU and remember the winner per shape bucket.

Call `warmup` once per distinct layer shape before training or serving on a GPU (the CLI does not call
it: without it `select_config` takes the curated default); afterwards `select_config` only reads the
table, so a training step never times or recompiles anything new. Winners live for the process.
"""
from __future__ import annotations

import torch
import triton.testing

from ..spec import QuantSpec
from . import ops
from .configs import DECODE_MAX_M, bucket_key, candidates, record_tuned, uses_dense


def warmup(weight: ops.KernelWeight, scales: torch.Tensor, spec: QuantSpec, m_values=(1, 16, 64, 256, 2048),
           dtype: torch.dtype = torch.float16, backward: bool = False) -> dict[str, str]:
    """Time every candidate config of the forward (and dx/ds if `backward`) kernels; keep the fastest."""
    if scales.device.type != "cuda":
        raise RuntimeError("tuning times real kernels: it needs a CUDA device")
    chosen: dict[str, str] = {}
    for m in m_values:
        x = torch.randn(m, spec.in_features, dtype=dtype, device=scales.device)
        dy = torch.randn(m, spec.out_features, dtype=dtype, device=scales.device)
        cc, half = ops.target_capability(scales.device), dtype != torch.float32
        # forward and dx run none of our tiles where they take dequantize + cuBLAS
        jobs = [] if uses_dense("forward", m, cc, half) else [
            ("decode" if m <= DECODE_MAX_M else "gemm", lambda c: ops.forward(x, weight, scales, spec, config=c))]
        if backward:
            if not uses_dense("grad_input", m, cc, half):
                jobs += [("grad_input", lambda c: ops.grad_input(dy, weight, scales, spec, config=c))]
            jobs += [("grad_scales", lambda c: ops.grad_scales(x, dy, weight, scales, spec, config=c))]
        for kernel, run in jobs:
            exact = dtype == torch.float32
            timings = {cfg: triton.testing.do_bench(lambda: run(cfg)) for cfg in candidates(kernel, m, exact, spec.bits)}
            best = min(timings, key=timings.get)
            key = bucket_key(kernel, m, spec.out_features, spec.in_features, spec.bits, spec.group, exact)
            record_tuned(key, best)
            chosen[key] = f"{best} {timings[best] * 1e3:.1f} us"
    return chosen
