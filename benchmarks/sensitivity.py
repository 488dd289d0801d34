"""Where the quantization error of a model lives: round-to-nearest (min-max, the format's grid) applied to
one kind of linear layer at a time (all blocks), then to one range of blocks at a time (all kinds), each
compared with the fp model on a text (perplexity ratio, KL(fp || q) per token, top-1 agreement).

A diagnostic for choosing what to train or protect, not a method: every row quantizes only part of the
model. Use a validation text, not a reported one. `--whole` adds whole-model RTN rows at other settings
and the fp model run in bf16: the floor that any quantized model is measured against.

    python benchmarks/sensitivity.py --bits 4 --group-size 128 --text licenses --windows 6 --whole w8g128 w4g32 w4g64
"""
from __future__ import annotations

import argparse

import torch

from common import write_json
from eqat_kernels.quantizer import fake_quantize, minmax_init
from eqat_kernels.spec import QuantSpec
from eqat_train import data, fidelity, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--text", default="licenses")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--block-span", type=int, default=5, help="blocks per range in the second table")
    parser.add_argument("--whole", nargs="*", default=[], help="whole-model RTN settings to add, e.g. w8g128 w4g32")
    args = parser.parse_args()

    fp, tok, _ = models.load_model(args.model)
    q, _, _ = models.load_model(args.model)
    windows = data.evaluation_windows(tok, [args.text], 512, args.windows)[args.text]
    _, blocks = models.find_blocks(q)
    original = {n: p.detach().clone() for n, p in q.named_parameters()}
    kinds = list(models.block_linears(blocks[0]))

    @torch.no_grad()
    def quantize_where(select, bits: int, group: int) -> None:
        for n, p in q.named_parameters():
            p.copy_(original[n])
        for i, block in enumerate(blocks):
            for kind, lin in models.block_linears(block).items():
                if select(i, kind):
                    spec = QuantSpec(bits, group, lin.in_features, lin.out_features)
                    lin.weight.copy_(fake_quantize(lin.weight.float(), *minmax_init(lin.weight, spec), spec))

    rows = []

    def measure(label: str, select, bits: int = args.bits, group: int = args.group_size) -> None:
        quantize_where(select, bits, group)
        r = fidelity.compare_on_windows(q, fp, windows, progress=False)
        rows.append({"quantized": label, **r.as_dict()})
        print(f"| {label} | {r.ppl_ratio:.4f} | {r.kl:.4f} | {r.top1:.3f} |", flush=True)

    print(f"RTN w{args.bits}g{args.group_size} on part of the model; {args.text}, {args.windows} x 512 windows")
    print("| quantized | ppl ratio | KL(fp ‖ q) | top-1 |\n|---|---|---|---|")
    measure("all", lambda i, kind: True)
    for k in kinds:
        measure(k, lambda i, kind, k=k: kind == k)
    for lo in range(0, len(blocks), args.block_span):
        hi = min(lo + args.block_span, len(blocks))
        measure(f"blocks {lo}-{hi - 1}", lambda i, kind, lo=lo, hi=hi: lo <= i < hi)
    for setting in args.whole:
        bits, group = (int(v) for v in setting.removeprefix("w").split("g"))
        measure(f"all, RTN {setting}", lambda i, kind: True, bits, group)
    if args.whole:
        half, _, _ = models.load_model(args.model, dtype=torch.bfloat16)
        r = fidelity.compare_on_windows(half, fp, windows, progress=False)
        rows.append({"quantized": "none, fp model in bf16", **r.as_dict()})
        print(f"| none, fp model in bf16 | {r.ppl_ratio:.4f} | {r.kl:.4f} | {r.top1:.3f} |", flush=True)
    write_json(f"sensitivity_w{args.bits}g{args.group_size}_{args.text}.json", {"rows": rows, "args": vars(args)})


if __name__ == "__main__":
    main()
