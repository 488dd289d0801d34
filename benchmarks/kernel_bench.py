"""Kernel microbenchmark over real LLM layer shapes.

CUDA: Triton dequant-matmul vs torch.matmul fp16 (cuBLAS), both timed as CUDA-graph replays, speedup and
fraction of the `16 / (b + 32/g)` roofline (the shapes and settings of benchmarks/kernel_model.py, whose
predictions it would check). CPU: QuantLinear (torch's int4 kernel) vs fp32 and bf16 nn.Linear.
Prints a table, writes benchmarks/results/kernels_<device>.json and a plot.

    python benchmarks/kernel_bench.py                      # CPU defaults: M in 1,16,64
    python benchmarks/kernel_bench.py --m 1 16 64 256 2048 # the full grid (slow on CPU)
"""
from __future__ import annotations

import argparse

import torch

from common import LLM_SHAPES, SETTINGS, machine, median_seconds, random_quant_linear, write_json


def roofline(bits: int, group: int) -> float:
    """Ideal speedup over fp16 when the weight read is all that costs: 16 / (b + 32/g)."""
    return 16 / (bits + 32 / group)


def bench_cuda(shapes, ms, settings) -> list[dict]:
    from eqat_kernels.triton_kernels.ops import prepare_weight
    from eqat_kernels.triton_kernels.tuning import warmup

    rows = []
    for n, k in shapes:
        w16 = torch.randn(n, k, dtype=torch.float16, device="cuda")
        for name in settings:
            bits, group = SETTINGS[name]
            layer = random_quant_linear(n, k, bits, group, "cuda")
            warmup(prepare_weight(layer.qweight, layer.qzeros, layer.spec), layer.scales, layer.spec, m_values=ms)
            for m in ms:
                x = torch.randn(m, k, dtype=torch.float16, device="cuda")
                import triton.testing

                # CUDA graphs: time the kernels, not the Python checks and launches around them (at M = 1
                # those are longer than the kernels); both sides replayed the same way
                t_fp16 = triton.testing.do_bench_cudagraph(lambda: x @ w16.t()) * 1e-3
                with torch.no_grad():
                    layer(x)  # compile and pick configs outside the graph
                    t_q = triton.testing.do_bench_cudagraph(lambda: layer(x)) * 1e-3
                rows.append(dict(n=n, k=k, m=m, setting=name, baseline="torch.matmul fp16", baseline_s=t_fp16,
                                 quant_s=t_q, speedup=t_fp16 / t_q, roofline=roofline(bits, group),
                                 roofline_fraction=(t_fp16 / t_q) / roofline(bits, group)))
                print_row(rows[-1])
    return rows


def bench_cpu(shapes, ms, settings, min_run_time) -> list[dict]:
    rows = []
    for n, k in shapes:
        fp32 = torch.nn.Linear(k, n, bias=False)
        bf16 = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        layers = {name: random_quant_linear(n, k, *SETTINGS[name]) for name in settings}
        for m in ms:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            with torch.no_grad():
                t32 = median_seconds(lambda: fp32(x), min_run_time)
                t16 = median_seconds(lambda: bf16(xb), min_run_time)
                for name, layer in layers.items():
                    layer(x)  # builds the int4 repack once, outside the timing
                    tq = median_seconds(lambda: layer(x), min_run_time)
                    rows.append(dict(n=n, k=k, m=m, setting=name, baseline="nn.Linear fp32", baseline_s=t32,
                                     bf16_linear_s=t16, quant_s=tq, speedup=t32 / tq, speedup_vs_bf16=t16 / tq))
                    print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    extra = (f"x{r['speedup_vs_bf16']:6.2f} vs bf16" if "speedup_vs_bf16" in r
             else f"{100 * r['roofline_fraction']:5.1f}% of {r['roofline']:.2f}x roofline")
    print(f"{r['n']:>6}x{r['k']:<6} M={r['m']:<5} {r['setting']:7} {r['baseline']}: {r['baseline_s'] * 1e6:10.1f} us"
          f"  quant: {r['quant_s'] * 1e6:10.1f} us  x{r['speedup']:6.2f}  {extra}", flush=True)


def markdown(rows: list[dict]) -> str:
    """The README table: one row per (shape, M), one column per setting."""
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    cpu = "speedup_vs_bf16" in rows[0]
    head = "| N x K | M | " + rows[0]["baseline"] + " (us) | " + ("bf16 nn.Linear (us) | " if cpu else "")
    head += " | ".join(f"{s} (us, x)" for s in settings) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted({(r["n"], r["k"], r["m"]) for r in rows}, key=lambda t: (t[0] * t[1], t[0], t[2])):
        group = {r["setting"]: r for r in rows if (r["n"], r["k"], r["m"]) == key}
        first = next(iter(group.values()))
        line = f"| {key[0]}x{key[1]} | {key[2]} | {first['baseline_s'] * 1e6:.0f} | "
        if cpu:
            line += f"{first['bf16_linear_s'] * 1e6:.0f} | "
        line += " | ".join(f"{group[s]['quant_s'] * 1e6:.0f} (x{group[s]['speedup']:.2f})" for s in settings if s in group)
        lines.append(line + " |")
    return "\n".join(lines)


def plot(rows: list[dict], device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["n"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        for setting in SETTINGS:
            pts = sorted((r["m"], r["speedup"]) for r in rows if (r["n"], r["k"], r["setting"]) == (n, k, setting))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=setting)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{n}x{k}")
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel(f"speedup vs {rows[0]['baseline']}")
    axes[0][0].legend()
    fig.suptitle(f"QuantLinear speedup on {device}")
    fig.tight_layout()
    path = write_json.__globals__["RESULTS"] / f"kernels_{device}.png"
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", help="batch sizes (tokens)")
    parser.add_argument("--shapes", nargs="+", help="NxK layer shapes, e.g. 4096x4096")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per CPU timing")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else LLM_SHAPES
    ms = args.m or ([1, 16, 64, 256, 2048] if cuda else [1, 16, 64])
    device = "cuda" if cuda else "cpu"
    print(f"machine: {machine()}")
    rows = bench_cuda(shapes, ms, args.settings) if cuda else bench_cpu(shapes, ms, args.settings, args.min_run_time)
    path = write_json(f"kernels_{device}.json", {"machine": machine(), "rows": rows})
    print(f"json: {path}")
    print(markdown(rows))
    plot(rows, device)


if __name__ == "__main__":
    main()
