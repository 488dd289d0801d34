"""`quantize`: model + text -> block-wise quantization (Block-AP, RTN or GPTQ) -> checkpoint -> perplexity."""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from . import data, evaluate, fidelity, models, runstate
from .baselines import GPTQConfig, RTNConfig
from .block_ap import BlockAPConfig
from .blockwise import BlockwiseConfig, BlockwiseRun
from .checkpoint import load_quantized, quantization_config, read_quantization_config, save_quantized, source_model
from .configs import RunConfig
from .e2e_qp import E2EConfig, E2ETrainer
from .examples import Examples

# The block-wise methods, by name: a new one is a BlockwiseConfig subclass added here (and gets its CLI flags).
METHODS: dict[str, type[BlockwiseConfig]] = {c.method: c for c in (BlockAPConfig, RTNConfig, GPTQConfig)}


def default_out(run: RunConfig, stage: BlockwiseConfig) -> Path:
    name = Path(run.model).stem if run.model else models.DEFAULT_MODEL
    return Path("runs") / f"{name}-w{stage.bits}g{stage.group_size}-{stage.method}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_teacher(model_name: str | None, bf16: bool):
    """The fp model the KL loss distils from (bf16 weights when training under bf16 autocast anyway)."""
    teacher, _, _ = models.load_model(model_name, dtype=torch.bfloat16 if bf16 else torch.float32)
    return teacher


def self_sampling(run: RunConfig) -> dict:
    """The self-generation settings a run's calibration depends on (none for a text source): recorded, and
    part of the resume fingerprint."""
    return {f"gen_{k}": v for k, v in run.sampling.items()} if data.SELF in data.calibration_sources(run.text) else {}


def e2e_examples(cfg: E2EConfig, tokenizer, calib: torch.Tensor | None, seq_len: int) -> Examples:
    if cfg.instruct:
        return Examples.from_instructions(cfg.instruct, tokenizer, seq_len)
    return Examples.from_windows(calib)


def quantize(run: RunConfig | None = None, stage: BlockwiseConfig | None = None, e2e: E2EConfig | None = E2EConfig(),
             progress: bool = True) -> dict:
    """The whole job: the block-wise `stage` (default Block-AP w2g64), then E2E-QP (`e2e=None` skips it),
    checkpoint, fidelity report. Returns (and writes to `<out>/eqat_results.json`) the measured numbers."""
    run = run or RunConfig()
    stage = stage or BlockAPConfig()
    t0 = time.time()
    out = Path(run.out) if run.out else default_out(run, stage)
    state_dir = out.with_name(out.name + ".partial")
    _refuse_foreign_output(out, state_dir)
    model, tokenizer, source = models.load_model(run.model)
    warn_overlap(run.text, run.eval_texts)
    split = data.calibration_split(run.text, model, tokenizer, run.seq_len, run.held_out_windows, run.calib_windows,
                                   run.val_windows, run.seed, progress, run.sampling)
    run_options = {"model": source.describe(), "text": run.text or data.DEFAULT_CALIBRATION, "seq_len": run.seq_len,
                   "calib_windows": run.calib_windows, "val_windows": run.val_windows,
                   # what the calibration split depends on, not the closing report's count: a rerun with another
                   # --eval-windows resumes instead of refusing the saved blocks
                   "held_out_windows": run.held_out_windows,
                   "seed": run.seed, "bf16": run.bf16, **self_sampling(run)}
    blockwise = BlockwiseRun(model, stage, run_options, state_dir=state_dir, offload=run.offload,
                             bf16_passes=run.bf16, seed=run.seed)
    log = blockwise.run(split.calib, split.val if run.val_windows else None, progress=progress)
    runstate.release_memory()  # the activation stores are gone; peak RSS should not stack stage on stage
    recorded = {**stage.as_dict(), **run_options}
    stage_seconds = {stage.method: round(time.time() - t0, 1)}
    stages, e2e_log = [stage.method], []
    if e2e is not None:
        t1 = time.time()
        teacher = load_teacher(run.model, run.bf16) if e2e.loss == "kl" else None
        trainer = E2ETrainer(model, e2e_examples(e2e, tokenizer, split.calib, run.seq_len), e2e, state_dir,
                             {"stage1": recorded}, teacher=teacher, bf16=run.bf16, seed=run.seed)
        e2e_log = trainer.train(progress)
        recorded["e2e_qp"] = trainer.settings()
        del teacher, trainer
        runstate.release_memory()
        stages.append("e2e_qp")
        stage_seconds["e2e_qp"] = round(time.time() - t1, 1)
    quant_seconds = time.time() - t0
    qconfig = quantization_config(stage.bits, stage.group_size, {**recorded, "stages": stages})
    save_quantized(model, tokenizer, out, qconfig)
    results = {"out": str(out), "method": stage.method, "stages": stages, "bits": stage.bits,
               "group_size": stage.group_size, "quantize_seconds": round(quant_seconds, 1),
               "stage_seconds": stage_seconds, "trainable_params": trainable_counts(model, stage.method),
               "blocks": log, "e2e": e2e_log}
    fp_model = models.load_model(run.model)[0] if run.fidelity and run.eval_texts else None
    results.update(report_quality(model, fp_model, tokenizer, run.eval_texts, run.seq_len, run.eval_windows,
                                  run.text, progress))
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
        counts["block_ap"] = weights + 2 * scales  # weights, scales and zero points (plus the norms by default)
    return counts


