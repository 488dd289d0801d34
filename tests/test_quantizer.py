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


def _brute_force_clip(w: torch.Tensor, spec: QuantSpec, ratios, weigh: torch.Tensor):
    """Group by group, ratio by ratio, in fp64: the clip search written out as loops."""
    s_out = torch.empty(spec.num_groups, spec.out_features, dtype=torch.float64)
    z_out = torch.empty_like(s_out)
    for n in range(spec.out_features):
        for gi in range(spec.num_groups):
            cols = slice(gi * spec.group, min((gi + 1) * spec.group, spec.in_features))
            row, wt = w[n, cols], weigh[cols]
            best = None
            for r in ratios:
                s = max(min((row.max() - row.min()).item() * r / spec.qmax, 1e4), 1e-4)
                z = min(max(round(-row.min().item() * r / s), 0), spec.qmax)
                q = torch.clamp(torch.round(row / s) + z, 0, spec.qmax)
                err = (((row - (q - z) * s) ** 2) * wt).sum().item()
                if best is None or err < best[0]:
                    best = (err, s, z)
            s_out[gi, n], z_out[gi, n] = best[1], best[2]
    return s_out, z_out


@pytest.mark.parametrize("bits,group,k", [(2, 64, 96), (3, 32, 64), (4, -1, 96)])
def test_clip_search_init_equals_the_loop_written_search(bits, group, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    spec = QuantSpec(bits, group, k, 32)
    w = torch.randn(32, k, generator=g, dtype=torch.float64) * torch.rand(32, k, generator=g, dtype=torch.float64).pow(4) * 3
    importance = torch.rand(k, generator=g, dtype=torch.float64) * 4
    s, z = quantizer.clip_search_init(w, spec, ratios=7, min_ratio=0.4, importance=importance)
    es, ez = _brute_force_clip(w, spec, torch.linspace(1.0, 0.4, 7).tolist(), importance)
    torch.testing.assert_close(s.double(), es, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(z.double(), ez)


def test_clip_search_never_worse_than_minmax_and_weighting_targets_the_weighted_error():
    g = torch.Generator().manual_seed(7)
    spec = QuantSpec(2, 64, 128, 64)
    w = torch.randn(64, 128, generator=g) * torch.rand(64, 128, generator=g).pow(3)  # heavy tails: clipping pays
    importance = torch.rand(128, generator=g).pow(4) * 10

    def err(s, z, weigh):
        return (((w - quantizer.fake_quantize(w, s, z, spec)) ** 2) * weigh).sum().item()

    ones = torch.ones(128)
    mm, clip = quantizer.minmax_init(w, spec), quantizer.clip_search_init(w, spec)
    act = quantizer.clip_search_init(w, spec, importance=importance)
    assert err(*clip, ones) < 0.8 * err(*mm, ones)
    assert err(*act, importance) <= err(*clip, importance) + 1e-6
    assert err(*clip, ones) <= err(*act, ones) + 1e-6
    with pytest.raises(ValueError, match="importance must have shape"):
        quantizer.clip_search_init(w, spec, importance=torch.ones(64))
