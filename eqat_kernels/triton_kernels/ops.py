"""Host-side launchers: validate, pick a config, allocate, launch. One function per kernel."""
from __future__ import annotations

import os

from typing import NamedTuple

import torch
import triton

from ..packing import split_3bit_planes
from ..spec import QuantSpec
from . import kernels
from .configs import (KernelConfig, decode_max_m, fit_block_k, fp16_in_place, gemm_tiling, half_pairs, k_ranges,
                      select_config, uses_dense)

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SM_COUNT_FALLBACK = 132  # off a GPU (the interpreter, AOT builds): an H100's
_CAPABILITY_FALLBACK = 90


def _dot_args(dtype: torch.dtype) -> dict:
    """fp32 activations get exact fp32 products (tf32 would miss the 1e-5 tolerance); under the CPU
    interpreter bf16 dot operands are upcast, working around its broken bf16 tl.dot."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": interpreting and dtype == torch.bfloat16}


def check_activation(x: torch.Tensor, spec: QuantSpec, features: int, what: str) -> torch.Tensor:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{what} dtype {x.dtype} unsupported: use float16, bfloat16 or float32")
    if x.shape[-1] != features:
        raise ValueError(f"{what} has {x.shape[-1]} features in its last dim, the layer expects {features}")
    return x.reshape(-1, features).contiguous()


class KernelWeight(NamedTuple):
    """Packed weight as the kernels read it: GPTQ-v2 qweight, or for 3 bits its two planes."""

    main: torch.Tensor
    high: torch.Tensor
    qzeros: torch.Tensor


def prepare_weight(qweight: torch.Tensor, qzeros: torch.Tensor, spec: QuantSpec) -> KernelWeight:
    """Once per layer (at load or pack time), never per call."""
    if spec.qweight_shape[0] * spec.qweight_shape[1] >= 2**31:  # kernels index packed words in int32
        raise ValueError(f"packed weight of {spec.qweight_shape[0]} x {spec.qweight_shape[1]} words exceeds the "
                         "kernels' int32 word indexing (2^31); split the layer")
    for name, t, shape in (("qweight", qweight, spec.qweight_shape), ("qzeros", qzeros, spec.qzeros_shape)):
        if tuple(t.shape) != shape or t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 {shape}, got {t.dtype} {tuple(t.shape)}")
    if spec.bits == 3:
        low, high = split_3bit_planes(qweight, spec.in_features)
        return KernelWeight(low, high, qzeros.contiguous())
    qweight = qweight.contiguous()
    return KernelWeight(qweight, qweight, qzeros.contiguous())


def check_packed(weight: KernelWeight, scales, spec: QuantSpec, device: torch.device) -> None:
    for name, t, shape, dtypes in (
        ("qzeros", weight.qzeros, spec.qzeros_shape, (torch.int32,)),
        ("scales", scales, spec.scales_shape, ACTIVATION_DTYPES),
    ):
        if tuple(t.shape) != shape or t.dtype not in dtypes:
            raise ValueError(f"{name} must be {shape} {dtypes}, got {tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if weight.main.device != device:
        raise ValueError(f"qweight is on {weight.main.device} but the activations are on {device}")


def _output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison it and catch unwritten elements."""
    return torch.empty(*shape, dtype=dtype, device=device)


def target_capability(device: torch.device) -> int:
    """Compute capability as major*10 + minor (90 for H100); what `configs.uses_dense` decides by."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return _CAPABILITY_FALLBACK


_TUNED_LOADED: set[int] = set()  # CUDA device indices whose GPU model's tuned file has been read


def _select(device: torch.device, kernel: str, *args, **kwargs) -> KernelConfig:
    """`select_config`, after adopting this GPU model's saved tuning winners on the device's first launch
    (later launches only test a set: no device query per call)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _TUNED_LOADED:
            _TUNED_LOADED.add(index)
            from .tuning import load_for_gpu  # tuning imports this module

            load_for_gpu(torch.cuda.get_device_name(index))
    return select_config(kernel, *args, **kwargs)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return SM_COUNT_FALLBACK


def dense_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` by the vendor BLAS: the second half of the large-M path (`configs.uses_dense`)."""
    return a @ b


DENSE_GW_BYTES = 256 * 2**20  # the fp32 x^T dy chunk of the dense scale-gradient path (whole groups)


def dense_matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` with fp32 output from fp16/bf16 inputs (cuBLAS accumulates in fp32 and writes fp32:
    `aten::mm.dtype`, CUDA only); elsewhere the same product computed in fp32."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


