"""pytest-benchmark suite for the CPU inference path (not part of the test run):

    python -m pytest benchmarks/test_cpu_benchmark.py --benchmark-only
"""
import pytest
import torch

from common import random_quant_linear


@pytest.fixture(scope="module", params=[(4096, 4096)], ids=lambda s: f"{s[0]}x{s[1]}")
def shape(request):
    return request.param


@pytest.mark.parametrize("m", [1, 16])
def test_linear_fp32(benchmark, shape, m):
    layer, x = torch.nn.Linear(shape[1], shape[0], bias=False), torch.randn(m, shape[1])
    with torch.no_grad():
        benchmark(layer, x)


@pytest.mark.parametrize("m", [1, 16])
def test_linear_bf16(benchmark, shape, m):
    layer = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=torch.bfloat16)
    x = torch.randn(m, shape[1], dtype=torch.bfloat16)
    with torch.no_grad():
        benchmark(layer, x)


@pytest.mark.parametrize("setting", [(2, 64), (3, 128), (4, 128)], ids=["w2g64", "w3g128", "w4g128"])
@pytest.mark.parametrize("m", [1, 16])
def test_quant_linear_cpu(benchmark, shape, m, setting):
    layer, x = random_quant_linear(*shape, *setting), torch.randn(m, shape[1])
    with torch.no_grad():
        layer(x)  # one-time repack for torch's int4 kernel
        benchmark(layer, x)
