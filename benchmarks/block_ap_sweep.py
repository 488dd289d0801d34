"""Block-AP design sweep on single SmolLM2 blocks: learning-rate scaling, loss, epochs.

Each config trains a copy of block i on the fp activations reaching it (64 calibration windows, 8
held-out windows) and reports the held-out relative error of the packed block, sum ||out - fp||^2 /
||fp||^2 per token, and plain MSE. Lower is better; min-max (RTN) is `init`.

    python benchmarks/block_ap_sweep.py --blocks 5 20 --configs '[{"lr_scale": 20}, {"lr_scale": 200}]'
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from eqat_kernels import compute_path
from eqat_train import data, models
from eqat_train.block_ap import BlockAPConfig
from eqat_train.activations import ActivationStore, capture_block_inputs, run_block
from eqat_train.blockwise import BlockData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--configs", default='[{"lr_scale": 20}, {"lr_scale": 200}]', help="JSON list of BlockAPConfig overrides")
    parser.add_argument("--calib-windows", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm, tok, _ = models.load_model()
    split = data.split_windows(data.tokenize_windows(tok, data.stdlib_text(), 512), 40, args.calib_windows, 8)
    hidden, ctx = capture_block_inputs(lm, torch.cat([split.calib, split.val]))
    _, blocks = models.find_blocks(lm)
    n = args.calib_windows
    for i in range(max(args.blocks) + 1):
        if i in args.blocks:
            cal_in, val_in = ActivationStore(hidden[:n], dtype="float32"), ActivationStore(hidden[n:], dtype="float32")
            cal_out = ActivationStore(run_block(blocks[i], ctx, cal_in, 8), dtype="float32")
            val_out = ActivationStore(run_block(blocks[i], ctx, val_in, 8), dtype="float32")
            for overrides in json.loads(args.configs):
                block, t0 = copy.deepcopy(blocks[i]), time.time()
                stats = BlockAPConfig(**overrides).quantize_block(
                    BlockData(i, block, ctx, cal_in, cal_out, val_in, val_out, bf16=True))
                with compute_path(block, "reference"):
                    out, target = run_block(block, ctx, val_in, 8), val_out.get(slice(None))
                rel = ((out - target).pow(2).sum(-1) / target.pow(2).sum(-1)).mean().item()
                print(f"block {i} {overrides}: init {stats['val_loss_init']:.4f} -> rel {rel:.4f}, "
                      f"mse {(out - target).pow(2).mean().item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        hidden = run_block(blocks[i], ctx, ActivationStore(hidden, dtype="float32"), 8)


if __name__ == "__main__":
    main()
