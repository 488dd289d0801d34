"""The `eqat` command: quantize, eval, generate."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import runstate
from .configs import RunConfig
from .data import DEFAULT_EVAL_TEXTS, EVAL_WINDOWS


def _add_quantize(sub) -> None:
    from .configs import add_flags
    from .e2e_qp import E2EConfig
    from .pipeline import METHODS

    p = sub.add_parser("quantize", help="quantize a model (default: embedded SmolLM2-135M, w2g64, Block-AP, then E2E-QP)")
    p.add_argument("--method", default="block_ap", choices=list(METHODS), help="block-wise stage (default: block_ap)")
    add_flags(p, RunConfig)
    add_flags(p, *METHODS.values())
    p.add_argument("--skip-e2e", action="store_true", help="stop after the block-wise stage (no E2E-QP)")
    add_flags(p, E2EConfig, prefix="e2e-")


def _quantize(args) -> dict:
    import os

    from .configs import build, given
    from .e2e_qp import E2EConfig
    from .pipeline import METHODS, quantize

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("eqat quantize runs in one process (the block-wise stage is sequential); "
                         "quantize with --skip-e2e, then run `torchrun ... eqat e2e CHECKPOINT` for data-parallel E2E-QP")
    stage_cls = METHODS[args.method]
    foreign = {name for cls in METHODS.values() for name in given(args, cls)} - set(given(args, stage_cls))
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(foreign))
        raise ValueError(f"{flags} do(es) not apply to --method {args.method}")
    if args.skip_e2e and given(args, E2EConfig, "e2e-"):
        raise ValueError("--e2e-* options were given together with --skip-e2e")
    return quantize(build(RunConfig, args), build(stage_cls, args),
                    None if args.skip_e2e else build(E2EConfig, args, "e2e-"))


def _add_e2e(sub) -> None:
    from .configs import add_flags
    from .e2e_qp import E2EConfig

    p = sub.add_parser("e2e", help="E2E-QP: train the scales of a packed checkpoint (torchrun for several processes)")
    p.add_argument("checkpoint", help="eqat/GPTQ-v2 folder to start from")
    add_flags(p, RunConfig, exclude=("offload",),
              help_overrides={"model": "fp model to distil from and compare with (default: the source the "
                                       "checkpoint records; folder, .gguf or Hub id)",
                              "out": "output folder for the trained checkpoint (required)"})
    add_flags(p, E2EConfig)


def _e2e(args) -> dict:
    from .configs import build
    from .e2e_qp import E2EConfig
    from .pipeline import e2e

    with _distributed():
        return e2e(args.checkpoint, build(RunConfig, args), build(E2EConfig, args))


class _distributed:
    """Under torchrun (WORLD_SIZE > 1): one process group, NCCL on GPU, gloo on CPU."""

    def __enter__(self):
        import os

        import torch.distributed as dist

        self.active = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
        if self.active:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        if self.active:
            dist.destroy_process_group()
        return False


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="fidelity of quantized checkpoints to their fp model (or perplexity of an fp model)")
    p.add_argument("checkpoints", nargs="*", metavar="checkpoint",
                   help="eqat/GPTQ-v2 folders (several: the fp model runs once for all); omit with --model for "
                        "the fp model alone")
    p.add_argument("--model", help="fp model to compare with (default: the source recorded in the checkpoints; "
                                   "folder, .gguf or Hub id)")
    p.add_argument("--texts", nargs="+", default=list(DEFAULT_EVAL_TEXTS),
                   help="stdlib, fortunes, code, a .txt/.jsonl file or hf:NAME")
    p.add_argument("--seq-len", type=int, default=RunConfig.seq_len)
    p.add_argument("--windows", type=int, default=EVAL_WINDOWS)


def _eval(args) -> dict:
    from . import fidelity
    from .pipeline import evaluate_texts

    if not args.checkpoints:
        model, tokenizer = _load(None, args.model)
        return {"perplexity": evaluate_texts(model, tokenizer, args.texts, args.seq_len, args.windows)}
    from .checkpoint import load_quantized, read_quantization_config, source_model
    from .models import load_model

    loaded = [load_quantized(c, dtype=torch.float32) for c in args.checkpoints]
    models, tokenizer = [m for m, _ in loaded], loaded[0][1]
    configs = [read_quantization_config(Path(c)) for c in args.checkpoints]
    sources = {source_model(q) for q in configs}
    if not args.model and (None in sources or len(sources) > 1):
        raise ValueError(f"the checkpoints record {'no' if None in sources else 'different'} source models "
                         f"({', '.join(str(s) for s in sources)}); pass the fp model with --model")
    fp_model = load_model(args.model or sources.pop())[0]
    calibrations = [q.get("eqat", {}).get("text") for q in configs]
    reports = fidelity.report_many(models, fp_model, tokenizer, args.texts, args.seq_len, args.windows, calibrations)
    for checkpoint, rep in zip(args.checkpoints, reports):
        print(f"{checkpoint}:\n{fidelity.format_table(rep)}", file=sys.stderr)
    if len(reports) == 1:
        return {"fidelity": reports[0]}
    return {"fidelity": dict(zip(args.checkpoints, reports))}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streamed as it comes)")
    p.add_argument("checkpoint", nargs="?", help="eqat/GPTQ folder; omit with --model for the fp model")
    p.add_argument("--model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_dtype(p)


def _generate(args) -> dict:
    model, tokenizer = _load(args.checkpoint, args.model, args.dtype)
    from .generation import generate

    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    text = generate(model, tokenizer, args.prompt if not args.chat else None, messages=messages,
                    max_new_tokens=args.max_new_tokens, stream=True)
    return {"text": text}


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a checkpoint (empty line or Ctrl-D ends)")
    p.add_argument("checkpoint", nargs="?", help="eqat/GPTQ folder; omit with --model for the fp model")
    p.add_argument("--model")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--system", help="system message (default: the template's own)")
    _add_dtype(p)


def _add_dtype(p) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="dtype of the unquantized tensors (default auto: bfloat16 on CPU, float16 on CUDA, "
                        "as load_quantized loads them)")


def _chat(args) -> dict:
    model, tokenizer = _load(args.checkpoint, args.model, args.dtype)
    from .generation import chat_loop

    turns = chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens, system=args.system)
    return {"turns": turns}


def _load(checkpoint: str | None, model: str | None, dtype: str = "float32"):
    """`dtype` is that of the unquantized tensors (embeddings, norms, head; the whole fp model)."""
    from .checkpoint import default_dtype

    torch_dtype = default_dtype() if dtype == "auto" else getattr(torch, dtype)
    if checkpoint:
        from .checkpoint import load_quantized

        return load_quantized(checkpoint, dtype=torch_dtype)
    from .models import load_model

    lm, tok, _ = load_model(model)
    return lm.to(torch_dtype), tok


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint in another format (gguf: for llama.cpp, Ollama, LM Studio)")
    p.add_argument("checkpoint", help="eqat/GPTQ-v2 folder")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--out", required=True, help="output file (FILE.gguf)")


def _export(args) -> dict:
    from .gguf_export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out)
    return {"out": str(path), "size_mb": round(path.stat().st_size / 2**20, 2)}


def _add_tune(sub) -> None:
    from eqat_kernels.triton_kernels.configs import TUNE_M

    p = sub.add_parser("tune", help="time the GPU kernel configs for a checkpoint's layer shapes once and save the "
                                    "winners for this GPU model (loaded by every later run on it)")
    p.add_argument("checkpoint", help="eqat/GPTQ-v2 folder")
    p.add_argument("--m", type=int, nargs="+", default=list(TUNE_M), help="token counts (M) to tune for")
    p.add_argument("--backward", action="store_true", help="also the training kernels (dx, ds): before E2E-QP")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="activation dtype")


def _tune(args) -> dict:
    if not torch.cuda.is_available():
        raise ValueError("tuning times the Triton kernels on a GPU and this machine has none (CPU inference "
                         "uses torch's int4 kernel, which needs no tuning)")
    from eqat_kernels.triton_kernels.tuning import tune_model

    from .checkpoint import load_quantized

    model, _ = load_quantized(args.checkpoint, dtype=getattr(torch, args.dtype))
    path, chosen = tune_model(model.cuda(), args.m, getattr(torch, args.dtype), args.backward)
    return {"saved": str(path), "chosen": chosen}


COMMANDS = {"quantize": (_add_quantize, _quantize), "e2e": (_add_e2e, _e2e), "eval": (_add_eval, _eval), "generate": (_add_generate, _generate),
            "chat": (_add_chat, _chat), "export": (_add_export, _export), "tune": (_add_tune, _tune)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eqat", description="EfficientQAT quantization for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    runstate.reuse_freed_memory()
    try:
        result = COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"eqat {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command not in ("generate", "chat"):
        result = {k: v for k, v in result.items() if k not in ("blocks", "e2e")}
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
