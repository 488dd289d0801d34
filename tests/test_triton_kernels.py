"""Every Triton kernel against an fp64 reference under TRITON_INTERPRET=1, on fresh random inputs.

Shapes are deliberately off the block sizes (M in 1/3/17/130, N 64/192, K 256/576 where g=128 leaves a
partial last group); outputs are poisoned with NaN first so an unwritten element fails.
"""
import itertools

import pytest
import torch

from eqat_kernels import packing, reference
from eqat_kernels.quantizer import expand_groups
from eqat_kernels.spec import QuantSpec
from eqat_kernels.triton_kernels import configs, ops

from helpers import TOLERANCE, random_packed, rel_err

BITS, GROUPS = (2, 3, 4), (32, 64, 128, -1)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = list(itertools.product((1, 3, 17, 130), (64, 192), (256, 576)))
# a covering design: every (bits, group, dtype) once, shapes rotating so each appears three times
CASES = [(b, g, d, *SHAPES[i % len(SHAPES)])
         for i, (b, g, d) in enumerate(itertools.product(BITS, GROUPS, DTYPES))]
# 8-bit layers (foreign checkpoints) take the generic paths: the one fp16 row must not take the 2/4-bit pairs
CASES += [(8, 128, torch.float16, 1, 192, 576), (8, 64, torch.bfloat16, 17, 64, 256), (8, -1, torch.float32, 3, 192, 576)]


def _setup(bits, group, dtype, m, n, k):
    spec = QuantSpec(bits, group, k, n)
    qweight, qzeros, scales = random_packed(spec)
    x = torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    return spec, qweight, qzeros, scales, ops.prepare_weight(qweight, qzeros, spec), x, dy


@pytest.mark.parametrize("bits,group,dtype,m,n,k", CASES)
def test_kernels_match_fp64_reference(poisoned_outputs, bits, group, dtype, m, n, k):
    spec, qweight, qzeros, scales, weight, x, dy = _setup(bits, group, dtype, m, n, k)
    bias = torch.randn(n).to(dtype)
    tol = TOLERANCE[dtype]

    y = ops.forward(x, weight, scales, spec, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())) < tol

    dx = ops.grad_input(dy, weight, scales, spec)
    assert rel_err(dx, reference.grad_input(dy.double(), qweight, qzeros, scales, spec)) < tol

    ds, dz = ops.grad_scales(x, dy, weight, scales, spec, with_zeros=True)
    ds_ref, dz_ref = reference.grad_scales(x.double(), dy.double(), qweight, qzeros, scales, spec, with_zeros=True)
    # ds accumulates in fp32 from dtype inputs: the reference sees the same rounded inputs
    assert rel_err(ds, ds_ref) < 1e-5 and rel_err(dz, dz_ref) < 1e-5

    w = ops.dequantize(weight, scales, spec, dtype)
    assert w.dtype == dtype
    assert rel_err(w, reference.dequantize(qweight, qzeros, scales, spec, torch.float64)) < tol


@pytest.mark.parametrize("bits,group,m", [(3, 128, 130), (2, 64, 17), (4, -1, 3)])
def test_dx_and_ds_match_autograd_on_the_reference(poisoned_outputs, bits, group, m):
    spec, qweight, qzeros, scales, weight, x, dy = _setup(bits, group, torch.float32, m, 192, 576)
    s = scales.double().requires_grad_()
    xr = x.double().requires_grad_()
    cmz = reference.codes_minus_zeros(qweight, qzeros, spec).double()
    (xr @ (cmz * expand_groups(s, spec)).t()).backward(dy.double())
    assert rel_err(ops.grad_input(dy, weight, scales, spec), xr.grad) < 1e-5
    assert rel_err(ops.grad_scales(x, dy, weight, scales, spec)[0], s.grad) < 1e-5


@pytest.mark.parametrize("m", [1, 2, configs.DECODE_MAX_M, configs.DECODE_MAX_M + 1, 64])
def test_decode_and_gemm_paths_agree_at_the_switch(poisoned_outputs, m):
    spec, qweight, qzeros, scales, weight, x, _ = _setup(4, 128, torch.float16, m, 64, 576)
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec)
    assert rel_err(ops.forward(x, weight, scales, spec), ref) < 1e-3


@pytest.mark.parametrize("bits,group,dtype,m", [(2, 64, torch.float16, 2), (3, 128, torch.bfloat16, 3),
                                                 (4, 32, torch.float32, 4), (4, 128, torch.float16, 3),
                                                 (3, -1, torch.float16, 4), (2, 128, torch.bfloat16, 3)])
