"""`quantize`: model + text -> block-wise quantization (Block-AP, RTN or GPTQ) -> checkpoint -> perplexity."""
from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


from . import data, evaluate, models
from .baselines import make_gptq, make_rtn
from .block_ap import BlockAPConfig, make_block_ap
from .blockwise import BlockwiseRun
from .checkpoint import quantization_config, save_quantized

METHODS = ("block_ap", "rtn", "gptq")


@dataclass
class QuantizeOptions:
    model: str | None = None
    out: str | None = None
    method: str = "block_ap"
    bits: int = 2
    group_size: int = 64
    text: str | None = None
    seq_len: int = 512
    calib_windows: int = 128
    val_windows: int = 8
    eval_windows: int = 40
    eval_texts: list[str] = field(default_factory=lambda: ["stdlib", "fortunes"])
    epochs: int = 1
    lr_scale: float = 200.0
    lr_scale_quant: float = 25.0
    loss: str = "token"
    bf16: bool = True
    batch_size: int = 2
    offload: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.calib_windows < 1:
            raise ValueError("calibration needs at least one window (calib_windows >= 1)")


def default_out(opts: QuantizeOptions) -> Path:
    name = Path(opts.model).stem if opts.model else models.DEFAULT_MODEL
    return Path("runs") / f"{name}-w{opts.bits}g{opts.group_size}-{opts.method}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize(opts: QuantizeOptions, progress: bool = True) -> dict:
    """Run the whole job; returns (and writes to `<out>/eqat_results.json`) the measured numbers."""
    t0 = time.time()
    out = Path(opts.out) if opts.out else default_out(opts)
    state_dir = out.with_name(out.name + ".partial")
    _refuse_foreign_output(out, state_dir)
    model, tokenizer, source = models.load_model(opts.model)
    windows = data.tokenize_windows(tokenizer, data.load_text(opts.text), opts.seq_len)
    split = data.split_windows(windows, opts.eval_windows, opts.calib_windows, opts.val_windows, opts.seed)
    if opts.method == "block_ap":
        cfg = BlockAPConfig(bits=opts.bits, group_size=opts.group_size, epochs=opts.epochs, lr_scale=opts.lr_scale,
                            lr_scale_quant=opts.lr_scale_quant,
                            loss=opts.loss, bf16=opts.bf16, seed=opts.seed)
        step, method_options = make_block_ap(cfg), cfg.as_dict()
    elif opts.method == "rtn":
        step, method_options = make_rtn(opts.bits, opts.group_size), {"method": "rtn"}
    else:
        step, method_options = make_gptq(opts.bits, opts.group_size, bf16=opts.bf16), {"method": "gptq", "damp": 0.01}
    run_options = {**method_options, "model": source.describe(), "text": opts.text or data.DEFAULT_TEXT,
                   "seq_len": opts.seq_len, "calib_windows": opts.calib_windows, "val_windows": opts.val_windows,
                   "eval_windows": opts.eval_windows, "seed": opts.seed, "batch_size": opts.batch_size,
                   "bf16": opts.bf16}
    run = BlockwiseRun(model, opts.bits, opts.group_size, step, run_options, state_dir=state_dir,
                       offload=opts.offload, batch_size=opts.batch_size,
                       bf16_passes=opts.bf16)
    log = run.run(split.calib, split.val if opts.val_windows else None, progress=progress)
    quant_seconds = time.time() - t0
    qconfig = quantization_config(opts.bits, opts.group_size, {**run_options, "stages": ["block_ap"] if opts.method == "block_ap" else [opts.method]})
    save_quantized(model, tokenizer, out, qconfig)
    results = {"out": str(out), "method": opts.method, "bits": opts.bits, "group_size": opts.group_size,
               "quantize_seconds": round(quant_seconds, 1), "blocks": log}
    results["perplexity"] = evaluate_texts(model, tokenizer, opts.eval_texts, opts.seq_len, opts.eval_windows,
                                           progress=progress)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["total_seconds"] = round(time.time() - t0, 1)
    (out / "eqat_results.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(state_dir, ignore_errors=True)
    return results


def evaluate_texts(model, tokenizer, texts: list[str], seq_len: int, n_windows: int, progress: bool = True) -> dict:
    """Perplexity on the first `n_windows` windows of each text (the calibration never sees the default's)."""
    ppl = {}
    for text in texts:
        try:
            windows = data.tokenize_windows(tokenizer, data.load_text(text), seq_len)[:n_windows]
        except FileNotFoundError as e:
            print(f"skipping evaluation on {text}: {e}")
            continue
        ppl[text] = round(evaluate.perplexity(model, windows, progress=progress), 3)
    return ppl


def _refuse_foreign_output(out: Path, state_dir: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise FileExistsError(f"output folder {out} exists and is not an eqat checkpoint; choose another --out")
    if out.exists() and (out / "config.json").exists() and not state_dir.exists():
        raise FileExistsError(f"{out} already holds a finished checkpoint; choose another --out or delete it")


def fp_perplexity(model_name: str | None, texts: list[str], seq_len: int = 512, n_windows: int = 40) -> dict:
    model, tokenizer, _ = models.load_model(model_name)
    return evaluate_texts(model, tokenizer, texts, seq_len, n_windows)

