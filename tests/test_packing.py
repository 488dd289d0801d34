import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqat_kernels import packing
from eqat_kernels.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_qweight_and_qzeros(bits):
    codes = torch.randint(0, 1 << bits, (96, 64), dtype=torch.int32)
    qweight = packing.pack_qweight(codes, bits)
    assert qweight.shape == (96 * bits // 32, 64) and qweight.dtype == torch.int32
    assert torch.equal(packing.unpack_qweight(qweight, bits, 96), codes)
    zeros = torch.randint(0, 1 << bits, (5, 64), dtype=torch.int32)
    qzeros = packing.pack_qzeros(zeros, bits)
    assert qzeros.shape == (5, 64 * bits // 32)
    assert torch.equal(packing.unpack_qzeros(qzeros, bits, 64), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_words_are_one_little_endian_bit_stream_per_column(bits):
    """What the format means: code k of a column sits at bit offset b*k of the column's words."""
    rows, cols = 64, 3
    codes = torch.randint(0, 1 << bits, (rows, cols), dtype=torch.int32)
    words = packing.pack_qweight(codes, bits)
    for c in range(cols):
        stream = 0
        for i, w in enumerate(words[:, c].tolist()):
            stream |= (w & 0xFFFFFFFF) << (32 * i)
        decoded = [(stream >> (bits * k)) & ((1 << bits) - 1) for k in range(rows)]
        assert decoded == codes[:, c].tolist()


def test_3bit_matches_gptq_reference_layout():
    """GPTQ's 3-bit packer: 10 codes, then one split 2|1 across words, 10 codes, one split 1|2, 10 codes."""
    codes = torch.randint(0, 8, (32, 1), dtype=torch.int32)
    c = [int(v) for v in codes[:, 0]]
    w0 = sum(c[j] << (3 * j) for j in range(10)) | ((c[10] << 30) & 0xFFFFFFFF)
    w1 = (c[10] >> 2) | sum(c[11 + j] << (3 * j + 1) for j in range(10)) | ((c[21] << 31) & 0xFFFFFFFF)
    w2 = (c[21] >> 1) | sum(c[22 + j] << (3 * j + 2) for j in range(10))
    expected = [w - (1 << 32) if w >= 1 << 31 else w for w in (w0, w1, w2)]
    assert packing.pack_qweight(codes, 3)[:, 0].tolist() == expected


def test_3bit_planes_are_exact_both_ways():
    codes = torch.randint(0, 8, (160, 96), dtype=torch.int32)
    qweight = packing.pack_qweight(codes, 3)
    low, high = packing.split_3bit_planes(qweight, 160)
    assert low.shape == (10, 96) and high.shape == (10, 96) and high.dtype == torch.int16
    assert torch.equal(packing.merge_3bit_planes(low, high, 160), qweight)


@pytest.mark.parametrize("bad", [0, 1, 5, 9, 16])
def test_unsupported_bits_are_refused(bad):
    with pytest.raises(ValueError, match="unsupported bits"):
        packing.pack_qweight(torch.zeros(32, 4, dtype=torch.int32), bad)


def test_codes_out_of_range_and_rows_off_the_unit_are_refused():
    with pytest.raises(ValueError, match="out of range"):
        packing.pack_qweight(torch.full((32, 4), 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        packing.pack_qweight(torch.zeros(48, 4, dtype=torch.int32), 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=5, group_size=128, in_features=256, out_features=64), "unsupported bits"),
    (dict(bits=4, group_size=7, in_features=256, out_features=64), "unsupported group_size"),
    (dict(bits=4, group_size=0, in_features=256, out_features=64), "unsupported group_size"),
    (dict(bits=4, group_size=-2, in_features=256, out_features=64), "unsupported group_size"),
    (dict(bits=4, group_size=128, in_features=250, out_features=64), "in_features=250 is not a multiple of 32"),
    (dict(bits=3, group_size=128, in_features=256, out_features=48), "out_features=48 is not a multiple of 32"),
])
def test_spec_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_partial_last_group_shapes():
    spec = QuantSpec(2, 128, 576, 64)  # SmolLM2's hidden size: 4.5 groups of 128
    assert spec.num_groups == 5 and spec.scales_shape == (5, 64) and spec.qzeros_shape == (5, 4)
    assert QuantSpec(4, -1, 576, 64).num_groups == 1
    assert abs(QuantSpec(2, 64, 4096, 4096).bits_per_weight - 2.28125) < 1e-9


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), row_units=st.integers(1, 4), cols=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_property(bits, row_units, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (32 * row_units, cols), generator=g, dtype=torch.int32)
    assert torch.equal(packing.unpack_rows(packing.pack_rows(codes, bits), bits, codes.shape[0]), codes)
