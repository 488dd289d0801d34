"""GGUF export, verified three ways on a real checkpoint: the gguf package's own dequantizer, transformers'
GGUF loader, and (if `llama_cpp` imports) llama.cpp itself.

Per checkpoint: the largest weight difference between eqat's dequantized layers and the file's blocks
(read with `gguf.quants.dequantize`, q/k rows put back into Hugging Face order), perplexity of the
checkpoint and of the file loaded by transformers on the first 40 x 512 stdlib windows, file sizes, and
llama.cpp decode tokens/s for the exported file and the source GGUF when llama-cpp-python is installed.

    python benchmarks/gguf_export_check.py runs/rtn-w4g128 [more checkpoints]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from common import machine, write_json

from eqat_train.data import EVAL_WINDOWS


def _hf_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's rotary row permutation."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def weight_error(model, path: Path) -> dict:
    import gguf

    from eqat_kernels import QuantLinear
    from eqat_train.gguf_export import ARCHITECTURES

    reader = gguf.GGUFReader(path)
    arch, _ = ARCHITECTURES[model.config.model_type]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    worst, worst_rel = 0.0, 0.0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        t = tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(m.out_features, m.in_features)
        if name.endswith(("q_proj", "k_proj")):
            heads = model.config.num_attention_heads if name.endswith("q_proj") else model.config.num_key_value_heads
            w = _hf_rows(w, heads)
        ours = m.dequantize(torch.float32).numpy()
        worst = max(worst, float(np.abs(w - ours).max()))
        step = m.scales.detach().float().abs().max().item()
        worst_rel = max(worst_rel, float(np.abs(w - ours).max()) / step)
    return {"max_abs_weight_diff": worst, "max_diff_in_steps": worst_rel}


def llama_cpp_tok_s(path: Path, prompt: str, tokens: int = 64) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, verbose=False)
    llm(prompt, max_tokens=4)
    t0 = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0)
    return round(out["usage"]["completion_tokens"] / (time.perf_counter() - t0), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--windows", type=int, default=EVAL_WINDOWS)
    parser.add_argument("--out-dir", default="runs/gguf")
    args = parser.parse_args()
    import transformers

    from eqat_train import data, evaluate
    from eqat_train.checkpoint import load_quantized, read_quantization_config
    from eqat_train.gguf_export import export_checkpoint

    rows = []
    for ckpt in map(Path, args.checkpoints):
        out = Path(args.out_dir) / f"{ckpt.name}.gguf"
        t0 = time.time()
        export_checkpoint(ckpt, out)
        seconds = time.time() - t0
        model, tok = load_quantized(ckpt, dtype=torch.float32)
        windows = data.tokenize_windows(tok, data.load_text("stdlib"), 512)[:args.windows]
        ppl_ckpt = evaluate.perplexity(model, windows, progress=False)
        row = {"checkpoint": str(ckpt), "gguf": str(out), "export_seconds": round(seconds, 1),
               "gguf_mb": round(out.stat().st_size / 2**20, 2),
               "checkpoint_mb": round((ckpt / "model.safetensors").stat().st_size / 2**20, 2),
               **weight_error(model, out), "ppl_checkpoint": round(ppl_ckpt, 4)}
        del model
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        row["ppl_gguf_transformers"] = round(evaluate.perplexity(loaded.eval(), windows, progress=False), 4)
        row["ppl_rel_diff"] = round(row["ppl_gguf_transformers"] / row["ppl_checkpoint"] - 1, 6)
        del loaded
        prompt = "The for statement in Python"
        row["llama_cpp_tok_s"] = llama_cpp_tok_s(out, prompt)
        source = read_quantization_config(ckpt).get("eqat", {}).get("model", "")
        if str(source).endswith(".gguf") and Path(source).is_file():
            row["source_gguf_mb"] = round(Path(source).stat().st_size / 2**20, 2)
            row["llama_cpp_tok_s_source"] = llama_cpp_tok_s(Path(source), prompt)
        rows.append(row)
        print(row, flush=True)
    write_json("gguf_export.json", {"machine": machine(), "windows": args.windows, "rows": rows})
    print("\n| checkpoint | GGUF MB | max weight diff (in steps) | ppl checkpoint | ppl GGUF (transformers) | rel. diff "
          "| llama.cpp tok/s (source) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {Path(r['checkpoint']).name} | {r['gguf_mb']} | {r['max_abs_weight_diff']:.2e} ({r['max_diff_in_steps']:.1e}) "
              f"| {r['ppl_checkpoint']} | {r['ppl_gguf_transformers']} | {r['ppl_rel_diff']:+.2%} "
              f"| {r['llama_cpp_tok_s']} ({r.get('llama_cpp_tok_s_source')}) |")


if __name__ == "__main__":
    main()
