"""E2E-QP design sweep: start from a finished Block-AP checkpoint, train the scales with each config,
and report perplexity on the default text's held-out windows and on a second genre (fortunes).

    python benchmarks/e2e_sweep.py runs/quality/w2g64-block_ap --configs '[{"lr_scale": 1}, {"lr_scale": 10}]'
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from eqat_train import data
from eqat_train.checkpoint import load_quantized
from eqat_train.e2e_qp import E2EConfig, E2ETrainer
from eqat_train.examples import Examples
from eqat_train.pipeline import evaluate_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--configs", default='[{"lr_scale": 1}]', help="JSON list of E2EConfig overrides")
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--texts", nargs="+", default=["stdlib", "fortunes"])
    args = parser.parse_args()
    rows = []
    for overrides in json.loads(args.configs):
        model, tok = load_quantized(args.checkpoint)
        bits = model.config.quantization_config["bits"] if hasattr(model.config, "quantization_config") else None
        bits = bits or json.load(open(f"{args.checkpoint}/config.json"))["quantization_config"]["bits"]
        split = data.split_windows(data.tokenize_windows(tok, data.stdlib_text(), 512), 40, args.calib_windows, 8)
        cfg = E2EConfig(bits=bits, **overrides)
        torch.manual_seed(0)
        t0 = time.time()
        log = E2ETrainer(model, Examples.from_windows(split.calib), cfg).train()
        seconds = time.time() - t0
        ppl = evaluate_texts(model, tok, args.texts, 512, args.eval_windows, progress=False)
        rows.append({"config": overrides, "seconds": round(seconds), "first_loss": round(log[0]["loss"], 4),
                     "last_loss": round(sum(r["loss"] for r in log[-4:]) / min(4, len(log)), 4), **ppl})
        print(json.dumps(rows[-1]), flush=True)
    print("| config | s | loss first -> last4 | " + " | ".join(args.texts) + " |")
    for r in rows:
        print(f"| {json.dumps(r['config'])} | {r['seconds']} | {r['first_loss']} -> {r['last_loss']} | "
              + " | ".join(str(r.get(t)) for t in args.texts) + " |")


if __name__ == "__main__":
    main()
