"""Ahead-of-time builds for real GPUs on a machine without one, exactly as the JIT launcher would build them.

Each build starts from a real launch: the launcher in `ops.py` runs on CPU tensors of the target shape
with `JITFunction.run` intercepted, so the arguments, grid, constexprs and launch options are the ones a
GPU would see. The JIT's own binder (`create_function_from_signature` with the target's backend) then
derives the specialisation it would apply (16-byte-aligned pointers and integers divisible by 16 as
`tt.divisibility=16`, integers equal to 1 as constants), and `triton.compile` lowers that to PTX and
cubin. `ptxas -v` from the Triton wheel gives registers and spills. Used by the tests and by
`benchmarks/kernel_model.py`; `python -m eqat_kernels.triton_kernels.aot` prints the table. Must run
without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ..spec import QuantSpec
from . import ops
from .configs import BITS_CANDIDATES, CANDIDATES, DECODE_MAX_M, KernelConfig, select_config

SM80_MAX_SHARED_BYTES = 166912  # 163 KiB opt-in per block on A100
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One launcher call: which op, the shape, the quantization and dtypes, and the config (None: the
    launcher's own choice)."""

    op: str  # forward, grad_input, grad_scales, dequantize
    m: int
    n: int
    k: int
    bits: int
    group_size: int = 128
    act: str = "float16"
    scales: str = "float16"
    config: KernelConfig | None = None


@dataclass
class BuildReport:
    kernel: str
    arch: str
    bits: int
    group_size: int
    dtype: str
    scales_dtype: str
    m: int
    n: int
    k: int
    grid: list
    config: dict
    specialization: str  # per argument: D (divisible by 16), a constant, or - (none)
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    cubin_bytes: int
    has_mma: bool
    has_wgmma: bool
    sass: str = field(default="", repr=False)


@contextlib.contextmanager
def _captured_launches(cc: int):
    """Inside: `kernel[grid](...)` records (kernel, args, kwargs, grid) instead of launching, the launchers
    decide as on compute capability `cc`, and the large-M paths' cuBLAS products (`ops.dense_matmul`,
    `ops.dense_matmul_fp32`, not Triton kernels) return empty results."""
    launches = []
    saved = JITFunction.run, ops.dense_matmul, ops.dense_matmul_fp32, ops.target_capability

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, tuple(grid)))

    JITFunction.run = record
    ops.dense_matmul = lambda a, b: torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    ops.dense_matmul_fp32 = lambda a, b: torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
    ops.target_capability = lambda device: cc
    try:
        yield launches
    finally:
        JITFunction.run, ops.dense_matmul, ops.dense_matmul_fp32, ops.target_capability = saved


def launches(case: Case, cc: int = 90) -> list[tuple]:
    """The kernel launches `ops.py` issues for `case` on `sm_{cc}`, with CPU tensors standing in for device
    memory."""
    spec = QuantSpec(case.bits, case.group_size, case.k, case.n)
    weight = ops.prepare_weight(torch.zeros(spec.qweight_shape, dtype=torch.int32),
                                torch.zeros(spec.qzeros_shape, dtype=torch.int32), spec)
    scales = torch.ones(spec.scales_shape, dtype=DTYPES[case.scales])
    act = DTYPES[case.act]
    with _captured_launches(cc) as found:
        if case.op == "forward":
            ops.forward(torch.zeros(case.m, case.k, dtype=act), weight, scales, spec, config=case.config)
        elif case.op == "grad_input":
            ops.grad_input(torch.zeros(case.m, case.n, dtype=act), weight, scales, spec, config=case.config)
        elif case.op == "grad_scales":
            ops.grad_scales(torch.zeros(case.m, case.k, dtype=act), torch.zeros(case.m, case.n, dtype=act), weight,
                            scales, spec, with_zeros=True, config=case.config)
        elif case.op == "dequantize":
            ops.dequantize(weight, scales, spec, act, config=case.config)
        else:
            raise ValueError(f"unknown op {case.op!r}")
    return found


def compile_launch(fn, args: tuple, kwargs: dict, cc: int):
    """What `JITFunction.run` would compile for these arguments on `sm_{cc}`."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**kwargs, "debug": False}
    bound, specialization, options = binder(*args, **kwargs)
    options = backend.parse_options(kwargs)
    names = [p.name for p in fn.params]
    signature = {name: spec[0] for name, spec in zip(names, specialization)}
    constexprs = {(i,): bound[name] for i, name in enumerate(names) if signature[name] == "constexpr"}
    attrs = {(i,): backend.parse_attr(spec[1]) for i, spec in enumerate(specialization)
             if spec[0] != "constexpr" and isinstance(spec[1], str)}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    marks = ["D" if spec[1] == "D" else (str(bound[name]) if spec[0] == "constexpr" else "-")
             for name, spec in zip(names, specialization)]
    return compiled, ",".join(marks)


def _tool(name: str) -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ptxas_path() -> Path:
    # Triton 3.9 emits PTX ISA 9.4, which only the wheel's ptxas-blackwell accepts
    return _tool("ptxas-blackwell")


def ptxas_stats(ptx: str, arch: str) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas_path()), "-v", "--gpu-name", arch, str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr

    def number(pattern: str) -> int:
        found = re.findall(pattern, log)
        if not found:
            raise RuntimeError(f"ptxas -v output has no {pattern!r}:\n{log}")
        return max(int(v) for v in found)

    return {"registers": number(r"Used (\d+) registers"),
            "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads")}


def sass_of(cubin: bytes) -> str:
    """The cubin's machine code, disassembled by the wheel's cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(_tool("cuobjdump")), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout


