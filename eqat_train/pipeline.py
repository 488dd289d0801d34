"""`quantize`: model + text -> block-wise quantization (Block-AP, RTN or GPTQ) -> checkpoint -> perplexity."""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data, evaluate, fidelity, models, runstate
from .baselines import make_gptq, make_rtn
from .block_ap import BlockAPConfig, make_block_ap
from .blockwise import BlockwiseRun
from .checkpoint import load_quantized, quantization_config, read_quantization_config, save_quantized, source_model
from .e2e_qp import E2EConfig, E2ETrainer
from .examples import Examples

METHODS = ("block_ap", "rtn", "gptq")


@dataclass
class E2EOptions:
    """E2E-QP stage: steps x batch_size x grad_accum examples (calibration windows or an instruction JSONL)."""

    steps: int = 24
    batch_size: int = 1
    grad_accum: int = 2
    lr_scale: float | None = None  # None: per bit-width default (e2e_qp.DEFAULT_LR_SCALE)
    instruct: str | None = None
    gradient_checkpointing: bool = False
    save_every: int = 8
    loss: str = E2EConfig.loss

    def config(self, bits: int, bf16: bool, seed: int) -> E2EConfig:
        return E2EConfig(bits=bits, steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                         lr_scale=self.lr_scale, bf16=bf16, gradient_checkpointing=self.gradient_checkpointing,
                         save_every=self.save_every, seed=seed, loss=self.loss)

    def teacher(self, model_name: str | None, bf16: bool):
        """The fp model the KL loss distils from (bf16 weights when training under bf16 autocast anyway)."""
        if self.loss != "kl":
            return None
        teacher, _, _ = models.load_model(model_name, dtype=torch.bfloat16 if bf16 else torch.float32)
        return teacher

    def examples(self, tokenizer, calib, seq_len: int) -> Examples:
        if self.instruct:
            return Examples.from_instructions(self.instruct, tokenizer, seq_len)
        return Examples.from_windows(calib)


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
    val_windows: int = 4
    eval_windows: int = 40
    eval_texts: list[str] = field(default_factory=lambda: list(data.DEFAULT_EVAL_TEXTS))
    epochs: int = 1
    lr_scale: float = 200.0
    lr_scale_quant: float = 25.0
    loss: str = "token"
    init: str | None = None  # Block-AP start; None: block_ap.default_init(bits)
    bf16: bool = True
    batch_size: int = 2
    offload: bool = False
    seed: int = 0
    fidelity: bool = True  # compare with the fp model at the end (KL, top-1, greedy and chat agreement)
    e2e: E2EOptions | None = field(default_factory=E2EOptions)  # None skips E2E-QP

    def __post_init__(self):
        from eqat_kernels.spec import check_bits, check_group_size

        check_bits(self.bits)  # fail before loading a model, not an hour into a run
        check_group_size(self.group_size)
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
    warn_overlap(opts.text, opts.eval_texts)
    split = data.calibration_split(opts.text, model, tokenizer, opts.seq_len, opts.eval_windows, opts.calib_windows,
                                   opts.val_windows, opts.seed, progress)
    if opts.method == "block_ap":
        cfg = BlockAPConfig(bits=opts.bits, group_size=opts.group_size, epochs=opts.epochs, lr_scale=opts.lr_scale,
                            lr_scale_quant=opts.lr_scale_quant,
                            loss=opts.loss, init=opts.init, bf16=opts.bf16, seed=opts.seed)
        step, method_options = make_block_ap(cfg), cfg.as_dict()
    elif opts.method == "rtn":
        step, method_options = make_rtn(opts.bits, opts.group_size), {"method": "rtn"}
    else:
        step, method_options = make_gptq(opts.bits, opts.group_size, bf16=opts.bf16), {"method": "gptq", "damp": 0.01}
    run_options = {**method_options, "model": source.describe(), "text": opts.text or data.DEFAULT_CALIBRATION,
                   "seq_len": opts.seq_len, "calib_windows": opts.calib_windows, "val_windows": opts.val_windows,
                   "eval_windows": opts.eval_windows, "seed": opts.seed, "batch_size": opts.batch_size,
                   "bf16": opts.bf16}
    run = BlockwiseRun(model, opts.bits, opts.group_size, step, run_options, state_dir=state_dir,
                       offload=opts.offload, batch_size=opts.batch_size,
                       bf16_passes=opts.bf16)
    log = run.run(split.calib, split.val if opts.val_windows else None, progress=progress)
    stage_seconds = {opts.method: round(time.time() - t0, 1)}
    stages, e2e_log = [opts.method], []
    if opts.e2e is not None:
        t1 = time.time()
        cfg = opts.e2e.config(opts.bits, opts.bf16, opts.seed)
        examples = opts.e2e.examples(tokenizer, split.calib, opts.seq_len)
        teacher = opts.e2e.teacher(opts.model, opts.bf16)
        e2e_log = E2ETrainer(model, examples, cfg, state_dir, {"stage1": run_options}, teacher=teacher).train(progress)
        del teacher
        run_options = {**run_options, "e2e_qp": {**cfg.as_dict(), "instruct": opts.e2e.instruct}}
        stages.append("e2e_qp")
        stage_seconds["e2e_qp"] = round(time.time() - t1, 1)
    quant_seconds = time.time() - t0
    qconfig = quantization_config(opts.bits, opts.group_size, {**run_options, "stages": stages})
    save_quantized(model, tokenizer, out, qconfig)
    results = {"out": str(out), "method": opts.method, "stages": stages, "bits": opts.bits,
               "group_size": opts.group_size, "quantize_seconds": round(quant_seconds, 1),
               "stage_seconds": stage_seconds, "trainable_params": trainable_counts(model, opts.method),
               "blocks": log, "e2e": e2e_log}
    fp_model = models.load_model(opts.model)[0] if opts.fidelity and opts.eval_texts else None
    results.update(report_quality(model, fp_model, tokenizer, opts.eval_texts, opts.seq_len, opts.eval_windows,
                                  opts.text, progress))
    del fp_model
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["total_seconds"] = round(time.time() - t0, 1)
    (out / "eqat_results.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(state_dir, ignore_errors=True)
    return results


def trainable_counts(model, method: str) -> dict:
    """Parameters each stage trains: Block-AP all weights, scales, zeros of the blocks; E2E-QP the scales."""
    from eqat_kernels import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    scales = sum(m.scales.numel() for m in layers)
    weights = sum(m.in_features * m.out_features for m in layers)
    counts = {"e2e_qp": scales}
    if method == "block_ap":
        counts["block_ap"] = weights + 2 * scales  # weights, scales and zero points (norms stay frozen)
    return counts


def e2e(checkpoint: str, out: str, opts: E2EOptions, text: str | None = None, seq_len: int = 512,
        calib_windows: int = 128, eval_windows: int = 40, eval_texts: list[str] | None = None, bf16: bool = True,
        seed: int = 0, progress: bool = True, teacher: str | None = None) -> dict:
    """`eqat e2e`: train the scales of a packed checkpoint further (single process or under torchrun)."""

    t0 = time.time()
    out_path = Path(out)
    state_dir = out_path.with_name(out_path.name + ".partial")
    _refuse_foreign_output(out_path, state_dir)
    q = read_quantization_config(Path(checkpoint))
    model, tokenizer = load_quantized(checkpoint, dtype=torch.float32)  # fp32 master copy for training
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer files; cannot tokenize calibration or instruction data")
    fp_name = teacher or source_model(q)
    needs_fp = opts.loss == "kl" or data.SELF in data.calibration_sources(text) or bool(eval_texts)
    if needs_fp and not fp_name:
        raise ValueError(f"{checkpoint} does not record its source model; pass the fp model (--teacher) "
                         "or use --loss ce with a text calibration source and no evaluation texts")
    fp_model = models.load_model(fp_name)[0] if needs_fp else None
    warn_overlap(text, eval_texts or [])
    # the block-wise stage's validation count too, so a self-generated set made by `eqat quantize` is reused
    calib = None if opts.instruct else data.calibration_split(text, fp_model, tokenizer, seq_len, eval_windows,
                                                               calib_windows, QuantizeOptions.val_windows, seed,
                                                               progress).calib
    cfg = opts.config(q["bits"], bf16, seed)
    source = {"checkpoint": str(checkpoint), "text": text or data.DEFAULT_CALIBRATION, "calib_windows": calib_windows,
              "seq_len": seq_len}
    log = E2ETrainer(model, opts.examples(tokenizer, calib, seq_len), cfg, state_dir, source,
                     teacher=fp_model if opts.loss == "kl" else None).train(progress)
    rank, _ = runstate.rank_world()
    results = {"out": str(out_path), "e2e": log, "quantize_seconds": round(time.time() - t0, 1),
               "trainable_params": trainable_counts(model, "e2e_qp")}
    if rank == 0:
        eqat_keys = dict(q.get("eqat", {}))
        eqat_keys["stages"] = list(eqat_keys.get("stages", [])) + ["e2e_qp"]
        eqat_keys["e2e_qp"] = {**cfg.as_dict(), "instruct": opts.instruct, **source}
        save_quantized(model, tokenizer, out_path, quantization_config(q["bits"], q["group_size"], eqat_keys))
        results.update(report_quality(model, fp_model if eval_texts else None, tokenizer, eval_texts or [], seq_len,
                                      eval_windows, text, progress))
        results["peak_rss_mb"] = round(peak_rss_mb(), 1)
        (out_path / "eqat_results.json").write_text(json.dumps(results, indent=1))
        shutil.rmtree(state_dir, ignore_errors=True)
    return results


def report_quality(model, fp_model, tokenizer, texts: list[str], seq_len: int, n_windows: int,
                   calibration: str | None, progress: bool) -> dict:
    """Perplexity per text; with the fp model also the fidelity report (whose perplexities are the same
    numbers, computed once)."""
    if fp_model is None:
        return {"perplexity": evaluate_texts(model, tokenizer, texts, seq_len, n_windows, progress=progress)}
    rep = fidelity.report(model, fp_model, tokenizer, texts, seq_len, n_windows, calibration=calibration,
                          progress=progress)
    if progress:
        print(fidelity.format_table(rep), file=sys.stderr)
    return {"perplexity": {t: round(r["ppl"], 3) for t, r in rep["texts"].items()}, "fidelity": rep}


def evaluate_texts(model, tokenizer, texts: list[str], seq_len: int, n_windows: int, progress: bool = True) -> dict:
    """Perplexity on the first `n_windows` windows of each text (the calibration never sees the default's)."""
    return {text: round(evaluate.perplexity(model, windows, progress=progress), 3)
            for text, windows in data.evaluation_windows(tokenizer, texts, seq_len, n_windows).items()}


def warn_overlap(calibration: str | None, eval_texts: list[str]) -> None:
    overlap = data.overlapping_texts(calibration, eval_texts)
    if overlap:
        print(f"WARNING: evaluation text(s) {overlap} are also calibration sources ({calibration or data.DEFAULT_CALIBRATION}): "
              "their numbers measure how well the model fits that text, not how well it is kept; report "
              "fidelity on texts that were not calibrated on", file=sys.stderr)


def _refuse_foreign_output(out: Path, state_dir: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise FileExistsError(f"output folder {out} exists and is not an eqat checkpoint; choose another --out")
    if out.exists() and (out / "config.json").exists() and not state_dir.exists():
        raise FileExistsError(f"{out} already holds a finished checkpoint; choose another --out or delete it")


def fp_perplexity(model_name: str | None, texts: list[str], seq_len: int = 512, n_windows: int = 40) -> dict:
    model, tokenizer, _ = models.load_model(model_name)
    return evaluate_texts(model, tokenizer, texts, seq_len, n_windows)