def e2e(checkpoint: str, run: RunConfig, cfg: E2EConfig | None = None, progress: bool = True) -> dict:
    """`eqat e2e`: train the scales of a packed checkpoint further (single process or under torchrun).
    `run.out` is required; `run.model` is the fp model (teacher and fidelity reference; default: the source
    the checkpoint records)."""
    cfg = cfg or E2EConfig()
    if not run.out:
        raise ValueError("eqat e2e needs an output folder (--out)")
    t0 = time.time()
    out_path = Path(run.out)
    state_dir = out_path.with_name(out_path.name + ".partial")
    _refuse_foreign_output(out_path, state_dir)
    q = read_quantization_config(Path(checkpoint))
    model, tokenizer = load_quantized(checkpoint, dtype=torch.float32)  # fp32 master copy for training
    if tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer files; cannot tokenize calibration or instruction data")
    fp_name = run.model or source_model(q)
    eval_texts = run.eval_texts if run.fidelity else []
    needs_fp = cfg.loss == "kl" or data.SELF in data.calibration_sources(run.text) or bool(eval_texts)
    if needs_fp and not fp_name:
        raise ValueError(f"{checkpoint} does not record its source model; pass the fp model (--model) "
                         "or use --loss ce with a text calibration source and no evaluation texts")
    fp_model = models.load_model(fp_name)[0] if needs_fp else None
    warn_overlap(run.text, eval_texts)
    # the same split as `eqat quantize` with these settings, so a self-generated set it made is reused
    calib = None if cfg.instruct else data.calibration_split(run.text, fp_model, tokenizer, run.seq_len,
                                                              run.held_out_windows, run.calib_windows, run.val_windows,
                                                              run.seed, progress, run.sampling).calib
    source = {"checkpoint": str(checkpoint), "text": run.text or data.DEFAULT_CALIBRATION,
              "calib_windows": run.calib_windows, "seq_len": run.seq_len, **self_sampling(run)}
    trainer = E2ETrainer(model, e2e_examples(cfg, tokenizer, calib, run.seq_len), cfg, state_dir, source,
                         teacher=fp_model if cfg.loss == "kl" else None, bf16=run.bf16, seed=run.seed)
    log = trainer.train(progress)
    rank, _ = runstate.rank_world()
    results = {"out": str(out_path), "e2e": log, "quantize_seconds": round(time.time() - t0, 1),
               "trainable_params": trainable_counts(model, "e2e_qp")}
    if rank == 0:
        eqat_keys = dict(q.get("eqat", {}))
        eqat_keys["stages"] = list(eqat_keys.get("stages", [])) + ["e2e_qp"]
        eqat_keys["e2e_qp"] = {**trainer.settings(), **source}
        save_quantized(model, tokenizer, out_path, quantization_config(q["bits"], q["group_size"], eqat_keys))
        results.update(report_quality(model, fp_model if eval_texts else None, tokenizer, eval_texts, run.seq_len,
                                      run.eval_windows, run.text, progress))
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