def test_decode_rows_sharing_a_program_match_reference(poisoned_outputs, bits, group, dtype, m):
    """M = 2..4: several rows per decode program (M = 3 runs 4-row tiles, one row masked), N off the tile
    width, K = 576 leaving a partial last group."""
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, dtype, m, 192, 576)
    cfg = configs.select_config("decode", m, 192, 576, bits, spec.group)
    assert cfg.block_m > 1
    bias = torch.randn(192).to(dtype)
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())
    assert rel_err(ops.forward(x, weight, scales, spec, bias, config=cfg), ref) < TOLERANCE[dtype]  # the GEMV
    assert rel_err(ops.forward(x, weight, scales, spec, bias), ref) < TOLERANCE[dtype]  # the launcher's choice


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("bits,group,scale", [(2, 64, 1.0), (4, 128, 1.0), (2, 32, 300.0), (4, -1, 300.0)])
def test_one_row_fp16_decode_matches_reference_on_either_architecture(poisoned_outputs, monkeypatch, capability,
                                                                      bits, group, scale):
    """M = 1 in fp16: two codes per instruction with fp16 partial sums from sm_90 (`configs.fp16_in_place`),
    fp32 FMAs below; both against the fp64 reference, also with activations of a few hundred (the partials
    reach 32x the largest one), N off the tile width, K = 576 leaving a partial last group."""
    monkeypatch.setattr(ops, "target_capability", lambda device: capability)
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, torch.float16, 1, 192, 576)
    x = (x.float() * scale).half()
    cfg = configs.select_config("decode", 1, 192, 576, bits, spec.group)
    assert cfg.block_m == 1 and configs.fp16_in_place(capability, True) == (capability >= 90)
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec)
    assert rel_err(ops.forward(x, weight, scales, spec), ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("bits,group,dtype,m", [(4, 128, torch.float16, 1), (2, 64, torch.float16, 1),
                                                (4, 32, torch.bfloat16, 1), (2, 128, torch.float32, 3),
                                                (3, 64, torch.float32, 1)])
def test_decode_on_whole_tiles_loads_without_masks(poisoned_outputs, monkeypatch, capability, bits, group, dtype, m):
    """N and K multiples of the decode tile (every real layer): the loop's loads go unmasked (`EVEN`); a
    wrong index there reads a neighbouring tile's codes or activations, which the fp64 reference sees."""
    monkeypatch.setattr(ops, "target_capability", lambda device: capability)
    n, k = 512, 512
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, dtype, m, n, k)
    cfg = configs.select_config("decode", m, n, k, bits, spec.group)
    assert n % cfg.block_n == 0 and k % configs.fit_block_k(cfg.block_k, spec.group) == 0
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec)
    assert rel_err(ops.forward(x, weight, scales, spec), ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits,code", [(4, 0), (4, 15), (2, 0)])
def test_fp16_pairs_hold_the_largest_partial_without_overflow(poisoned_outputs, monkeypatch, bits, code):
    """The sm_90 one-row decode's fp16 partials (a word's 16 / bits products per lane) stay finite at their
    documented bound: every activation 2047 and every code at an end of its range (at 4 bits, code 0 makes
    a word's partial exactly -65504, fp16's largest magnitude)."""
    monkeypatch.setattr(ops, "target_capability", lambda device: 90)
    spec = QuantSpec(bits, 128, 576, 192)
    codes = torch.full((576, 192), code, dtype=torch.int32)
    zeros = torch.randint(0, spec.qmax + 1, spec.scales_shape, dtype=torch.int32)
    qweight, qzeros = packing.pack_qweight(codes, bits), packing.pack_qzeros(zeros, bits)
    scales = torch.full(spec.scales_shape, 1e-4).half()
    x = torch.full((1, 576), 2047.0).half()
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec)
    assert rel_err(ops.forward(x, ops.prepare_weight(qweight, qzeros, spec), scales, spec), ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("bits,m", [(4, 1), (3, 1), (2, 3)])
def test_one_launch_decode_reduces_in_order_and_resets_its_tickets(poisoned_outputs, monkeypatch, sms, bits, m):
    """Decode is one launch: with one K range (1 SM) each program writes y itself; with several (132 SMs)
    the last program of each tile adds the partials in split order. Either way the result matches the
    reference, a repeated launch is bitwise identical (deterministic) and every ticket is back at 0."""
    monkeypatch.setattr(ops, "SM_COUNT_FALLBACK", sms)
    monkeypatch.setattr(ops, "SPLIT_TICKETS", {})
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, 128, torch.float16, m, 576, 576)
    cfg = configs.select_config("decode", m, 576, 576, bits, 128)
    tiles = -(-576 // cfg.block_n) * -(-m // cfg.block_m)
    split, _ = configs.k_ranges(576, configs.fit_block_k(cfg.block_k, 128), tiles, sms, cfg)
    assert (split == 1) == (sms == 1)
    bias = torch.randn(576).to(torch.float16)
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())
    first = ops.forward(x, weight, scales, spec, bias)
    assert rel_err(first, ref) < TOLERANCE[torch.float16]
    assert torch.equal(ops.forward(x, weight, scales, spec, bias), first)
    (tickets,) = ops.SPLIT_TICKETS.values()
    assert tickets.numel() >= tiles and not tickets.any()


