import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqat_kernels import quantizer
from eqat_kernels.spec import QuantSpec


def test_minmax_init_matches_the_formula_on_a_partial_last_group():
    spec = QuantSpec(3, 128, 288, 32)  # groups of 128, 128 and 32
    w = torch.randn(32, 288)
    s, z = quantizer.minmax_init(w, spec)
    assert s.shape == z.shape == (3, 32)
    last = w[:, 256:]
    expected_s = ((last.amax(1) - last.amin(1)) / 7).clamp(1e-4, 1e4)
    torch.testing.assert_close(s[2], expected_s)
    torch.testing.assert_close(z[2], torch.round(-last.amin(1) / expected_s))


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([32, 64, -1]), seed=st.integers(0, 2**31 - 1))
def test_codes_in_range_and_error_within_half_a_step(bits, group, seed):
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits, group, 96, 32)
    w = torch.randn(32, 96, generator=g, dtype=torch.float64)
    s, z = quantizer.minmax_init(w, spec)
    codes, zeros = quantizer.quantize_codes(w, s, z, spec)
    assert codes.min() >= 0 and codes.max() <= spec.qmax and zeros.min() >= 0 and zeros.max() <= spec.qmax
    w_hat = quantizer.fake_quantize(w, s.double(), z.double(), spec)
    step = quantizer.expand_groups(s.double(), spec)
    zf = quantizer.expand_groups(z.double(), spec)
    lo, hi = (0 - zf) * step, (spec.qmax - zf) * step
    inside = (w >= lo) & (w <= hi)
    assert ((w_hat - w).abs()[inside] <= step[inside] / 2 + 1e-9).all()
    # codes dequantize to the fake-quant weight: scale/zero round trip through integers
    recon = (codes.t().double() - quantizer.expand_groups(zeros.double(), spec)) * step
    torch.testing.assert_close(recon, w_hat)


def test_straight_through_gradients_are_lsq_plus():
    spec = QuantSpec(2, 32, 32, 32)
    w = (torch.randn(32, 32, dtype=torch.float64) * 2).requires_grad_()
    s = torch.full((1, 32), 0.5, dtype=torch.float64, requires_grad=True)
    z = torch.full((1, 32), 1.0, dtype=torch.float64, requires_grad=True)
    quantizer.fake_quantize(w, s, z, spec).sum().backward()
    x = w.detach() / 0.5
    below, above = x.round() + 1 < 0, x.round() + 1 > 3
    inside = ~(below | above)
    torch.testing.assert_close(w.grad, inside.double())
    ds = torch.where(inside, x.round() - x, torch.where(below, torch.tensor(-1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)))
    torch.testing.assert_close(s.grad[0], ds.sum(1))
    torch.testing.assert_close(z.grad[0], (-0.5 * (~inside).double()).sum(1))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(value):
    w = torch.randn(32, 64)
    w[3, 5] = value
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantizer.minmax_init(w, QuantSpec(4, 32, 64, 32))


def test_non_2d_weight_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantizer.minmax_init(torch.randn(2, 32, 64), QuantSpec(4, 32, 64, 32))
