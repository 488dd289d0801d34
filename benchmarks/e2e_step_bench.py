"""One E2E-QP training step (forward + backward w.r.t. activations and scales) through QuantLinear's
fused autograd Function vs the obvious alternative, dequantize-then-autograd (unpack the codes to a dense
W_hat = (q - z) * s every step and let autograd differentiate the matmul and the scaling).

Layer level at LLM shapes, and a whole SmolLM2-135M step (512 tokens, loss.backward()). CPU here: the
fused side is the cached-(q - z) reference path; on CUDA it is the Triton forward, dx and fused ds.

    python benchmarks/e2e_step_bench.py
"""
from __future__ import annotations

import argparse

import torch

from common import median_seconds, random_quant_linear, write_json, machine
from eqat_kernels import QuantLinear, reference


def dequant_autograd_forward(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = reference.dequantize(layer.qweight, layer.qzeros, layer.scales, layer.spec, x.dtype)
    return torch.nn.functional.linear(x, w)


def layer_step(layer: QuantLinear, x: torch.Tensor, fused: bool):
    def step():
        layer.scales.grad = None
        xr = x.detach().requires_grad_(True)
        y = layer(xr) if fused else dequant_autograd_forward(layer, xr)
        y.float().square().mean().backward()
    return step


def model_step(fused: bool, tokens: int, dtype: torch.dtype):
    from eqat_train import data
    from eqat_train.e2e_qp import token_loss_sum, trainable_scales
    from eqat_train.examples import Examples, collate
    from eqat_train.models import load_model
    from eqat_kernels import quantize_linears, pack_all

    model, tok, _ = load_model(None)
    quantize_linears(model, bits=2, group_size=64, include=lambda name, m: name != "lm_head")
    pack_all(model)
    trainable_scales(model)
    if not fused:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.forward = (lambda mod: lambda x: dequant_autograd_forward(mod, x))(m)
    batch = collate(Examples.from_windows(data.tokenize_windows(tok, data.stdlib_text(), tokens)[40:41]), [0])

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, _ = token_loss_sum(model, batch)
        loss.backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows = []
    for n, k in [(4096, 4096), (11008, 4096)]:
        for bits, group in [(2, 64), (4, 128)]:
            layer = random_quant_linear(n, k, bits, group, device).to(dtype)
            layer.scales.data = layer.scales.data.float()
            layer.train_scales(True)
            x = torch.randn(args.tokens, k, device=device, dtype=dtype)
            t_fused = median_seconds(layer_step(layer, x, True), 1.0)
            t_deq = median_seconds(layer_step(layer, x, False), 1.0)
            rows.append({"level": "layer", "shape": f"{n}x{k}", "setting": f"w{bits}g{group}", "tokens": args.tokens,
                         "fused_ms": round(t_fused * 1e3, 2), "dequant_autograd_ms": round(t_deq * 1e3, 2),
                         "speedup": round(t_deq / t_fused, 2)})
            print(rows[-1], flush=True)
    if not args.skip_model and device == "cpu":
        for dt in (torch.float32, torch.bfloat16):
            t_fused = median_seconds(model_step(True, args.tokens, dt), 5.0)
            t_deq = median_seconds(model_step(False, args.tokens, dt), 5.0)
            rows.append({"level": "SmolLM2-135M step", "shape": "-", "setting": f"w2g64 {str(dt)[6:]}",
                         "tokens": args.tokens, "fused_ms": round(t_fused * 1e3, 1),
                         "dequant_autograd_ms": round(t_deq * 1e3, 1), "speedup": round(t_deq / t_fused, 2)})
            print(rows[-1], flush=True)
    write_json(f"e2e_step_{device}.json", {"machine": machine(), "rows": rows})
    print("\n| level | shape | setting | tokens | fused ms | dequantize+autograd ms | speedup |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['level']} | {r['shape']} | {r['setting']} | {r['tokens']} | {r['fused_ms']} | "
              f"{r['dequant_autograd_ms']} | {r['speedup']}x |")


if __name__ == "__main__":
    main()
