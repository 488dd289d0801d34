"""Shared benchmark helpers: random packed layers of real shapes, timers, result files."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import torch.utils.benchmark as tb

from eqat_kernels import QuantLinear

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"w2g64": (2, 64), "w3g128": (3, 128), "w4g128": (4, 128)}
LLM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]  # (N out, K in)


def random_quant_linear(n: int, k: int, bits: int, group: int, device: str = "cpu") -> QuantLinear:
    """A packed layer with random codes and realistic scales: kernel speed does not depend on the values."""
    layer = QuantLinear(k, n, bits, group, bias=False, dtype=torch.float16, device=device)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, dtype=torch.int32))
        layer.qzeros.copy_(torch.randint(-2**31, 2**31 - 1, layer.qzeros.shape, dtype=torch.int32))
        layer.scales.copy_(torch.rand_like(layer.scales, dtype=torch.float32).mul(0.01).add(0.001).half())
    return layer


def median_seconds(fn, min_run_time: float = 0.5, threads: int | None = None) -> float:
    """Median wall time of `fn()` with torch's timer (all cores unless `threads`)."""
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def machine() -> dict:
    info = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path