def build(case: Case, cc: int, with_sass: bool = False) -> list[BuildReport]:
    """Every kernel `case` launches, compiled for `sm_{cc}` as the JIT would, with its resources."""
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    reports = []
    for fn, args, kwargs, grid in launches(case, cc):
        compiled, marks = compile_launch(fn, args, kwargs, cc)
        ptx = compiled.asm["ptx"]
        config = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages",
                                                                                        "GROUP_M", "DENSE_GW")}
        reports.append(BuildReport(
            kernel=fn.__name__.removesuffix("_kernel"), arch=arch, bits=case.bits, group_size=case.group_size,
            dtype=case.act, scales_dtype=case.scales, m=case.m, n=case.n, k=case.k, grid=list(grid), config=config,
            specialization=marks, shared_bytes=compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]),
            has_mma=bool(re.search(r"\bmma\.sync", ptx)), has_wgmma="wgmma." in ptx,
            sass=sass_of(compiled.asm["cubin"]) if with_sass else "", **ptxas_stats(ptx, arch)))
    return reports


SHAPE = (4096, 4096)  # (N, K) of the builds: divisible by 16 like every real LLM layer


def shipped_cases(bits=(2, 3, 4), acts=("float16", "bfloat16")) -> list[Case]:
    """Every (kernel, candidate config) the launchers can pick, at an M inside its bucket, group 128."""
    n, k = SHAPE
    op_of = {"gemm": "forward", "decode": "forward", "grad_input": "grad_input", "grad_scales": "grad_scales",
             "grad_scales_dense": "grad_scales", "dequantize": "dequantize"}
    cases = []
    for kernel, buckets in CANDIDATES.items():
        for b in bits:
            for upper, configs in BITS_CANDIDATES.get((kernel, b), buckets):
                # the top of the M bucket
                m = 1 if kernel == "dequantize" else (upper or (DECODE_MAX_M if kernel == "decode" else 4096))
                # a given config forces the fused tiles; the dense scale gradient is the launcher's own choice
                cases += [Case(op_of[kernel], m, n, k, b, 128, a, "float16", None if kernel == "grad_scales_dense" else cfg)
                          for cfg in configs for a in acts]
    return cases


def variant_cases(bits=(2, 3, 4)) -> list[Case]:
    """The launchers' own choices across what changes the code: group sizes, fp32 master scales (E2E-QP),
    the fp32-activation path (`--no-bf16`), decode with M > 1. Large fp16/bf16 forward and dx take the dense
    path from `configs.DENSE_MIN_M` rows on the GPU the launchers decide for off a GPU (H100) but not on every
    GPU (A100 keeps the fused 2/4-bit forward), so at M = 256 the fused large tiles are built with the
    launcher's config given."""
    n, k = SHAPE
    ops_m = [("forward", 1), ("forward", 4), ("forward", 16), ("forward", 256), ("grad_input", 256),
             ("forward", 4096), ("grad_scales", 4096)]
    variants = [dict(group_size=32), dict(group_size=64), dict(group_size=-1),
                dict(act="bfloat16", scales="float32"), dict(act="float32", scales="float32")]
    cases = []
    for op, m in ops_m:
        for b in bits:
            for v in variants:
                fused = None
                if m == 256:
                    group, exact = v.get("group_size", 128), v.get("act") == "float32"
                    fused = select_config("gemm" if op == "forward" else op, m, n, k, b, group, exact)
                cases.append(Case(op, m, n, k, b, config=fused, **v))
    return cases


def _build_rows(job: tuple) -> list[dict]:
    case, cc, with_sass = job
    return [asdict(r) for r in build(case, cc, with_sass)]


def build_all(cases: list[Case], ccs=(80, 90), workers: int = 2, with_sass: bool = False) -> list[dict]:
    """Build every case for every target in worker processes; needs TRITON_INTERPRET unset."""
    jobs = [(c, cc, with_sass) for c in cases for cc in ccs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [row for rows in pool.map(_build_rows, jobs) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description="Build eqat's Triton kernels for sm_80/sm_90a as the JIT would.")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--variants", action="store_true", help="also group sizes, fp32 scales, fp32 activations")
    args = parser.parse_args()
    rows = build_all(shipped_cases() + (variant_cases() if args.variants else []))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{'kernel':14} {'config':30} {'arch':7} {'b':>1} {'g':>4} {'act/scales':18} {'M':>5} {'regs':>4} "
          f"{'smem B':>7} {'spill':>5} mma")
    for r in rows:
        c = r["config"]
        cfg = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c) + \
            f" w{c.get('num_warps', 4)} s{c.get('num_stages', 3)}"
        tc = "wgmma" if r["has_wgmma"] else ("mma" if r["has_mma"] else "-")
        print(f"{r['kernel']:14} {cfg:30} {r['arch']:7} {r['bits']:>1} {r['group_size']:>4} "
              f"{r['dtype'] + '/' + r['scales_dtype']:18} {r['m']:>5} {r['registers']:>4} {r['shared_bytes']:>7} "
              f"{r['spill_store_bytes']:>5} {tc}")


if __name__ == "__main__":
    main()
