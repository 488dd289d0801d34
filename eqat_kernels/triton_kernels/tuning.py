"""Measure the curated configs once on the real GPU, remember the winner per shape bucket, and keep the
winners on disk per GPU model (gemlite's per-GPU JSON configs).

`eqat tune CHECKPOINT` (or `tune_model`) times every candidate for each distinct layer shape and writes
`<cache>/tuned/<gpu>.json` (`paths.cache_root()`); the launchers load that file on their first launch on
a device of that name. `select_config` only reads the table, so a training step never times or
recompiles anything new; without a file it takes the curated default.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
import triton.testing

from .. import paths
from ..spec import QuantSpec
from . import ops
from .configs import (TUNE_M, KernelConfig, bucket_key, candidates, decode_max_m, forget_tuned, parse_bucket_key,
                      record_tuned, tuned, uses_dense)

TUNED_FORMAT = "eqat-tuned-configs"
TUNED_VERSION = 1


def warmup(weight: ops.KernelWeight, scales: torch.Tensor, spec: QuantSpec, m_values=TUNE_M,
           dtype: torch.dtype = torch.float16, backward: bool = False) -> dict[str, str]:
    """Time every candidate config of the forward (and dx/ds if `backward`) kernels; keep the fastest."""
    if scales.device.type != "cuda":
        raise RuntimeError("tuning times real kernels: it needs a CUDA device")
    chosen: dict[str, str] = {}
    for m in m_values:
        x = torch.randn(m, spec.in_features, dtype=dtype, device=scales.device)
        dy = torch.randn(m, spec.out_features, dtype=dtype, device=scales.device)
        cc, half = ops.target_capability(scales.device), dtype != torch.float32
        # forward, dx and ds run none of the tuned tiles where they take their dense paths
        jobs = [] if uses_dense("forward", m, cc, half, spec.bits) else [
            ("decode" if m <= decode_max_m(spec.bits, spec.group, half) else "gemm",
             lambda c: ops.forward(x, weight, scales, spec, config=c))]
        if backward:
            if not uses_dense("grad_input", m, cc, half, spec.bits):
                jobs += [("grad_input", lambda c: ops.grad_input(dy, weight, scales, spec, config=c))]
            if not uses_dense("grad_scales", m, cc, half, spec.bits):
                jobs += [("grad_scales", lambda c: ops.grad_scales(x, dy, weight, scales, spec, config=c))]
        for kernel, run in jobs:
            exact = dtype == torch.float32
            timings = {cfg: triton.testing.do_bench(lambda: run(cfg)) for cfg in candidates(kernel, m, exact, spec.bits)}
            best = min(timings, key=timings.get)
            key = bucket_key(kernel, m, spec.out_features, spec.in_features, spec.bits, spec.group, exact)
            record_tuned(key, best)
            chosen[key] = f"{best} {timings[best] * 1e3:.1f} us"
    return chosen


def tuned_path(gpu_name: str) -> Path:
    """`<cache>/tuned/<gpu name as a file name>.json`, e.g. `nvidia-h100-80gb-hbm3.json`."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"GPU name {gpu_name!r} gives no file name")
    return paths.cache_root() / "tuned" / f"{slug}.json"


def save_tuned(path: Path, gpu_name: str) -> Path:
    """Write every tuned winner of this process for `gpu_name` (atomically: a killed run leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TUNED_FORMAT, "version": TUNED_VERSION, "gpu": gpu_name,
               "configs": {key: asdict(cfg) for key, cfg in sorted(tuned().items())}}
    paths.atomic_write_text(path, json.dumps(payload, indent=1))
    return path


def _entry(path: Path, key: str, value) -> KernelConfig:
    """One file entry as a config, only if it is still a curated candidate for its bucket: a file from
    another eqat version (or edited by hand) cannot bring in a tile that was never built spill-free."""
    parsed = parse_bucket_key(key)
    names = {f.name for f in fields(KernelConfig)}
    if parsed is None or not isinstance(value, dict) or set(value) != names or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"{path}: entry {key!r} is not a tuned kernel config")
    kernel, m, bits, exact = parsed
    config = KernelConfig(**value)
    try:
        allowed = candidates(kernel, m, exact, bits)
    except KeyError:
        raise ValueError(f"{path}: entry {key!r} names an unknown kernel {kernel!r}") from None
    if config not in allowed:
        raise ValueError(f"{path}: entry {key!r} is not one of this version's candidates; re-run `eqat tune`")
    return config


def load_tuned(path: Path, gpu_name: str) -> int:
    """Adopt the winners in `path` (written by `save_tuned` for `gpu_name`); returns how many. Nothing is
    adopted unless the whole file is valid."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a tuned-config file (damaged or truncated?): {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != TUNED_FORMAT:
        raise ValueError(f"{path} is not an eqat tuned-config file")
    if payload.get("version") != TUNED_VERSION:
        raise ValueError(f"{path} has tuned-config version {payload.get('version')!r}; this eqat reads "
                         f"{TUNED_VERSION}: re-run `eqat tune`")
    if payload.get("gpu") != gpu_name:
        raise ValueError(f"{path} was tuned on {payload.get('gpu')!r}, not on {gpu_name!r}")
    entries = payload.get("configs")
    if not isinstance(entries, dict):
        raise ValueError(f"{path} has no 'configs' table")
    parsed = {key: _entry(path, key, value) for key, value in entries.items()}
    for key, config in parsed.items():
        record_tuned(key, config)
    return len(parsed)


def load_for_gpu(gpu_name: str) -> int:
    """What the launchers do on a device's first launch: adopt `tuned_path(gpu_name)` if it exists. A bad
    file is reported and skipped (the curated defaults still run correctly), never fatal."""
    path = tuned_path(gpu_name)
    if not path.exists():
        return 0
    try:
        return load_tuned(path, gpu_name)
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring tuned kernel configs: {e}; delete the file or re-run `eqat tune`")
        return 0


def tune_model(model: torch.nn.Module, m_values=TUNE_M, dtype: torch.dtype = torch.float16,
               backward: bool = False) -> tuple[Path, dict[str, str]]:
    """Tune every distinct packed layer shape of `model` (on its CUDA device) and save the winners for
    this GPU model; returns the file and what was chosen."""
    from ..linear import QuantLinear

    layers = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.is_packed:
            layers.setdefault((m.spec.bits, m.spec.group, m.in_features, m.out_features), m)
    if not layers:
        raise ValueError("the model has no packed QuantLinear layers to tune")
    device = next(iter(layers.values())).qweight.device
    if device.type != "cuda":
        raise ValueError(f"tuning times real kernels on a GPU; the model is on {device}")
    chosen: dict[str, str] = {}
    for layer in layers.values():
        chosen.update(layer.tune(m_values, dtype, backward))
    gpu = torch.cuda.get_device_name(device)
    return save_tuned(tuned_path(gpu), gpu), chosen


__all__ = ["warmup", "tuned_path", "save_tuned", "load_tuned", "load_for_gpu", "tune_model", "forget_tuned"]
