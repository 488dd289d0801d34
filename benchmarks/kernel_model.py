"""A static performance model of eqat's GPU kernels, from their machine code. PREDICTED, never measured.

No GPU is available here, so every figure this script prints is a prediction. For each kernel launch the
launchers issue (decode M = 1, 2, 4 and 8, GEMM M = 16 and M = 4096, dx and ds at M = 4096), it builds the
cubin exactly as the JIT launcher would (`eqat_kernels.triton_kernels.aot`), disassembles it with the
Triton wheel's cuobjdump, finds the main loop (the backward branch), and counts its instruction mix.
From that and datasheet figures (below, named) it predicts, per (GPU, kernel, bits, group, M, N, K):

    time = max(weight+activation bytes / (bandwidth x latency-hiding efficiency),
               issue slots / issue rate of the SMs the grid occupies,
               flops / tensor-core rate) + launch cost per kernel launch

where issue slots = max(thread-instructions, each pipe's instructions x full rate / that pipe's rate): a
scheduler issues one warp-instruction per clock, but integer and bit operations run at half that rate and
type conversions (I2F, F2F, ...) at an eighth (`PIPE_RATES`), so a loop of conversions is bound by its pipe,
not by its instruction count.

and the same for fp16 cuBLAS at its own roofline (max(bytes / bandwidth, flops / tensor rate) + one
launch), whose ratio is the predicted speedup; `16 / (b + 32/g)` (code bits + fp16 scale and zero per
group) is the weight-bandwidth roofline of that speedup at M = 1.

    python benchmarks/kernel_model.py                  # table + benchmarks/results/kernel_model.json + plot
    python benchmarks/kernel_model.py --check          # compare with the committed JSON (CI regression check)
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from eqat_kernels.triton_kernels.configs import (decode_max_m, fit_block_k, gemm_tiling, k_ranges, select_config,
                                                 uses_dense)

RESULTS = Path(__file__).parent / "results" / "kernel_model.json"


@dataclass(frozen=True)
class GPU:
    """Datasheet figures (SXM parts). issue: 4 schedulers x 1 warp-instruction (32 threads) per clock."""

    name: str
    cc: int
    sms: int
    clock_hz: float  # boost clock
    bandwidth: float  # HBM bytes/s
    fp16_tensor_flops: float  # dense
    latency_s: float  # DRAM load latency seen by an SM (microbenchmark literature: ~500-700 ns)
    max_regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    l2_bytes: int = 50 * 2**20
    max_shared_per_sm: int = 228 * 1024
    launch_s: float = 2.5e-6  # one kernel launch from PyTorch without CUDA graphs
    fp32_rate: int = 128  # FFMA/FADD/FMUL results per clock per SM (A100: 64)

    @property
    def issue_rate(self) -> float:  # thread-instructions per second, whole GPU
        return self.sms * 4 * 32 * self.clock_hz


GPUS = {
    # NVIDIA A100 SXM4 80GB datasheet: 2,039 GB/s, 312 TFLOPS fp16 dense, 108 SMs, 1410 MHz boost
    "A100": GPU("A100", 80, 108, 1.41e9, 2.039e12, 312e12, 600e-9, l2_bytes=40 * 2**20, max_shared_per_sm=164 * 1024,
                fp32_rate=64),
    # NVIDIA H100 SXM5 datasheet: 3.35 TB/s, 989 TFLOPS fp16 dense, 132 SMs, 1980 MHz boost
    "H100": GPU("H100", 90, 132, 1.98e9, 3.35e12, 989e12, 600e-9),
}

SETTINGS = {"w2g64": (2, 64), "w3g128": (3, 128), "w4g128": (4, 128)}
SHAPES = [(4096, 4096), (11008, 4096), (28672, 8192)]  # (N, K): attention, Llama-7B MLP, Llama-70B MLP
PATHS = [("forward", 1), ("forward", 2), ("forward", 4), ("forward", 8), ("forward", 16), ("forward", 4096), ("grad_input", 4096),
         ("grad_scales", 4096)]

CLASSES = {  # SASS opcode -> class in the instruction mix
    "LDG": "global_load", "STG": "global_store", "LDS": "shared_load", "STS": "shared_store", "LDSM": "shared_load",
    "LDGSTS": "async_copy", "UTMALDG": "async_copy", "BAR": "barrier", "HMMA": "mma", "HGMMA": "wgmma",
    "FFMA": "fma", "FMUL": "fma", "FADD": "fma", "HFMA2": "hfma2", "HMUL2": "hfma2", "HADD2": "hfma2",
    "I2F": "convert", "I2FP": "convert", "F2F": "convert", "F2FP": "convert", "F2I": "convert",
    "LOP3": "int_bit", "SHF": "int_bit", "SGXT": "int_bit", "IADD3": "int_bit", "IMAD": "int_bit", "LEA": "int_bit",
    "PRMT": "int_bit", "BFE": "int_bit", "ISETP": "int_bit", "SEL": "int_bit", "IMNMX": "int_bit", "VIMNMX": "int_bit",
    "SHFL": "shuffle",
}
# Results per clock per SM of the pipes slower than the issue rate (4 schedulers x 32 = 128): the CUDA C++
# Programming Guide's "Throughput of Native Arithmetic Instructions" for compute capability 8.0 and 9.0
# (32-bit integer add / shift / bitwise / compare / multiply-add: 64; "all other type conversions": 16, which
# covers sm_90's I2FP as well (Triton's PR 4563: "Hopper has very low throughput of conversion instructions");
# warp shuffle: 32). fp32 FMA runs at `GPU.fp32_rate`; 16-bit pairs (HFMA2) at the full issue rate.
PIPE_RATES = {"int_bit": 64, "convert": 16, "shuffle": 32}
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")


def parse_sass(sass: str) -> list[tuple[int, str, str, str]]:
    """(address, opcode, modifiers, operands) per instruction of the (single) kernel in `sass`."""
    return [(int(m.group(1), 16), m.group(2), m.group(3), m.group(4)) for m in map(_LINE.match, sass.splitlines()) if m]


def main_loop(instrs: list[tuple]) -> list[tuple]:
    """The instructions of the outermost backward branch's range: the K loop of every eqat kernel."""
    loops = []
    for addr, op, _, operands in instrs:
        target = re.match(r"`?\(?(0x[0-9a-f]+)", operands.strip()) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return []
    start, end = max(loops, key=lambda r: r[1] - r[0])
    return [i for i in instrs if start <= i[0] <= end]


