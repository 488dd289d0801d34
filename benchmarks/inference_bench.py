"""End-to-end inference of SmolLM2-135M: fp32 vs quantized checkpoints, on this machine's device.

Per model (each in its own process, so peak RSS is its own): prefill tokens/s and decode tokens/s at
batch 1 and 8, time to first token, greedy agreement with the fp32 model over the first new tokens,
checkpoint size on disk against `params * (b + (b + 16) / g) / 8` for the quantized layers plus the
unquantized tensors as stored. Prints a table, writes results/inference_<device>.json and a plot.

    python benchmarks/inference_bench.py runs/quality/w4g128-block_ap runs/quality/w2g64-block_ap
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, machine, write_json

PROMPT_TOKENS, NEW_TOKENS = 128, 32


def _load(source: str, dtype: torch.dtype | str):
    """`fp32` / `bf16`: the embedded fp model; anything else: a quantized checkpoint whose unquantized
    tensors (embeddings, norms, the tied head) are loaded in `dtype` ("auto": as the README's API
    example loads it, `load_quantized(path)` with no arguments)."""
    if source in ("fp32", "bf16"):
        from eqat_train.models import load_model

        model, tok, _ = load_model(None)
        return model.to(torch.float32 if source == "fp32" else torch.bfloat16).eval(), tok
    from eqat_train.checkpoint import load_quantized

    return load_quantized(source, dtype=dtype)


def _prompts(tok, batch: int, text: str) -> torch.Tensor:
    from eqat_train import data

    windows = data.tokenize_windows(tok, data.load_text(text), PROMPT_TOKENS)
    return windows[:batch]


@torch.no_grad()
def _generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    # plain generate, as a user calls it: the KV cache comes from the checkpoint's own config
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:]


@torch.no_grad()
def _prefill_seconds(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(ids)
    return time.perf_counter() - t0


def measure_one(source: str, device: str, dtype: torch.dtype | str, text: str) -> dict:
    model, tok = _load(source, dtype)
    model.to(device)
    row = {"model": source, "dtype": str(next(p.dtype for n, p in model.named_parameters() if "embed" in n))}
    for batch in (1, 8):
        ids = _prompts(tok, batch, text).to(device)
        _generate_seconds(model, ids, 2)  # warm-up: kernel caches, repacks
        prefill = min(_prefill_seconds(model, ids) for _ in range(3))
        first, _ = min((_generate_seconds(model, ids, 1) for _ in range(3)), key=lambda r: r[0])
        full, tokens = _generate_seconds(model, ids, NEW_TOKENS)
        row[f"prefill_tok_s_b{batch}"] = round(batch * PROMPT_TOKENS / prefill, 1)
        row[f"decode_tok_s_b{batch}"] = round(batch * (NEW_TOKENS - 1) / max(full - first, 1e-9), 1)
        row[f"ttft_ms_b{batch}"] = round(first * 1000, 1)
        if batch == 1:
            row["greedy_tokens"] = tokens[0].tolist()
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if source not in ("fp32", "bf16"):
        row.update(checkpoint_size(Path(source)))
    return row


def checkpoint_size(folder: Path) -> dict:
    """Bytes of model.safetensors vs the format's formula."""
    from safetensors import safe_open

    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, group = q["bits"], q["group_size"]
    expected = 0.0
    dtype_bytes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = list(f.keys())
        layers = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}
        for n in names:
            sl = f.get_slice(n)
            shape, layer, leaf = sl.get_shape(), *n.rsplit(".", 1)
            if layer in layers and leaf == "qweight":
                k, n_out = shape[0] * 32 // bits, shape[1]
                expected += k * n_out * (bits + (bits + 16) / (k if group == -1 else group)) / 8
            elif not (layer in layers and leaf in ("qzeros", "scales")):
                numel = 1
                for d in shape:
                    numel *= d
                expected += numel * dtype_bytes[sl.get_dtype()]
    actual = (folder / "model.safetensors").stat().st_size
    return {"size_mb": round(actual / 2**20, 2), "formula_mb": round(expected / 2**20, 2),
            "size_vs_formula": round(actual / expected, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", default=[])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                        help="dtype of a quantized model's unquantized tensors (embeddings, norms, head); "
                             "default auto: load_quantized's own default, what the README's API example gets")
    parser.add_argument("--text", default="stdlib",
                        help="prompts: the first 128-token windows of this text (stdlib: always there)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
        print("ROW " + json.dumps(measure_one(args.one, args.device, dtype, args.text)))
        return
    rows = []
    for source in ["fp32", "bf16", *args.checkpoints]:
        out = subprocess.run([sys.executable, __file__, "--one", source, "--device", args.device, "--dtype", args.dtype,
                              "--text", args.text],
                             capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            raise RuntimeError(f"{source} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[4:]))
    base = rows[0]
    for r in rows:
        same = 0
        for a, b in zip(r["greedy_tokens"], base["greedy_tokens"]):
            if a != b:
                break
            same += 1
        r["greedy_agree_tokens"] = same
        r["decode_speedup_b1"] = round(r["decode_tok_s_b1"] / base["decode_tok_s_b1"], 2)
    write_json(f"inference_{args.device}.json", {"machine": machine(), "prompt_tokens": PROMPT_TOKENS,
                                                  "quantized_model_dtype": args.dtype, "text": args.text,
                                                  "new_tokens": NEW_TOKENS, "rows": rows})
    print(f"\n| model | decode tok/s b1 | vs fp32 | decode tok/s b8 | prefill tok/s b1 | prefill tok/s b8 | "
          f"TTFT ms b1 | greedy agree (of {NEW_TOKENS}) | size MB | size / formula | peak RSS MB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['decode_tok_s_b1']} | {r['decode_speedup_b1']}x | {r['decode_tok_s_b8']} | "
              f"{r['prefill_tok_s_b1']} | {r['prefill_tok_s_b8']} | {r['ttft_ms_b1']} | {r['greedy_agree_tokens']} | "
              f"{r.get('size_mb', '-')} | {r.get('size_vs_formula', '-')} | {r['peak_rss_mb']} |")
    _plot(rows, RESULTS / f"inference_{args.device}.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["model"]).name for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tokens/s"), (axes[1], "prefill_tok_s", "prefill tokens/s")):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r[f"{key}_b1"] for r in rows], 0.4, label="batch 1")
        ax.bar([i + 0.2 for i in x], [r[f"{key}_b8"] for r in rows], 0.4, label="batch 8")
        ax.set_xticks(list(x), names, rotation=20, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
