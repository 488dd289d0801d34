"""The README's quality table: fp32, RTN, GPTQ and Block-AP on SmolLM2-135M at w2g64, w3g128, w4g128.

Each quantization runs as its own `eqat quantize` process (so its wall time and peak RSS are its own),
with 128 calibration windows of 512 tokens; perplexity on the first 40 windows of the stdlib text
(never calibrated on) and of the `fortunes` quotations (another genre).

    python benchmarks/quality_table.py                     # everything (about an hour on 2 cores)
    python benchmarks/quality_table.py --methods rtn gptq  # a subset
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import SETTINGS, write_json

RUNS = Path("runs/quality")


def run_one(method: str, setting: str, extra: list[str]) -> dict:
    bits, group = SETTINGS[setting]
    out = RUNS / f"{setting}-{method}"
    if (out / "eqat_results.json").exists():
        return json.loads((out / "eqat_results.json").read_text())
    cmd = [sys.executable, "-m", "eqat_train.cli", "quantize", "--method", method, "--bits", str(bits),
           "--group-size", str(group), "--calib-windows", "128", "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "eqat_results.json").read_text())
    print(f"  {setting} {method}: {result['perplexity']} in {time.time() - t0:.0f} s", flush=True)
    return result


def fp_row() -> dict:
    from eqat_train.pipeline import fp_perplexity, peak_rss_mb

    return {"method": "fp32", "perplexity": fp_perplexity(None, ["stdlib", "fortunes"]), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "block_ap"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed on to eqat quantize")
    args = parser.parse_args()
    rows = [dict(setting=s, **{k: v for k, v in run_one(m, s, args.extra).items() if k != "blocks"})
            for s in args.settings for m in args.methods]
    rows.insert(0, dict(setting="-", **fp_row()))
    write_json("quality_smollm2.json", {"rows": rows})
    print("\n| setting | method | ppl stdlib | ppl fortunes | quantize wall s | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        p = r["perplexity"]
        print(f"| {r['setting']} | {r['method']} | {p.get('stdlib', '-')} | {p.get('fortunes', '-')} | "
              f"{r.get('quantize_seconds', '-')} | {r.get('peak_rss_mb', '-')} |")


if __name__ == "__main__":
    main()