def class_counts(instrs: list[tuple]) -> Counter:
    """Instructions per class of the mix (`CLASSES`; anything else is "other")."""
    return Counter(CLASSES.get(op, "other") for _, op, _, _ in instrs)


def mix(loop: list[tuple]) -> dict[str, int]:
    counts = class_counts(loop)
    widths = Counter(f"LDG{mod}" for _, op, mod, _ in loop if op == "LDG")
    return {"total": len(loop), **counts, **{k.replace(".", "_"): v for k, v in widths.items()}}


def issue_slots(counts: dict[str, int], gpu: GPU) -> tuple[float, str]:
    """Full-rate issue slots a mix of instruction classes needs (its count, or its busiest pipe's demand if
    that is more), and what sets it: "issue" or the pipe's class."""
    rates = {**PIPE_RATES, "fma": gpu.fp32_rate}
    demand = {c: counts.get(c, 0) * 128 / r for c, r in rates.items()}
    pipe = max(demand, key=demand.get)
    total = sum(counts.values())
    return (demand[pipe], pipe) if demand[pipe] > total else (total, "issue")


def _weight_bytes_per_iteration(kernel: str, cfg: dict, bits: int, group: int, k: int) -> float:
    """Packed codes plus the fp16 scale and packed zero point of each group the tile touches."""
    bn, bk = cfg.get("BLOCK_N", 1), cfg.get("BLOCK_K", 1)
    g = k if group == -1 else group
    return bn * bk * bits / 8 + bn * (bk / g) * (2 + bits / 8)


def launch_split(report: dict, gpu: GPU, n: int, k: int) -> int:
    """The K split the launcher chooses for `report`'s launch re-gridded to (n, k) on `gpu` (configs.k_ranges)."""
    m, bits, group = report["m"], report["bits"], report["group_size"]
    exact = report["dtype"] == "float32"
    g = k if group == -1 else group
    decode = m <= decode_max_m(bits, g, not exact)
    cfg = select_config("decode" if decode else "gemm", m, n, k, bits, group, exact)
    bk = fit_block_k(cfg.block_k, g) if decode else gemm_tiling(bits, cfg.block_m, cfg.block_k, g, not exact)[0]
    tiles = math.ceil(n / cfg.block_n) * math.ceil(m / cfg.block_m)
    return k_ranges(k, bk, tiles, gpu.sms, cfg)[0]


