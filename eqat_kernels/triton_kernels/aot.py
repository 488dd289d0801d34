"""Ahead-of-time compilation for real GPUs on a machine without one.

`triton.compile` lowers a kernel to PTX and cubin for a chosen target; the register count and spill
bytes only appear after PTX assembly, so `ptxas -v` from the Triton wheel is run on the PTX as well.
Used by the tests (every kernel, bits, dtype, sm_80/sm_90) and by anyone curating configs:
`python -m eqat_kernels.triton_kernels.aot` prints the table. Must run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import kernels
from .configs import KernelConfig, fit_block_k

SM80_MAX_SHARED_BYTES = 166912  # 163 KiB opt-in per block on A100
_TRITON_TYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass
class BuildReport:
    kernel: str
    arch: str
    bits: int
    dtype: str
    config: KernelConfig
    shared_bytes: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    cubin_bytes: int
    has_mma: bool
    has_wgmma: bool


def _signature(name: str, act: str, bits: int, group: int, cfg: KernelConfig) -> tuple:
    """(jit function, signature, constexprs) exactly as ops.py launches it."""
    bk = fit_block_k(cfg.block_k, group)
    dot = {"DOT_PRECISION": "ieee" if act == "fp32" else "tf32", "UPCAST": False}
    if name == "gemm":
        ptrs = dict(x_ptr=f"*{act}", qw_ptr="*i32", qh_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", b_ptr=f"*{act}", y_ptr=f"*{act}")
        ints = ("M", "N", "K", "stride_xm", "stride_ym")
        const = dict(GROUP=group, BITS=bits, HAS_BIAS=True, **dot, BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_K=bk, GROUP_M=cfg.group_m)
        fn = kernels.gemm_fwd_kernel
    elif name == "decode":
        ptrs = dict(x_ptr=f"*{act}", qw_ptr="*i32", qh_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", ws_ptr="*fp32")
        ints = ("M", "N", "K", "stride_xm", "K_PER_SPLIT")
        const = dict(GROUP=group, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=bk)
        fn = kernels.decode_splitk_kernel
    elif name == "grad_input":
        ptrs = dict(dy_ptr=f"*{act}", qw_ptr="*i32", qh_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", dx_ptr=f"*{act}")
        ints = ("M", "N", "K", "stride_dym", "stride_dxm")
        const = dict(GROUP=group, BITS=bits, **dot, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk)
        fn = kernels.grad_input_kernel
    elif name == "grad_scales":
        ptrs = dict(x_ptr=f"*{act}", dy_ptr=f"*{act}", qw_ptr="*i32", qh_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16",
                    ds_ptr="*fp32", dz_ptr="*fp32")
        ints = ("M", "N", "K", "stride_xm", "stride_dym")
        const = dict(GROUP=group, BITS=bits, COMPUTE_DZ=True, **dot, BLOCK_M=cfg.block_m,
                     BLOCK_N=cfg.block_n, BLOCK_K=bk)
        fn = kernels.grad_scales_kernel
    elif name == "dequantize":
        ptrs = dict(qw_ptr="*i32", qh_ptr="*i32", qz_ptr="*i32", s_ptr="*fp16", w_ptr=f"*{act}")
        ints = ("N", "K")
        const = dict(GROUP=group, BITS=bits, BLOCK_N=cfg.block_n, BLOCK_K=bk)
        fn = kernels.dequantize_kernel
    elif name == "splitk_reduce":
        ptrs = dict(ws_ptr="*fp32", b_ptr=f"*{act}", y_ptr=f"*{act}")
        ints = ("M", "N", "stride_ym")
        const = dict(SPLIT_K=8, HAS_BIAS=True, BLOCK_N=256)
        fn = kernels.splitk_reduce_kernel
    else:
        raise ValueError(f"unknown kernel {name!r}")
    sig = {**ptrs, **{i: "i32" for i in ints}, **{c: "constexpr" for c in const}}
    return fn, sig, const


def ptxas_path() -> Path:
    # Triton 3.9 emits PTX ISA 9.4, which only the wheel's ptxas-blackwell accepts
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


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


def build(name: str, cc: int, bits: int, dtype: str, config: KernelConfig, group: int = 128) -> BuildReport:
    """Compile one kernel for `sm_{cc}` and report its resources."""
    act = _TRITON_TYPE[dtype]
    fn, sig, const = _signature(name, act, bits, group, config)
    compiled = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    stats = ptxas_stats(ptx, arch)
    return BuildReport(name, arch, bits, dtype, config, compiled.metadata.shared, cubin_bytes=len(compiled.asm["cubin"]),
                       has_mma=bool(re.search(r"\bmma\.sync", ptx)), has_wgmma="wgmma." in ptx, **stats)


def shipped_builds() -> list[tuple[str, KernelConfig]]:
    """Every (kernel, config) the launchers can pick."""
    from .configs import CANDIDATES

    builds = [(name, cfg) for name, buckets in CANDIDATES.items() for _, cfgs in buckets for cfg in cfgs]
    return builds + [("splitk_reduce", KernelConfig(1, 256, 32))]


def _build_row(job: tuple) -> dict:
    name, cfg, cc, bits, dtype = job
    return asdict(build(name, cc, bits, dtype, cfg))


def build_all(ccs=(80, 90), bits=(2, 3, 4), dtypes=("float16", "bfloat16"), workers: int = 2) -> list[dict]:
    """Build every shipped kernel config for every target; needs TRITON_INTERPRET unset."""
    jobs = [(n, c, cc, b, d) for n, c in shipped_builds() for cc in ccs for b in bits for d in dtypes]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_build_row, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description="Build eqat's Triton kernels for sm_80/sm_90 on any machine.")
    parser.add_argument("--json", help="write the full report here")
    args = parser.parse_args()
    rows = build_all()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{'kernel':14} {'config':22} {'arch':7} {'bits':>4} {'dtype':9} {'regs':>4} {'smem B':>7} {'spill':>5} mma")
    for r in rows:
        c = r["config"]
        cfg = f"{c['block_m']}x{c['block_n']}x{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
        tc = "wgmma" if r["has_wgmma"] else ("mma" if r["has_mma"] else "-")
        print(f"{r['kernel']:14} {cfg:22} {r['arch']:7} {r['bits']:>4} {r['dtype']:9} {r['registers']:>4} "
              f"{r['shared_bytes']:>7} {r['spill_store_bytes']:>5} {tc}")


if __name__ == "__main__":
    main()
