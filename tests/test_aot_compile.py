"""Ahead-of-time builds for real GPUs on this CPU machine, from the launchers' real launches with the JIT's
specialisation: every kernel and shipped config at bits 2/3/4, fp16 and bf16, sm_80 and sm_90a; and the
launchers' own choices at group sizes 32/64/-1, fp32 master scales and fp32 activations. Checks what only
a build shows: cubin, tensor-core instructions, shared memory within A100's limit, zero register spills.

The builds run in a subprocess: the rest of the suite sets TRITON_INTERPRET=1, under which
`@triton.jit` yields interpreter objects that cannot be compiled.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from eqat_kernels.triton_kernels.aot import SM80_MAX_SHARED_BYTES

TENSOR_CORE_KERNELS = {"gemm_fwd", "grad_input", "grad_scales"}


def _run_uninterpreted(code: str, tmp_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "build.py"  # @triton.jit needs its source in a file
    script.write_text(textwrap.dedent(code))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    _run_uninterpreted("""
        import sys
        from eqat_kernels.triton_kernels.aot import main

        if __name__ == "__main__":  # the build pool spawns workers that re-import this file
            sys.argv = ["aot", "--json", "report.json", "--variants"]
            main()
    """, tmp)
    return json.loads((tmp / "report.json").read_text())


def test_every_kernel_and_target_was_built(report):
    shipped = {(r["kernel"], r["arch"], r["bits"], r["dtype"]) for r in report if r["group_size"] == 128
               and r["scales_dtype"] == "float16" and r["dtype"] != "float32"}
    kernels = {"gemm_fwd", "decode_splitk", "grad_input", "grad_scales", "dequantize"}
    assert shipped == {(k, a, b, d) for k in kernels for a in ("sm_80", "sm_90a") for b in (2, 3, 4)
                       for d in ("float16", "bfloat16")}
    variants = {(r["kernel"], r["group_size"], r["dtype"], r["scales_dtype"]) for r in report}
    for kernel in ("gemm_fwd", "decode_splitk", "grad_input", "grad_scales"):
        for group in (32, 64, -1):
            assert (kernel, group, "float16", "float16") in variants, (kernel, group)
        assert (kernel, 128, "bfloat16", "float32") in variants  # E2E-QP's fp32 master scales
        assert (kernel, 128, "float32", "float32") in variants  # --no-bf16
    assert {r["m"] for r in report if r["kernel"] == "decode_splitk"} >= {1, 4}
    dense_ds = {(r["arch"], r["bits"], r["dtype"]) for r in report if r["config"].get("DENSE_GW")}
    assert dense_ds >= {(a, b, d) for a in ("sm_80", "sm_90a") for b in (2, 3, 4) for d in ("float16", "bfloat16")}


def test_builds_are_specialised_as_the_jit_launcher_would(report):
    """Aligned pointers and 16-divisible sizes carry tt.divisibility=16 (128-bit loads); M = 1 is a constant."""
    for r in report:
        marks = r["specialization"].split(",")
        assert marks[0] == "D", r["kernel"]  # the first argument is always a pointer from torch's allocator
        if r["kernel"] == "decode_splitk":
            assert marks[9] == ("1" if r["m"] == 1 else "-"), r["specialization"]  # M


def test_builds_have_cubin_no_spills_and_fit_shared_memory(report):
    for r in report:
        where = f"{r['kernel']} {r['config']} {r['arch']} b{r['bits']} g{r['group_size']} {r['dtype']}/{r['scales_dtype']}"
        assert r["cubin_bytes"] > 0, where
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, f"register spills in {where}"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= SM80_MAX_SHARED_BYTES, f"shared memory over the sm_80 limit in {where}"


def test_matmul_kernels_use_tensor_cores(report):
    """fp16/bf16 dots run on tensor cores; the fp32 path asks for exact ieee products (FMA) on purpose."""
    for r in report:
        # the dense scale gradient's kernel has no dot: cuBLAS did the product
        if r["kernel"] in TENSOR_CORE_KERNELS and r["dtype"] != "float32" and not r["config"].get("DENSE_GW"):
            ok = r["has_mma"] or (r["arch"] == "sm_90a" and r["has_wgmma"])
            assert ok, f"no mma/wgmma in {r['kernel']} {r['config']} {r['arch']} b{r['bits']} {r['dtype']}"


def test_the_spill_check_can_fail(tmp_path):
    """A plain fp16 tl.dot tile of 128x256x64 on 4 warps spills on sm_90a: the check must see it."""
    out = _run_uninterpreted("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from eqat_kernels.triton_kernels.aot import ptxas_stats

        @triton.jit
        def dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
            rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
            acc = tl.zeros((BM, BN), tl.float32)
            for k0 in range(0, K, BK):
                acc += tl.dot(tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :]),
                              tl.load(b_ptr + (k0 + rk)[:, None] * BN + rn[None, :]))
            tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)

        sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
               "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
        src = ASTSource(dot_kernel, sig, constexprs={"BM": 128, "BN": 256, "BK": 64})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
        print(ptxas_stats(ptx, "sm_90a")["spill_store_bytes"])
    """, tmp_path)
    assert int(out.strip().splitlines()[-1]) > 0


def test_offsets_that_can_pass_2_31_are_computed_in_int64(tmp_path):
    """Launches whose M x K, M x N or N x K products pass 2^31 (built from the real launchers on unfilled
    CPU tensors): a tile's base address is an int64 multiply (gemm, dx, dequantize), or a scalar pointer
    the M loop advances tile by tile (ds); offsets inside a tile stay int32."""
    out = _run_uninterpreted("""
        import re
        from eqat_kernels.triton_kernels.aot import Case, compile_launch, launches
        from eqat_kernels.triton_kernels.configs import KernelConfig

        big = 2**31 // 4096 + 32  # a multiple of 32 (packing), M x 4096 > 2^31
        # forward, dx and ds at this M take the dense paths by default; the tiles still serve fp32 and tuning
        for case in [Case("forward", big, 4096, 4096, 4, config=KernelConfig(128, 128, 32, 8, 3)),
                     Case("grad_input", big, 4096, 4096, 3, config=KernelConfig(128, 64, 64, 8, 3)),
                     Case("grad_scales", big, 4096, 4096, 2, config=KernelConfig(32, 64, 32, 4, 3)),
                     Case("dequantize", 1, big, 4096, 4)]:
            for fn, args, kwargs, grid in launches(case):
                ttir = compile_launch(fn, args, kwargs, 90)[0].asm["ttir"]
                loops = re.findall(r"scf.for .*", ttir)
                carried = sum(line.split("->")[-1].count("!tt.ptr") for line in loops)
                print(fn.__name__, len(re.findall(r"arith.muli .*: i64", ttir)), carried)
    """, tmp_path)
    found = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in out.strip().splitlines()
             if line.endswith(tuple("0123456789"))}
    assert found["gemm_fwd_kernel"][0] >= 2 and found["grad_input_kernel"][0] >= 2  # input and output tiles
    assert found["dequantize_kernel"][0] >= 1
    assert found["grad_scales_kernel"][1] >= 2  # x and dy bases carried by the M loop as pointers