SPLIT_TICKETS: dict[tuple, torch.Tensor] = {}  # (device, stream) -> counters, see `_tickets`


def _tickets(device: torch.device, count: int) -> torch.Tensor:
    """Per-tile arrival counters of the split-K launches (`kernels.finish_split`), zero between launches
    (the last program of each tile resets its own), so they are allocated once per device and stream,
    never per call: a launch then costs no memset and can be captured in a CUDA graph. Streams get their
    own, as launches on two streams may run at once."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    tickets = SPLIT_TICKETS.get(key)
    if tickets is None or tickets.numel() < count:
        tickets = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        SPLIT_TICKETS[key] = tickets
    return tickets


def forward(x, weight: KernelWeight, scales, spec: QuantSpec, bias=None, config: KernelConfig | None = None):
    """`y = x @ W_hat^T (+ bias)`: split-K GEMV for M <= `configs.decode_max_m` (several rows per program), tiled
    GEMM (split along K when its tiles are too few to fill the GPU) above, dequantize + cuBLAS from
    `configs.DENSE_MIN_M` rows in fp16/bf16 where that is predicted faster."""
    x2 = check_activation(x, spec, spec.in_features, "x")
    check_packed(weight, scales, spec, x.device)
    m, n, k = x2.shape[0], spec.out_features, spec.in_features
    half = x.dtype != torch.float32
    capability = target_capability(x.device)
    in_place = fp16_in_place(capability, x.dtype == torch.float16)
    if config is None and uses_dense("forward", m, capability, half, spec.bits):
        y = dense_matmul(x2, dequantize(weight, scales, spec, x.dtype).t())
        if bias is not None:
            y += bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], n)
    y = _output(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bias = bias.contiguous() if bias is not None else None  # the kernels index it as a flat vector
    if config is not None:
        gemv = config.block_m < 16  # a given config names its kernel by its tile: below an mma tile is the GEMV
    else:
        gemv = m <= decode_max_m(spec.bits, spec.group, x.dtype != torch.float32)
    if gemv:
        cfg = config or _select(x.device, "decode", m, n, k, spec.bits, spec.group)
        bk = fit_block_k(cfg.block_k, spec.group)
        n_tiles, m_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m)
        split, k_per_split = k_ranges(k, bk, n_tiles * m_tiles, _sm_count(x.device), cfg)
        ws = _output(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
        kernels.decode_splitk_kernel[(n_tiles, split, m_tiles)](
            x2, *weight, scales, y if bias is None else bias, y, ws, _tickets(x.device, n_tiles * m_tiles),
            m, n, k, x2.stride(0), y.stride(0), k_per_split, GROUP=spec.group, BITS=spec.bits,
            HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
            HALF_PAIRS=half_pairs(in_place, spec.bits, cfg.block_m),
            EVEN=n % cfg.block_n == 0 and k % bk == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        cfg = config or _select(x.device, "gemm", m, n, k, spec.bits, spec.group, x.dtype == torch.float32)
        bk, sub_k, fragment = gemm_tiling(spec.bits, cfg.block_m, cfg.block_k, spec.group, x.dtype != torch.float32)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        split, k_per_split = k_ranges(k, bk, tiles, _sm_count(x.device), cfg)
        ws = _output(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
        kernels.gemm_fwd_kernel[(tiles, split)](
            x2, *weight, scales, y if bias is None else bias, y, ws, _tickets(x.device, tiles), m, n, k,
            x2.stride(0), y.stride(0), k_per_split, GROUP=spec.group, BITS=spec.bits, HAS_BIAS=bias is not None,
            **_dot_args(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
            GROUP_M=cfg.group_m, FRAGMENT=fragment, SUB_K=sub_k, EVEN_K=k % bk == 0,
            IN_PLACE=in_place,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y.reshape(*x.shape[:-1], n)


def grad_input(dy, weight: KernelWeight, scales, spec: QuantSpec, config: KernelConfig | None = None):
    """`dx = dy @ W_hat` (dequantize + cuBLAS from `configs.DENSE_MIN_M` rows in fp16/bf16)."""
    dy2 = check_activation(dy, spec, spec.out_features, "dy")
    check_packed(weight, scales, spec, dy.device)
    m, n, k = dy2.shape[0], spec.out_features, spec.in_features
    half = dy.dtype != torch.float32
    if config is None and uses_dense("grad_input", m, target_capability(dy.device), half, spec.bits):
        return dense_matmul(dy2, dequantize(weight, scales, spec, dy.dtype)).reshape(*dy.shape[:-1], k)
    dx = _output(m, k, dtype=dy.dtype, device=dy.device)
    if m:
        cfg = config or _select(dy.device, "grad_input", m, n, k, spec.bits, spec.group, dy.dtype == torch.float32)
        bk = fit_block_k(cfg.block_k, spec.group)
        kernels.grad_input_kernel[(triton.cdiv(m, cfg.block_m), triton.cdiv(k, bk))](
            dy2, *weight, scales, dx, m, n, k, dy2.stride(0), dx.stride(0),
            GROUP=spec.group, BITS=spec.bits, **_dot_args(dy.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return dx.reshape(*dy.shape[:-1], k)


def grad_scales(x, dy, weight: KernelWeight, scales, spec: QuantSpec, with_zeros: bool = False,
                config: KernelConfig | None = None):
    """`ds [G, N]` (and `dz` if asked) in fp32. Fused tiles never materialize the K x N weight gradient; from
    `configs.DENSE_MIN_M` rows (fp16/bf16) cuBLAS computes x^T dy in fp32 a chunk of whole groups at a time
    (at most `DENSE_GW_BYTES`, or one group) and the kernel weights and sums it per group."""
    x2 = check_activation(x, spec, spec.in_features, "x")
    dy2 = check_activation(dy, spec, spec.out_features, "dy")
    if x2.shape[0] != dy2.shape[0] or x.dtype != dy.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and dy {tuple(dy.shape)} {dy.dtype} do not match")
    check_packed(weight, scales, spec, x.device)
    m, n, k = x2.shape[0], spec.out_features, spec.in_features
    ds = _output(spec.num_groups, n, dtype=torch.float32, device=x.device)
    dz = _output(spec.num_groups, n, dtype=torch.float32, device=x.device) if with_zeros else ds
    half = x.dtype != torch.float32
    dense = config is None and uses_dense("grad_scales", m, target_capability(x.device), half, spec.bits)
    cfg = config or _select(x.device, "grad_scales_dense" if dense else "grad_scales", m, n, k, spec.bits,
                            spec.group, x.dtype == torch.float32)

    def launch(first_group: int, groups: int, gw) -> None:
        kernels.grad_scales_kernel[(triton.cdiv(n, cfg.block_n), groups)](
            x2, dy2, gw, *weight, scales, ds, dz, m, n, k, x2.stride(0), dy2.stride(0), first_group,
            GROUP=spec.group, BITS=spec.bits, COMPUTE_DZ=with_zeros, DENSE_GW=gw is not None, **_dot_args(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=fit_block_k(cfg.block_k, spec.group),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if not dense:
        launch(0, spec.num_groups, None)
        return ds, (dz if with_zeros else None)
    # x^T dy by cuBLAS (fp32 out) a chunk of whole groups at a time, so the fp32 K x N gradient never exists
    # whole; the kernel weights each chunk by (q - z) and sums it per group
    per_chunk = max(1, DENSE_GW_BYTES // (4 * spec.group * n))
    for first in range(0, spec.num_groups, per_chunk):
        groups = min(per_chunk, spec.num_groups - first)
        rows = slice(first * spec.group, min((first + groups) * spec.group, k))
        launch(first, groups, dense_matmul_fp32(x2[:, rows].t(), dy2))
    return ds, (dz if with_zeros else None)


def dequantize(weight: KernelWeight, scales, spec: QuantSpec, dtype: torch.dtype = torch.float16,
               config: KernelConfig | None = None):
    """Dense `W_hat [N, K]`."""
    check_packed(weight, scales, spec, weight.main.device)
    n, k = spec.out_features, spec.in_features
    w = _output(n, k, dtype=dtype, device=weight.main.device)
    cfg = config or _select(weight.main.device, "dequantize", 1, n, k, spec.bits, spec.group)
    bk = fit_block_k(cfg.block_k, spec.group)
    kernels.dequantize_kernel[(triton.cdiv(k, bk), triton.cdiv(n, cfg.block_n))](
        *weight, scales, w, n, k, GROUP=spec.group, BITS=spec.bits,
        BLOCK_N=cfg.block_n, BLOCK_K=bk, num_warps=cfg.num_warps,
    )
    return w
