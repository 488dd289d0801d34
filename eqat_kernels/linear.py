"""QuantLinear: the drop-in `nn.Linear` replacement, in two states (docs/DESIGN.md, section 6).

* trainable (Block-AP): fp `weight`, `scales`, `zeros` are parameters; forward is fake quantization.
* packed (E2E-QP, inference): `qweight`/`qzeros` buffers and a `scales` parameter (frozen unless
  E2E-QP trains it); `state_dict()` is exactly the GPTQ-v2 storage format.

Packed dispatch by device: Triton kernels on CUDA; on CPU, torch's int4 kernel for inference and a
cached reference path when gradients are needed. Repacked forms are cached, never rebuilt per call.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import cpu, quantizer, reference
from .autograd import QuantLinearFunction, ReferencePath, TritonPath
from .packing import pack_qweight, pack_qzeros, unpack_qweight
from .spec import QuantSpec

BACKENDS = ("auto", "triton", "cpu_int4", "reference")


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.float16, device: torch.device | str | None = None, g_idx: bool = False):
        """An empty packed layer of the given shape, ready for `load_state_dict` (as when loading a checkpoint).

        `g_idx=True` adds GPTQ's per-feature group index (act-order checkpoints): the layer then sorts its
        input features by group once, in its caches, and permutes activations, so kernels see plain groups.
        """
        super().__init__()
        self.spec = QuantSpec(bits, group_size, in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.backend = "auto"
        self._cache: dict[str, object] = {}
        self.register_buffer("qweight", torch.zeros(self.spec.qweight_shape, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(self.spec.qzeros_shape, dtype=torch.int32, device=device))
        self.scales = nn.Parameter(torch.ones(self.spec.scales_shape, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.weight = self.zeros = None
        if g_idx:
            self.register_buffer("g_idx", (torch.arange(in_features, device=device) // self.spec.group).to(torch.int32))
        else:
            self.g_idx = None

    # ----- states -------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, init: str = "minmax",
                    importance: torch.Tensor | None = None) -> "QuantLinear":
        """Trainable fake-quant layer initialised from `linear`: per-group min-max, or ("clip") the
        min-max shrunk per group to the least (importance-weighted) rounding error."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        quantizer.check_finite_weight(w, "linear.weight")
        layer = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device)
        if init == "minmax":
            scales, zeros = quantizer.minmax_init(w, layer.spec)
        elif init == "clip":
            scales, zeros = quantizer.clip_search_init(w, layer.spec, importance=importance)
        else:
            raise ValueError(f"init must be 'minmax' or 'clip', got {init!r}")
        del layer.qweight, layer.qzeros
        layer.weight = nn.Parameter(w.detach().clone())
        layer.scales = nn.Parameter(scales)
        layer.zeros = nn.Parameter(zeros)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    @property
    def is_packed(self) -> bool:
        return self.weight is None

    @torch.no_grad()
    def pack(self, scales_dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Round zeros, quantize W to integer codes, freeze: trainable -> packed (in place)."""
        if self.is_packed:
            raise RuntimeError("layer is already packed")
        codes, zeros = quantizer.quantize_codes(self.weight, self.scales, self.zeros, self.spec)
        scales = self.scales.detach().clamp(quantizer.SCALE_MIN, quantizer.SCALE_MAX).to(scales_dtype)
        device = self.weight.device
        del self.weight, self.zeros, self.scales
        self.weight = self.zeros = None
        self.register_buffer("qweight", pack_qweight(codes, self.spec.bits).to(device))
        self.register_buffer("qzeros", pack_qzeros(zeros, self.spec.bits).to(device))
        self.scales = nn.Parameter(scales, requires_grad=False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._cache.clear()
        return self

    def train_scales(self, enabled: bool = True, dtype: torch.dtype | None = None) -> "QuantLinear":
        """E2E-QP: only the scales of a packed layer learn; `dtype` re-stores them (fp32 master scales while
        training, the checkpoint's fp16 after)."""
        if not self.is_packed:
            raise RuntimeError("train_scales applies to packed layers; call pack() first")
        if dtype is not None and self.scales.dtype != dtype:
            self.scales.data = self.scales.data.to(dtype)  # same Parameter: optimizers holding it stay valid
            self._cache.clear()
        self.scales.requires_grad_(enabled)
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense `[N, K]` weight as the layer computes it (for export and checks)."""
        dtype = dtype or self.scales.dtype
        if not self.is_packed:
            return quantizer.fake_quantize(self.weight, self.scales, self.zeros, self.spec).detach().to(dtype)
        w = reference.dequantize(self._kernel_qweight(), self.qzeros, self.scales.detach(), self.spec, dtype)
        perm = self.input_permutation()
        if perm is None:
            return w
        out = torch.empty_like(w)
        out[:, perm] = w
        return out

    # ----- act-order (g_idx) ----------------------------------------------------------------------
    def input_permutation(self) -> torch.Tensor | None:
        """Input features sorted by group, or None when g_idx is absent or already in order."""
        if self.g_idx is None:
            return None
        if "perm" not in self._cache:
            g = self.g_idx.long()
            if g.shape != (self.in_features,) or g.min() < 0 or g.max() >= self.spec.num_groups:
                raise ValueError(f"g_idx must hold {self.in_features} group indices in [0, {self.spec.num_groups})")
            perm = torch.argsort(g, stable=True)
            expected = torch.arange(self.in_features, device=g.device) // self.spec.group
            if not torch.equal(g[perm], expected):
                counts = torch.bincount(g, minlength=self.spec.num_groups)
                raise ValueError(f"g_idx assigns {counts.tolist()[:8]}... features to groups; each group needs "
                                 f"exactly {self.spec.group}")
            identity = torch.equal(perm, torch.arange(self.in_features, device=g.device))
            self._cache["perm"] = None if identity else perm
        return self._cache["perm"]

    def _kernel_qweight(self) -> torch.Tensor:
        """qweight with K in group order: what every kernel and cache is built from."""
        perm = self.input_permutation()
        if perm is None:
            return self.qweight
        if "sorted_qweight" not in self._cache:
            codes = unpack_qweight(self.qweight, self.spec.bits, self.in_features)
            self._cache["sorted_qweight"] = pack_qweight(codes[perm], self.spec.bits)
        return self._cache["sorted_qweight"]

    # ----- compute --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects floating-point input with last dim {self.in_features}, "
                             f"got {x.dtype} {tuple(x.shape)}")
        if not self.is_packed:
            w_hat = quantizer.fake_quantize(self.weight, self.scales, self.zeros, self.spec)
            return nn.functional.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if x.device != self.qweight.device:
            raise ValueError(f"input on {x.device} but the layer's weights are on {self.qweight.device}")
        perm = self.input_permutation()
        if perm is not None:
            x = x.index_select(-1, perm)
        backend = self._resolve_backend(x)
        if backend == "cpu_int4":
            return self._cpu_int4(x)
        path = self._triton_path() if backend == "triton" else self._reference_path()
        if torch.is_autocast_enabled(x.device.type):
            # Autocast does not reach inside an autograd Function: cast here, as nn.Linear would be, so
            # the forward, dx and ds all run (and x is saved) in the low-precision dtype.
            x = x.to(torch.get_autocast_dtype(x.device.type))
            with torch.autocast(x.device.type, enabled=False):
                return QuantLinearFunction.apply(x, self.scales, self.bias, path)
        return QuantLinearFunction.apply(x, self.scales, self.bias, path)

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend != "auto":
            return self.backend
        if x.is_cuda:
            return "triton"
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.scales.requires_grad
                                                  or (self.bias is not None and self.bias.requires_grad))
        # torch's CPU kernel takes 4-bit codes: 8-bit layers (foreign checkpoints) use the reference path.
        return "reference" if needs_grad or self.spec.bits > 4 else "cpu_int4"

    def _triton_path(self) -> TritonPath:
        if "triton" not in self._cache:
            from .triton_kernels.ops import prepare_weight

            self._cache["triton"] = TritonPath(prepare_weight(self._kernel_qweight(), self.qzeros, self.spec), self.spec)
        return self._cache["triton"]

    def tune(self, m_values=None, dtype: torch.dtype = torch.float16, backward: bool = False) -> dict[str, str]:
        """Time the curated kernel configs for this layer's shape on its GPU and adopt the fastest per M
        bucket (`triton_kernels.tuning`; `tuning.tune_model` does a whole model and saves the winners)."""
        from .triton_kernels import tuning

        if not self.is_packed:
            raise ValueError("tune a packed layer (call pack() first)")
        return tuning.warmup(self._triton_path().weight, self.scales.detach(), self.spec,
                             m_values or tuning.TUNE_M, dtype, backward)

    def _reference_path(self) -> ReferencePath:
        if "reference" not in self._cache:
            cmz = reference.compact_codes_minus_zeros(self._kernel_qweight(), self.qzeros, self.spec)
            self._cache["reference"] = ReferencePath(cmz, self.spec)
        return self._cache["reference"]

    def _cpu_int4(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 is the kernel's fast dtype (8x an fp32 nn.Linear at 4096^2, M=1); its error is bf16's.
        version = (self.scales._version, self.scales.data_ptr())
        cached = self._cache.get("cpu_int4")
        if cached is None or cached[0] != version:
            cached = (version, *cpu.repack_for_cpu(self._kernel_qweight(), self.qzeros, self.scales.detach(), self.spec,
                                                   torch.bfloat16))
            self._cache["cpu_int4"] = cached
        _, packed, scale_and_offset, group = cached
        bias = None if self.bias is None else self.bias.detach()
        return cpu.int4_matmul(x.to(torch.bfloat16), packed, scale_and_offset, group, bias).to(x.dtype)

    # ----- nn.Module plumbing ----------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached repacks belong to the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        state = "packed" if self.is_packed else "trainable"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, bias={self.bias is not None}, {state}")


@contextlib.contextmanager
def compute_path(model: nn.Module, backend: str):
    """Run every QuantLinear of `model` on `backend` ("reference": exact fp32 from the codes) inside the
    block, and restore each layer's own choice after it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [m.backend for m in layers]
    for m in layers:
        m.backend = backend
    try:
        yield model
    finally:
        for m, b in zip(layers, saved):
            m.backend = b
