"""The README's quality table: fp32, RTN, GPTQ and Block-AP on SmolLM2-135M at w2g64, w3g128, w4g128.

Each quantization runs as its own `eqat quantize` process (so its wall time and peak RSS are its own),
with 128 calibration windows of 512 tokens; perplexity on the first 40 windows of the stdlib text
(never calibrated on) and of the `fortunes` quotations (another genre).

    python benchmarks/quality_table.py                     # everything (about 1.5 hours on 2 cores)
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
    """`rtn`, `gptq`, `block_ap`: the block-wise stage alone (`--skip-e2e`). `block_ap+e2e`: E2E-QP
    (`eqat e2e`, defaults) on the `block_ap` checkpoint; its wall time adds both stages' times."""
    bits, group = SETTINGS[setting]
    out = RUNS / f"{setting}-{method}"
    if (out / "eqat_results.json").exists():
        result = json.loads((out / "eqat_results.json").read_text())
        result.setdefault("trainable_params", trained_params(out))
        return result
    if method == "block_ap+e2e":
        first = run_one("block_ap", setting, extra)
        cmd = [sys.executable, "-m", "eqat_train.cli", "e2e", first["out"], "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "eqat_train.cli", "quantize", "--method", method, "--bits", str(bits),
               "--group-size", str(group), "--calib-windows", "128", "--skip-e2e", "--out", str(out), *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "eqat_results.json").read_text())
    if method == "block_ap+e2e":
        result["e2e_seconds"] = result["quantize_seconds"]
        result["quantize_seconds"] = round(first["quantize_seconds"] + result["quantize_seconds"], 1)
        result["peak_rss_mb"] = max(first["peak_rss_mb"], result["peak_rss_mb"])
        result["trainable_params"] = {**first.get("trainable_params", {}), **result["trainable_params"]}
        (out / "eqat_results.json").write_text(json.dumps(result, indent=1))
    print(f"  {setting} {method}: {result['perplexity']} in {time.time() - t0:.0f} s", flush=True)
    return result


def trained_params(folder: Path) -> dict:
    """Block-AP trains every quantized weight, scale and zero point; E2E-QP only the scales."""
    from safetensors import safe_open

    bits = json.loads((folder / "config.json").read_text())["quantization_config"]["bits"]
    scales = weights = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if name.endswith(".scales"):
                scales += shape[0] * shape[1]
            elif name.endswith(".qweight"):
                weights += shape[0] * 32 // bits * shape[1]
    return {"block_ap": weights + 2 * scales, "e2e_qp": scales}


def fp_row() -> dict:
    from eqat_train.pipeline import fp_perplexity, peak_rss_mb

    return {"method": "fp32", "perplexity": fp_perplexity(None, ["stdlib", "fortunes"]), "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "block_ap", "block_ap+e2e"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed on to eqat quantize")
    args = parser.parse_args()
    rows = [dict(setting=s, method=m, **{k: v for k, v in run_one(m, s, args.extra).items()
                                         if k not in ("blocks", "e2e", "method")})
            for s in args.settings for m in args.methods]
    rows.insert(0, dict(setting="-", **fp_row()))
    write_json("quality_smollm2.json", {"rows": rows})
    print("\n| setting | method | ppl stdlib | ppl fortunes | quantize wall s | peak RSS MB | trained params |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        p, t = r["perplexity"], r.get("trainable_params", {})
        params = " + ".join(f"{v / 1e6:.2f}M ({k})" for k, v in t.items()) if r["method"] in ("block_ap", "block_ap+e2e") else "-"
        if r["method"] == "block_ap":
            params = f"{t['block_ap'] / 1e6:.2f}M (block_ap)" if "block_ap" in t else "-"
        print(f"| {r['setting']} | {r['method']} | {p.get('stdlib', '-')} | {p.get('fortunes', '-')} | "
              f"{r.get('quantize_seconds', '-')} | {r.get('peak_rss_mb', '-')} | {params} |")


if __name__ == "__main__":
    main()