@pytest.mark.parametrize("bits,group,dtype", [(3, 128, torch.float16), (2, 64, torch.bfloat16)])
def test_large_m_dequantize_then_matmul_matches_reference(poisoned_outputs, bits, group, dtype):
    """From DENSE_MIN_M rows, forward and dx dequantize once and multiply densely (cuBLAS on a GPU)."""
    assert configs.uses_dense("grad_input", 4096, 86, True, bits)
    assert not configs.uses_dense("forward", 4096, 80, True, 4) and configs.uses_dense("forward", 4096, 80, True, 3)
    assert configs.uses_dense("forward", 512, 90, True, 2) and not configs.uses_dense("forward", 512, 90, True, 4)
    assert configs.uses_dense("forward", 4096, 120, True, 4)  # a newer GPU takes the newest known rule
    assert configs.uses_dense("forward", 1024, 90, True, 8) and not configs.uses_dense("forward", 512, 90, True, 8)
    m = configs.DENSE_MIN_M[("forward", 90)][bits] + 7  # off a GPU the launchers decide as on an H100
    for op in ("forward", "grad_input"):
        assert configs.uses_dense(op, m, ops.target_capability(torch.device("cpu")), True, bits)
        assert not configs.uses_dense(op, m, 90, False, bits)
    spec, qweight, qzeros, scales, weight, x, dy = _setup(bits, group, dtype, m, 96, 576)
    bias = torch.randn(96).to(dtype)
    y = ops.forward(x, weight, scales, spec, bias)
    assert y.dtype == dtype and y.shape == (m, 96)
    assert rel_err(y, reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())) < TOLERANCE[dtype]
    dx = ops.grad_input(dy, weight, scales, spec)
    assert rel_err(dx, reference.grad_input(dy.double(), qweight, qzeros, scales, spec)) < TOLERANCE[dtype]


@pytest.mark.parametrize("bits,group,dtype,chunk_groups", [(3, 128, torch.float16, 1), (2, 64, torch.bfloat16, 4),
                                                           (4, -1, torch.float16, 1)])
def test_large_m_scale_gradient_from_dense_product_matches_reference(poisoned_outputs, monkeypatch, bits, group,
                                                                     dtype, chunk_groups):
    """From DENSE_MIN_M rows ds and dz weight an fp32 x^T dy computed a chunk of whole groups at a time
    (cuBLAS on a GPU); K = 576 leaves a partial last group, and chunks of 1 and 4 groups split K unevenly."""
    m = configs.DENSE_MIN_M[("grad_scales", 90)] + 5
    assert configs.uses_dense("grad_scales", m, ops.target_capability(torch.device("cpu")), True, bits)
    assert not configs.uses_dense("grad_scales", m, 90, False, bits)  # fp32 activations keep the fused tiles
    spec, qweight, qzeros, scales, weight, x, dy = _setup(bits, group, dtype, m, 96, 576)
    monkeypatch.setattr(ops, "DENSE_GW_BYTES", chunk_groups * 4 * spec.group * 96)
    ds, dz = ops.grad_scales(x, dy, weight, scales, spec, with_zeros=True)
    ds_ref, dz_ref = reference.grad_scales(x.double(), dy.double(), qweight, qzeros, scales, spec, with_zeros=True)
    assert rel_err(ds, ds_ref) < 1e-5 and rel_err(dz, dz_ref) < 1e-5


