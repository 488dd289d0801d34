"""The `eqat` command: quantize, eval, generate."""
from __future__ import annotations

import argparse
import json
import sys

import torch



def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model (default: embedded SmolLM2-135M, w2g64, Block-AP)")
    p.add_argument("--model", help="model folder, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", help="output folder (default: runs/<model>-w<b>g<g>-<method>)")
    p.add_argument("--method", default="block_ap", choices=["block_ap", "rtn", "gptq"])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--text", help="calibration text: stdlib (default), fortunes, a .txt/.jsonl file or hf:NAME")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-texts", nargs="*", default=["stdlib", "fortunes"])
    p.add_argument("--epochs", type=int, default=None, help="Block-AP epochs (default 1)")
    p.add_argument("--lr-scale", type=float, default=None,
                   help="Block-AP weight learning-rate multiplier over the published 2e-5/1e-5 (default 200)")
    p.add_argument("--lr-scale-quant", type=float, default=None,
                   help="Block-AP scale/zero learning-rate multiplier over the published 1e-4 (default 25)")
    p.add_argument("--loss", choices=["token", "mse"], default="token")
    p.add_argument("--no-bf16", action="store_true", help="train and run block passes in fp32 instead of bf16 autocast")
    p.add_argument("--offload", action="store_true", help="keep cached activations memory-mapped on disk")
    p.add_argument("--seed", type=int, default=0)


def _quantize(args) -> dict:
    from .pipeline import QuantizeOptions, quantize

    opts = QuantizeOptions(model=args.model, out=args.out, method=args.method, bits=args.bits,
                           group_size=args.group_size, text=args.text, seq_len=args.seq_len,
                           val_windows=args.val_windows, eval_windows=args.eval_windows, eval_texts=args.eval_texts,
                           loss=args.loss, bf16=not args.no_bf16, offload=args.offload, seed=args.seed)
    for name in ("calib_windows", "epochs", "lr_scale", "lr_scale_quant"):
        if getattr(args, name) is not None:
            setattr(opts, name, getattr(args, name))
    return quantize(opts)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a quantized checkpoint or of the fp model")
    p.add_argument("checkpoint", nargs="?", help="eqat/GPTQ-v2 folder; omit with --model for the fp model")
    p.add_argument("--model", help="fp model (folder, .gguf or Hub id; default: embedded SmolLM2)")
    p.add_argument("--texts", nargs="+", default=["stdlib"], help="stdlib, fortunes, a .txt/.jsonl file or hf:NAME")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)


def _eval(args) -> dict:
    from .pipeline import evaluate_texts

    model, tokenizer = _load(args.checkpoint, args.model)
    return {"perplexity": evaluate_texts(model, tokenizer, args.texts, args.seq_len, args.windows)}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("checkpoint", nargs="?", help="eqat/GPTQ-v2 folder; omit with --model for the fp model")
    p.add_argument("--model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)


def _generate(args) -> dict:
    model, tokenizer = _load(args.checkpoint, args.model)
    model.config.use_cache = True
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text)
    return {"text": text}


def _load(checkpoint: str | None, model: str | None):
    if checkpoint:
        from .checkpoint import load_quantized

        return load_quantized(checkpoint)
    from .models import load_model

    lm, tok, _ = load_model(model)
    return lm, tok


COMMANDS = {"quantize": (_add_quantize, _quantize), "eval": (_add_eval, _eval), "generate": (_add_generate, _generate)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqat", description="EfficientQAT quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"eqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command != "generate":
        result = {k: v for k, v in result.items() if k != "blocks"}
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
