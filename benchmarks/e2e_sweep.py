"""E2E-QP design sweep: start from a finished block-wise checkpoint, train the scales with each config,
and report fidelity to the fp model (perplexity ratio, KL, top-1) per text. Choose settings on the
validation text (`licenses` by default), never on a text you report.

    python benchmarks/e2e_sweep.py runs/w2-bap --configs '[{"lr_scale": 10}, {"lr_scale": 20, "loss": "ce"}]'
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from eqat_train import data, fidelity, models, runstate
from eqat_train.checkpoint import load_quantized, read_quantization_config
from eqat_train.configs import RunConfig
from eqat_train.pipeline import load_teacher
from eqat_train.e2e_qp import E2EConfig, E2ETrainer
from eqat_train.examples import Examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--configs", default='[{}]', help="JSON list of E2EConfig overrides")
    parser.add_argument("--text", default="self", help="calibration source (self, a text, or a mixture a+b)")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=data.EVAL_WINDOWS)
    parser.add_argument("--texts", nargs="+", default=["licenses"], help="validation texts")
    args = parser.parse_args()
    from pathlib import Path

    runstate.reuse_freed_memory()  # as the eqat CLI does, so the seconds column matches its stage times

    q = read_quantization_config(Path(args.checkpoint))
    fp, tok, _ = models.load_model(q["eqat"]["model"])
    # the validation count of `eqat quantize`, so the self-generated set it made is reused
    split = data.calibration_split(args.text, fp, tok, 512, args.eval_windows, args.calib_windows, RunConfig.val_windows)
    windows = {t: data.tokenize_windows(tok, data.load_text(t), 512)[:args.eval_windows] for t in args.texts}
    rows = []
    for overrides in json.loads(args.configs):
        model, _ = load_quantized(args.checkpoint, dtype=torch.float32)
        cfg = E2EConfig(**overrides)
        teacher = load_teacher(q["eqat"]["model"], bf16=True)
        torch.manual_seed(0)
        t0 = time.time()
        log = E2ETrainer(model, Examples.from_windows(split.calib), cfg, teacher=teacher).train()
        seconds = time.time() - t0
        row = {"config": overrides, "seconds": round(seconds), "first_loss": round(log[0]["loss"], 4),
               "last_loss": round(sum(r["loss"] for r in log[-4:]) / min(4, len(log)), 4)}
        for t, w in windows.items():
            row[t] = fidelity.compare_on_windows(model, fp, w, progress=False).as_dict()
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    print("| config | s | loss first -> last4 | " + " | ".join(f"{t} ratio / KL / top-1" for t in args.texts) + " |")
    for r in rows:
        print(f"| {json.dumps(r['config'])} | {r['seconds']} | {r['first_loss']} -> {r['last_loss']} | "
              + " | ".join(f"{r[t]['ppl_ratio']:.3f} / {r[t]['kl']:.4f} / {r[t]['top1']:.3f}" for t in args.texts) + " |")


if __name__ == "__main__":
    main()