def test_mid_m_gemm_splits_k_when_tiles_are_few():
    """M = 17 on a 64-wide layer is one or two tiles: K is split so the grid fills the GPU; M = 4096 is not
    (the split GEMM's numbers are checked by the reference tests above, M = 17 and 130)."""
    cfg = configs.select_config("gemm", 17, 64, 576, 4, 128)
    assert configs.split_k(1, 576 // cfg.block_k, 132, cfg) > 1
    big = configs.select_config("gemm", 4096, 4096, 4096, 4, 128)
    assert configs.split_k((4096 // big.block_m) * (4096 // big.block_n), 4096 // big.block_k, 132, big) == 1


def test_leading_dims_and_non_contiguous_input(poisoned_outputs):
    spec, qweight, qzeros, scales, weight, _, _ = _setup(2, 64, torch.float32, 1, 64, 256)
    x = torch.randn(2, 5, 512)[..., ::2]  # [2, 5, 256], stride 2
    y = ops.forward(x, weight, scales, spec)
    assert y.shape == (2, 5, 64)
    assert rel_err(y, reference.forward(x.double(), qweight, qzeros, scales, spec)) < 1e-5


def test_launcher_errors_name_the_problem():
    spec, qweight, qzeros, scales, weight, x, _ = _setup(4, 128, torch.float32, 2, 64, 256)
    with pytest.raises(ValueError, match="dtype torch.int64 unsupported"):
        ops.forward(x.long(), weight, scales, spec)
    with pytest.raises(ValueError, match="expects 256"):
        ops.forward(torch.randn(2, 128), weight, scales, spec)
    with pytest.raises(ValueError, match="scales must be"):
        ops.forward(x, weight, scales[:1], spec)
    with pytest.raises(ValueError, match="qweight must be int32"):
        ops.prepare_weight(qweight[:-1], qzeros, spec)


@pytest.mark.parametrize("m", [3, 17])
def test_strided_bias(poisoned_outputs, m):
    """A bias that is a strided view (every other element of a buffer) on the decode and split GEMM paths."""
    spec, qweight, qzeros, scales, weight, x, _ = _setup(4, 128, torch.float32, m, 64, 256)
    bias = torch.randn(128)[::2]
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())
    assert rel_err(ops.forward(x, weight, scales, spec, bias), ref) < 1e-5


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 32), (4, -1), (2, 64), (2, 128), (2, -1), (3, 128), (3, 64),
                                        (3, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fragment_order_gemm_matches_reference(poisoned_outputs, bits, group, dtype):
    """The mid-M GEMM that multiplies magic-number codes in mma fragment order (y^T = W x^T): odd M and N,
    K with a partial last group."""
    m, n, k = 19, 224, 576
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, dtype, m, n, k)
    cfg = configs.select_config("gemm", m, n, k, bits, group)
    assert configs.uses_fragment_order(bits, cfg.block_m, cfg.block_k, spec.group, True)
    bias = torch.randn(n).to(dtype)
    y = ops.forward(x, weight, scales, spec, bias)
    assert rel_err(y, reference.forward(x.double(), qweight, qzeros, scales, spec, bias.double())) < TOLERANCE[dtype]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("bits,group,m,scale", [(3, 128, 1, 1.0), (3, 64, 19, 1.0), (3, -1, 3, 300.0),
                                                (2, 64, 19, 1.0), (2, -1, 2, 300.0)])
def test_fp16_fragment_gemm_on_either_architecture(poisoned_outputs, monkeypatch, capability, bits, group, m, scale):
    """2/3-bit fp16 codes are read in place in the fragment-order GEMM from sm_90 (`configs.fp16_in_place`; 3 bits:
    both planes), shifted below; both against the fp64 reference, K with a partial last group."""
    monkeypatch.setattr(ops, "target_capability", lambda device: capability)
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, torch.float16, m, 224, 576)
    x = (x.float() * scale).half()
    assert configs.fp16_in_place(capability, True) == (capability >= 90)
    ref = reference.forward(x.double(), qweight, qzeros, scales, spec)
    assert rel_err(ops.forward(x, weight, scales, spec), ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (3, 128)])
def test_fragment_order_gemm_whole_tiles(poisoned_outputs, bits, group):
    """K a multiple of the K tile (every real layer) drops the feature masks; several K ranges still add up."""
    m, n, k = 5, 160, 1024
    spec, qweight, qzeros, scales, weight, x, _ = _setup(bits, group, torch.float16, m, n, k)
    cfg = configs.select_config("gemm", m, n, k, bits, group)
    bk = configs.gemm_tiling(bits, cfg.block_m, cfg.block_k, spec.group, True)[0]
    assert k % bk == 0 and configs.uses_fragment_order(bits, cfg.block_m, cfg.block_k, spec.group, True)
    y = ops.forward(x, weight, scales, spec)
    assert rel_err(y, reference.forward(x.double(), qweight, qzeros, scales, spec)) < TOLERANCE[torch.float16]