def model_row(report: dict, gpu: GPU, n: int, k: int) -> dict:
    """Predicted time of one launch of `report`'s kernel, re-gridded for (n, k)."""
    kernel, cfg, bits, group, m = report["kernel"], report["config"], report["bits"], report["group_size"], report["m"]
    instrs = parse_sass(report["sass"])
    loop = main_loop(instrs)
    threads = 32 * cfg.get("num_warps", 4)
    bn, bk, bm = cfg.get("BLOCK_N", 1), cfg.get("BLOCK_K", 1), cfg.get("BLOCK_M", 1)
    wbytes = _weight_bytes_per_iteration(kernel, cfg, bits, group, k)
    # a kernel without a K loop (dequantize) is one tile per program: all its instructions count
    ipb = len(loop or instrs) * threads / wbytes if wbytes else float("nan")
    split = launch_split(report, gpu, n, k) if kernel in ("decode_splitk", "gemm_fwd") else 1
    # grid and loop trip counts as the launcher would choose them for this (n, k)
    if kernel == "decode_splitk":
        n_tiles, k_tiles = math.ceil(n / bn), math.ceil(k / bk)
        programs, iters = n_tiles * split * math.ceil(m / bm), math.ceil(k_tiles / split)
    elif kernel == "gemm_fwd":
        programs, iters = math.ceil(m / bm) * math.ceil(n / bn) * split, math.ceil(math.ceil(k / bk) / split)
    elif kernel == "grad_input":
        programs, iters = math.ceil(m / bm) * math.ceil(k / bk), math.ceil(n / bn)
    elif kernel == "grad_scales" and cfg.get("DENSE_GW"):  # weighting cuBLAS's fp32 x^T dy, chunk by chunk
        g = k if group == -1 else group
        programs, iters = math.ceil(n / bn) * math.ceil(k / g), math.ceil(g / bk)
    elif kernel == "grad_scales":
        programs, iters = math.ceil(n / bn) * math.ceil(k / (k if group == -1 else group)), math.ceil(m / bm)
    elif kernel == "dequantize":
        programs, iters = math.ceil(n / bn) * math.ceil(k / bk), 1
    else:
        programs, iters = 1, 1
    body_instrs = loop or instrs
    loop_at = {i[0] for i in loop}
    body, issue_bound = issue_slots(class_counts(body_instrs), gpu)
    other = issue_slots(class_counts([i for i in instrs if i[0] not in loop_at]), gpu)[0] if loop else 0
    slots = programs * threads * (iters * body + other)
    # occupancy: resident programs per SM from registers, threads and shared memory
    regs = max(report["registers"], 1)
    per_sm = min(gpu.max_regs_per_sm // (regs * threads), gpu.max_threads_per_sm // threads,
                 gpu.max_shared_per_sm // max(report["shared_bytes"], 1) if report["shared_bytes"] else 64)
    per_sm = max(per_sm, 1)
    active_sms = min(gpu.sms, programs)
    resident = min(per_sm, math.ceil(programs / gpu.sms))
    warps_per_sm = resident * threads // 32
    issue = active_sms * min(4, warps_per_sm) * 32 * gpu.clock_hz
    t_issue = slots / issue
    # bytes: weights once per (M tile) pass, activations in and out
    act = 2 if report["dtype"] != "float32" else 4
    weight_total = n * k * bits / 8 + n * math.ceil(k / (k if group == -1 else group)) * (2 + bits / 8)
    # a weight re-read by several M tiles (or decode rows) comes from L2 when it fits there
    rereads = 0 if weight_total <= gpu.l2_bytes / 2 else 1
    if kernel in ("gemm_fwd", "grad_input"):
        weight_reads = weight_total * (1 + rereads * (math.ceil(m / bm) - 1))
        # a split's fp32 partials, written once and read once by each tile's last program
        io = act * (m * k + m * n) + (2 * 4 * m * n * split if split > 1 else 0)
    elif kernel == "grad_scales" and cfg.get("DENSE_GW"):
        weight_reads, io = weight_total, 4 * n * k  # the fp32 x^T dy read once
    elif kernel == "grad_scales":
        weight_reads = weight_total
        io = act * (m * k + m * n) * math.ceil(n / bn)  # x re-read per N tile, dy per group
    elif kernel == "decode_splitk":
        weight_reads = weight_total * (1 + rereads * (math.ceil(m / bm) - 1))  # once per tile of bm rows
        ranges = math.ceil(k / bk / iters)  # partials written once and read once by each tile's last program
        io = act * (m * k + m * n) + (2 * 4 * m * n * ranges if ranges > 1 else 0)
    elif kernel == "dequantize":
        weight_reads, io = weight_total, act * n * k  # the dense W_hat written once
    else:
        raise ValueError(f"no traffic model for kernel {kernel!r}")
    bytes_total = weight_reads + io
    # loads one program has outstanding: an iteration's tiles (times the software-pipelining depth)
    per_program = wbytes * max(1, cfg.get("num_stages", 1) - 1)
    in_flight = active_sms * resident * per_program
    efficiency = min(1.0, in_flight / (gpu.bandwidth * gpu.latency_s))
    t_mem = bytes_total / (gpu.bandwidth * max(efficiency, 1e-3))
    flops = 2 * m * n * k
    uses_tc = report["has_mma"] or report["has_wgmma"]
    t_tc = flops / gpu.fp16_tensor_flops if uses_tc else 0.0
    time = max(t_mem, t_issue, t_tc) + gpu.launch_s
    return {"instr_per_weight_byte": round(ipb, 2), "issue_slots_per_weight_byte": round(body * threads / wbytes, 2)
            if wbytes else float("nan"), "loop_instructions": len(loop), "programs": programs,
            "resident_per_sm": resident, "bytes_in_flight_per_sm": round(in_flight / max(active_sms, 1)),
            "latency_efficiency": round(efficiency, 3), "t_mem_us": t_mem * 1e6, "t_issue_us": t_issue * 1e6,
            "t_tensor_us": t_tc * 1e6, "predicted_us": time * 1e6, "bound": max(
                (("memory", t_mem), (issue_bound, t_issue), ("tensor", t_tc)), key=lambda p: p[1])[0],
            "mix": mix(loop)}


def fp16_cublas_us(gpu: GPU, m: int, n: int, k: int, weight_bytes: int = 2) -> float:
    """fp16 dense GEMM at its own roofline (a lower bound on cuBLAS), one launch; `weight_bytes` per element
    of the N x K operand (4: the dense scale gradient's fp32 x^T dy output)."""
    bytes_total = weight_bytes * n * k + 2 * (m * k + m * n)
    return (max(bytes_total / gpu.bandwidth, 2 * m * n * k / gpu.fp16_tensor_flops) + gpu.launch_s) * 1e6


def dense_cublas_us(op: str, gpu: GPU, m: int, n: int, k: int) -> float:
    """The cuBLAS product of `op`'s dense path: W_hat in fp16 (forward, dx) or x^T dy out in fp32 (ds)."""
    return fp16_cublas_us(gpu, m, n, k, 4 if op == "grad_scales" else 2)


def dense_part_us(op: str, gpu: GPU, m: int, n: int, k: int, bits: int) -> float:
    """The cuBLAS product of a launch that takes the dense path (`configs.uses_dense`), 0 otherwise."""
    if op not in ("forward", "grad_input", "grad_scales") or not uses_dense(op, m, gpu.cc, True, bits):
        return 0.0
    return dense_cublas_us(op, gpu, m, n, k)


def _builds(job):
    from eqat_kernels.triton_kernels.aot import Case, build

    op, m, bits, group, cc = job
    case = Case(op, m, 4096, 4096, bits, group)  # the code does not depend on N, K beyond divisibility
    return job, [asdict(r) for r in build(case, cc, with_sass=True)]


def collect(workers: int = 2) -> list[dict]:
    jobs = [(op, m, b, g, gpu.cc) for gpu in GPUS.values() for op, m in PATHS for b, g in SETTINGS.values()]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = dict(pool.map(_builds, jobs))
    records = []
    for gpu in GPUS.values():
        for (op, m, bits, group, cc), reports in built.items():
            if cc != gpu.cc:
                continue
            for n, k in SHAPES:
                rows = [{**model_row(r, gpu, n, k), "kernel": r["kernel"], "config": r["config"],
                         "registers": r["registers"], "shared_bytes": r["shared_bytes"]} for r in reports]
                # from DENSE_MIN_M rows: forward / dx dequantize then cuBLAS; ds cuBLAS x^T dy then our weighting
                dense = dense_part_us(op, gpu, m, n, k, bits) > 0
                ours = sum(r["predicted_us"] for r in rows) + dense_part_us(op, gpu, m, n, k, bits)
                base = fp16_cublas_us(gpu, m, n, k)
                main = rows[0]
                records.append({
                    "gpu": gpu.name, "op": op, "kernel": "+".join([r["kernel"] for r in rows] + ["cublas"] * dense),
                    "bits": bits,
                    "group_size": group, "M": m, "N": n, "K": k,
                    "instr_per_weight_byte": main["instr_per_weight_byte"],
                    "issue_slots_per_weight_byte": main["issue_slots_per_weight_byte"],
                    "predicted_us": round(ours, 3), "predicted_fp16_us": round(base, 3),
                    "predicted_speedup_vs_fp16": round(base / ours, 3),
                    "roofline_speedup_m1": round(16 / (bits + 32 / group), 3),
                    "bound": main["bound"], "latency_efficiency": main["latency_efficiency"],
                    "programs": main["programs"], "registers": main["registers"],
                    "shared_bytes": main["shared_bytes"], "config": main["config"], "mix": main["mix"],
                    "label": "predicted"})
    return records


CROSSOVER_M = (128, 256, 512, 1024, 2048, 4096)


def _crossover_build(job):
    """The first launch of one build: a fused tile (`fused`, the config of every M above 128) or the
    launcher's own choice (the dense paths' kernels)."""
    from eqat_kernels.triton_kernels.aot import Case, build

    op, m, bits, group, cc, fused = job
    config = select_config("gemm" if op == "forward" else op, m, 4096, 4096, bits, group) if fused else None
    return job, asdict(build(Case(op, m, 4096, 4096, bits, group, config=config), cc, with_sass=True)[0])


def _dense_job(op: str, bits: int, group: int, cc: int) -> tuple:
    """The dense path's own kernel: ds weights cuBLAS's x^T dy (the launcher's choice at M = 4096); forward
    and dx dequantize."""
    return ("grad_scales", 4096, bits, group, cc, False) if op == "grad_scales" else ("dequantize", 1, bits, group, cc, False)


def crossover(workers: int = 2) -> list[dict]:
    """Forward, dx and ds on 4096 x 4096 at several M, PREDICTED: our fused tiles vs the dense path (forward,
    dx: dequantize + cuBLAS; ds: cuBLAS's fp32 x^T dy + our weighting per group); the evidence for
    `configs.DENSE_MIN_M`."""
    ops_ = ("forward", "grad_input", "grad_scales")
    keys = [(gpu.cc, op, b, g) for gpu in GPUS.values() for op in ops_ for b, g in SETTINGS.values()]
    jobs = {(op, 4096, b, g, cc, True) for cc, op, b, g in keys} | {_dense_job(op, b, g, cc) for cc, op, b, g in keys}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = dict(pool.map(_crossover_build, sorted(jobs)))
    rows = []
    for gpu in GPUS.values():
        for b, g in SETTINGS.values():
            for op in ops_:
                report, dense = built[(op, 4096, b, g, gpu.cc, True)], built[_dense_job(op, b, g, gpu.cc)]
                for m in CROSSOVER_M:
                    t_fused = model_row({**report, "m": m}, gpu, 4096, 4096)["predicted_us"]
                    t_dense = model_row({**dense, "m": m}, gpu, 4096, 4096)["predicted_us"]
                    t_dense += dense_cublas_us(op, gpu, m, 4096, 4096)
                    t_cublas = fp16_cublas_us(gpu, m, 4096, 4096)
                    rows.append({"gpu": gpu.name, "op": op, "bits": b, "group_size": g, "M": m,
                                 "fused_us": round(t_fused, 2), "dense_us": round(t_dense, 2),
                                 "fp16_us": round(t_cublas, 2), "label": "predicted"})
    return rows


def print_crossover(rows: list[dict]) -> None:
    print("\nPREDICTED fused tiles vs the dense path, 4096 x 4096 (speedup vs fp16 cuBLAS; * = launcher's path)")
    print(f"{'gpu':5} {'op':11} {'setting':7} " + " ".join(f"{'M=' + str(m):>13}" for m in CROSSOVER_M))
    keys = sorted({(r["gpu"], r["op"], r["bits"], r["group_size"]) for r in rows})
    for gpu, op, bits, group in keys:
        cells = []
        for m in CROSSOVER_M:
            r = next(x for x in rows if (x["gpu"], x["op"], x["bits"], x["group_size"], x["M"]) == (gpu, op, bits, group, m))
            f, d = r["fp16_us"] / r["fused_us"], r["fp16_us"] / r["dense_us"]
            dense = uses_dense(op, m, GPUS[gpu].cc, True, bits)
            cells.append(f"{f:.2f}{'*' if not dense else ' '}/{d:.2f}{'*' if dense else ' '}")
        print(f"{gpu:5} {op:11} w{bits}g{group:<5} " + " ".join(f"{c:>13}" for c in cells))


def print_table(records: list[dict]) -> None:
    print("PREDICTED by a static model of the SASS (no GPU was used); speedup vs fp16 cuBLAS at its roofline")
    print(f"{'gpu':5} {'op':12} {'setting':7} {'M':>5} {'N x K':>12} {'instr/B':>7} {'slots/B':>7} {'bound':8} {'eff':>5} "
          f"{'pred us':>9} {'fp16 us':>8} {'speedup':>7} {'% roof':>6}")
    for r in records:
        setting = f"w{r['bits']}g{r['group_size']}"
        roof = r["roofline_speedup_m1"] if r["M"] == 1 else float("nan")
        pct = 100 * r["predicted_speedup_vs_fp16"] / roof if r["M"] == 1 else float("nan")
        print(f"{r['gpu']:5} {r['op']:12} {setting:7} {r['M']:>5} {str(r['N']) + 'x' + str(r['K']):>12} "
              f"{r['instr_per_weight_byte']:>7.2f} {r['issue_slots_per_weight_byte']:>7.2f} {r['bound']:8} "
              f"{r['latency_efficiency']:>5.2f} "
              f"{r['predicted_us']:>9.2f} {r['predicted_fp16_us']:>8.2f} {r['predicted_speedup_vs_fp16']:>7.2f} "
              f"{pct:>6.0f}")


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, gpu in zip(axes, GPUS):
        for setting, (bits, group) in SETTINGS.items():
            rows = [r for r in records if r["gpu"] == gpu and r["bits"] == bits and r["op"] == "forward"
                    and (r["N"], r["K"]) == (4096, 4096)]
            rows.sort(key=lambda r: r["M"])
            ax.plot([r["M"] for r in rows], [r["predicted_speedup_vs_fp16"] for r in rows], "o-", label=setting)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{gpu}: forward, 4096 x 4096 (PREDICTED)")
        ax.set_xlabel("M (tokens)")
    axes[0].set_ylabel("predicted speedup vs fp16 cuBLAS roofline")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check(records: list[dict], baseline: list[dict], tolerance: float = 0.02) -> list[str]:
    """Regressions: a kernel's instructions per weight byte or predicted time up by more than `tolerance`."""
    key = lambda r: (r["gpu"], r["op"], r["bits"], r["group_size"], r["M"], r["N"], r["K"])  # noqa: E731
    old = {key(r): r for r in baseline}
    problems = []
    for r in records:
        b = old.get(key(r))
        if b is None:
            continue
        for field in ("instr_per_weight_byte", "predicted_us"):
            if r[field] > b[field] * (1 + tolerance) + 1e-9:
                problems.append(f"{key(r)} {field}: {b[field]} -> {r[field]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if worse than the committed JSON; write nothing")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    records = collect()
    print_table(records)
    if args.check:
        problems = check(records, json.loads(RESULTS.read_text()))
        print("\n".join(problems) or "no regression against the committed predictions")
        return 1 if problems else 0
    cross = crossover()
    print_crossover(cross)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(records, indent=1))
    Path(args.out).with_name("kernel_crossover.json").write_text(json.dumps(cross, indent=1))
    plot(records, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
