"""E2E-QP (docs/DESIGN.md, section 3): codes and zero points frozen, only the scales train on the whole model's loss.

Every QuantLinear stays packed; its autograd Function gives dx and the fused ds (Triton on CUDA, the
cached reference path on CPU), so this stage trains through the same path inference runs. Works on
one process or under `torchrun` with DistributedDataParallel (gloo on CPU, NCCL on GPU): each rank takes
its slice of every global batch, DDP averages the gradients, so the result matches one process with the
same global batch. State (scales, AdamW moments, step) goes to disk atomically every `save_every` steps
as safetensors + JSON, and a rerun of the same command continues from the last saved step.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from eqat_kernels import QuantLinear, paths

from . import runstate
from .configs import LR_RETRY_FACTOR, option, published_lr
from .examples import Examples, collate
from .fidelity import token_kl
from .faults import crash_point

LOSSES = ("kl", "ce")
# The published lr (2e-5 / 1e-5) assumes 128 steps of 32 x 4096 tokens; with tens of steps of 2 x 512 tokens
# the scales need larger steps. Measured on SmolLM2 (docs/RESULTS.md, "E2E-QP design evidence").
DEFAULT_LR_SCALE = {2: 20.0, 3: 50.0, 4: 20.0, 8: 20.0}
# Normalisation weights trained alongside the scales, at this multiple of their lr (0: scales only). On the
# validation text x10 lowered KL to the fp model at 2 bits and raised it at 3 and 4; x1 at 3 bits changed nothing
# (docs/RESULTS.md).
DEFAULT_NORM_LR_SCALE = {2: 10.0}


@dataclass(frozen=True)
class E2EConfig:
    """E2E-QP: steps x batch_size x grad_accum examples (calibration windows, or an instruction JSONL)."""

    steps: int | None = option(None, "E2E-QP optimizer steps (default: one pass over the examples, 64 at the default "
                                     "128 windows; more passes overfit them at w2g64, docs/RESULTS.md)")
    batch_size: int = option(1, "E2E-QP examples per micro-batch per process")
    grad_accum: int = option(2, "E2E-QP micro-batches per step")
    lr: float | None = option(None, "E2E-QP learning rate (default: published lr x lr_scale)")
    lr_scale: float | None = option(None, "multiplier over the published E2E-QP lr (2e-5 for 2-bit, 1e-5 for 3/4-bit); "
                                          f"default per bit-width {DEFAULT_LR_SCALE}")
    warmup: float = option(0.03, "fraction of the steps with a linear warm-up before the cosine decay")
    clip: float = option(0.3, "gradient-norm clip")
    loss: str = option("kl", "kl: distil from the fp model, KL(fp || quantized) over the vocabulary at every "
                             "position; ce: next-token cross-entropy on the calibration data", choices=LOSSES)
    instruct: str | None = option(None, "instruction-tuning JSONL ({prompt, response} or {messages}) instead of "
                                        "calibration windows; loss on the responses only")
    norm_lr_scale: float | None = option(None, "also train the normalisation weights (kept in fp by the format) at "
                                              "this multiple of the scales' lr; 0: scales only, as published; default "
                                              f"per bit-width {DEFAULT_NORM_LR_SCALE}, else 0")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, ~30% slower)")
    save_every: int = option(8, "E2E-QP steps between resumable saves")

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"E2E-QP loss must be one of {LOSSES}, got {self.loss!r}")
        if (self.steps is not None and self.steps < 1) or min(self.batch_size, self.grad_accum, self.save_every) < 1:
            raise ValueError("E2E-QP needs steps, batch_size, grad_accum and save_every >= 1")
        if self.norm_lr_scale is not None and not (self.norm_lr_scale >= 0 and math.isfinite(self.norm_lr_scale)):
            raise ValueError(f"E2E-QP norm_lr_scale must be a number >= 0, got {self.norm_lr_scale}")
        for name in ("lr", "lr_scale"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"E2E-QP {name} must be a positive number, got {value}")

    def learning_rate(self, bits: int) -> float:
        if self.lr is not None:
            return self.lr
        scale = self.lr_scale if self.lr_scale is not None else DEFAULT_LR_SCALE.get(bits, 50.0)
        return published_lr(bits) * scale

    def norm_learning_rate_scale(self, bits: int | None) -> float:
        return self.norm_lr_scale if self.norm_lr_scale is not None else DEFAULT_NORM_LR_SCALE.get(bits, 0.0)

    def as_dict(self) -> dict:
        return {"stage": "e2e_qp", **asdict(self)}


def trainable_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze everything, then make every packed layer's scales an fp32 trainable parameter.

    fp32 master scales: an fp16 scale near 0.01 moves in steps of ~8e-6, the size of a whole AdamW
    update at lr 1e-5, so fp16 storage would round most updates away. Scales go back to fp16 on save.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    scales = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if not m.is_packed:
                raise ValueError(f"E2E-QP trains packed layers; {name} is still trainable (run Block-AP's pack first)")
            scales[f"{name}.scales"] = m.train_scales(True, dtype=torch.float32).scales
    if not scales:
        raise ValueError("the model has no QuantLinear layers: quantize it (Block-AP, RTN or GPTQ) before E2E-QP")
    return scales


def trainable_norms(model: nn.Module) -> dict[str, nn.Parameter]:
    """The normalisation weights (every 1-D weight outside the packed layers; RMSNorm/LayerNorm), made
    trainable in fp32. They stay fp in the checkpoint, so training them costs nothing at inference: each
    one rescales the input features of the quantized layers it feeds, a per-channel degree of freedom
    the per-group scales do not have."""
    norms = {}
    for name, p in model.named_parameters():
        if p.ndim == 1 and name.rsplit(".", 1)[-1] == "weight" and p.is_floating_point():
            p.data = p.data.float()
            norms[name] = p.requires_grad_(True)
    return norms


def freeze_scales(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """End of training: scales back to storage dtype and frozen (the checkpoint format stores fp16)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.is_packed:
            m.train_scales(False, dtype=dtype)


def model_bits(model: nn.Module) -> int | None:
    """The bit-width of the model's QuantLinears, None if they mix several."""
    bits = {m.spec.bits for m in model.modules() if isinstance(m, QuantLinear)}
    return bits.pop() if len(bits) == 1 else None


def token_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the tokens whose label is not -100, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


def kl_loss_sum(model: nn.Module, teacher: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed KL(teacher || model) over the full vocabulary at every position whose label is trained
    (all of a text window; the assistant tokens of instruction data), and the number of positions."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    logits = model(**kwargs).logits[:, :-1]
    with torch.no_grad():
        target = teacher(**kwargs).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    kl = token_kl(target, logits)
    return (kl * mask).sum(), int(mask.sum())


class E2ETrainer:
    """Owns the model, optimizer, schedule and step state of one E2E-QP run."""

    def __init__(self, model: nn.Module, examples: Examples, cfg: E2EConfig, state_dir: Path | None = None,
                 fingerprint_extra: dict | None = None, teacher: nn.Module | None = None, bf16: bool = True,
                 seed: int = 0):
        """`teacher`: the fp model, required by the default KL loss. `bf16`: autocast the passes (fp32
        master scales); `seed`: the data order."""
        self.model, self.examples, self.cfg, self.teacher = model, examples, cfg, teacher
        self.bf16, self.seed = bf16, seed
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.rank, self.world = runstate.rank_world()
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if len(examples) < self.global_batch:
            raise ValueError(f"E2E-QP global batch is {self.global_batch} examples but only {len(examples)} were given")
        self.steps_per_pass = len(examples) // self.global_batch
        self.steps = cfg.steps if cfg.steps is not None else self.steps_per_pass
        self.scales = trainable_scales(model)
        self.bits = model_bits(model)
        if self.bits is None and cfg.lr is None:
            raise ValueError("E2E-QP's default learning rate depends on the bit-width and this model mixes several; "
                             "pass lr explicitly")
        self.lr = cfg.learning_rate(self.bits)
        self.norm_lr_scale = cfg.norm_learning_rate_scale(self.bits)
        self.norms = trainable_norms(model) if self.norm_lr_scale > 0 else {}
        self.trained = {**self.scales, **self.norms}
        if cfg.loss == "kl":
            if teacher is None:
                raise ValueError("E2E-QP's default loss distils from the fp model: pass the teacher model "
                                 "(or choose loss='ce', next-token cross-entropy)")
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        groups = [{"params": list(self.scales.values()), "lr_scale": 1.0}]
        if self.norms:
            groups.append({"params": list(self.norms.values()), "lr_scale": self.norm_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0)
        self.step, self.log, self.lr_factor = 0, [], 1.0
        self._set_schedule()
        self.fingerprint = runstate.fingerprint({**self.settings(), **(fingerprint_extra or {}),
                                                 "examples": len(examples), "world_batch": self.global_batch})
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=None if not _on_cuda(model) else [_device(model)])

    def settings(self) -> dict:
        """The config as this run resolved it (learning rate included), for the fingerprint and the checkpoint."""
        return {**self.cfg.as_dict(), "steps": self.steps, "lr": self.lr, "norm_lr_scale": self.norm_lr_scale,
                "bf16": self.bf16, "seed": self.seed}

    # ----- data order ---------------------------------------------------------------------------
    def global_batch_indices(self, step: int) -> list[int]:
        """Examples of the whole global batch at `step`: a seeded permutation per pass over the data."""
        epoch, pos = divmod(step, self.steps_per_pass)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[pos * self.global_batch:(pos + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's contiguous slice of the global batch, cut into micro-batches."""
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        mine = self.global_batch_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i:i + self.cfg.batch_size] for i in range(0, per_rank, self.cfg.batch_size)]

    # ----- training -----------------------------------------------------------------------------
    def _set_schedule(self) -> None:
        """Cosine with warm-up at `self.step`, from `lr * lr_factor` (the factor drops after a divergence)."""
        from transformers import get_cosine_schedule_with_warmup

        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] = self.lr * self.lr_factor * g["lr_scale"]
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, math.ceil(self.cfg.warmup * self.steps),
                                                        self.steps, last_epoch=self.step - 1)

    def train(self, progress: bool = True) -> list[dict]:
        self._resume()
        self._good = self._snapshot()
        model = self.ddp or self.model
        if self.cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        device = _device(self.model)
        bar = tqdm(total=self.steps, initial=self.step, desc=f"e2e_qp w{self.bits}",
                   disable=not progress or self.rank != 0)
        try:
            while self.step < self.steps:
                loss = self._one_step(model, self.step, device)
                if not math.isfinite(loss):
                    self._diverged(loss)
                    bar.n = self.step
                    continue
                self.step += 1
                self.log.append({"step": self.step, "loss": loss, "lr": self.schedule.get_last_lr()[0]})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % self.cfg.save_every == 0 or self.step == self.steps:
                    self._good = self._snapshot()
                    self.save_state()
        finally:
            bar.close()
            self.model.eval()
            if self.cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_disable"):
                self.model.gradient_checkpointing_disable()
        freeze_scales(self.model)
        for p in self.norms.values():
            p.requires_grad_(False)
        return self.log

    def _diverged(self, loss: float) -> None:
        """Non-finite loss: back to the last saved state, once, at a tenth of the learning rate."""
        if self.lr_factor != 1.0:
            raise FloatingPointError(f"E2E-QP diverged again (loss {loss}) at step {self.step + 1} after restarting "
                                     f"from step {self._good['step']} at {self.lr_factor:g}x the lr; "
                                     "lower --e2e-lr-scale or use --no-bf16")
        if self.rank == 0:
            print(f"E2E-QP step {self.step + 1}: loss {loss}; restoring step {self._good['step']} and retrying "
                  f"at {LR_RETRY_FACTOR:g}x the learning rate")
        self.lr_factor = LR_RETRY_FACTOR
        self._restore(self._good)
        self._set_schedule()

    def _one_step(self, model: nn.Module, step: int, device: torch.device) -> float:
        """Forward/backward every micro-batch, then step. Returns the global mean loss; if it is not finite
        (on any rank: the all-reduce spreads NaN, so every rank decides alike) nothing is updated."""
        micro = self.micro_batches(step)
        tokens = sum(self.examples.target_count(i) for i in self.global_batch_indices(step))
        denom = tokens / self.world  # DDP divides the summed gradient by world
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for j, idx in enumerate(micro):
            batch = {k: v.to(device) for k, v in collate(self.examples, idx).items()}
            no_sync = model.no_sync() if self.ddp is not None and j < len(micro) - 1 else contextlib.nullcontext()
            with no_sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss_sum, _ = (kl_loss_sum(model, self.teacher, batch) if self.cfg.loss == "kl"
                                   else token_loss_sum(model, batch))
                (loss_sum / denom).backward()
            total += loss_sum.detach()  # summed on the device: one host sync per step, not per micro-batch
        mean = _all_reduce_sum(total) / (denom * self.world)
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            return mean
        torch.nn.utils.clip_grad_norm_(list(self.trained.values()), self.cfg.clip)
        self.optimizer.step()
        self.schedule.step()
        return mean

    # ----- snapshots ------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """Trained tensors, AdamW moments and step, on CPU: what a save writes and a divergence restores."""
        tensors = {f"param/{k}": v.detach().to("cpu", copy=True) for k, v in self.trained.items()}
        for name, p in self.trained.items():
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"exp_avg/{name}"] = st["exp_avg"].to("cpu", copy=True)
                tensors[f"exp_avg_sq/{name}"] = st["exp_avg_sq"].to("cpu", copy=True)
                tensors[f"adam_step/{name}"] = st["step"].reshape(1).to("cpu", copy=True)
        return {"tensors": tensors, "step": self.step, "log": list(self.log), "lr_factor": self.lr_factor}

    def _restore(self, snap: dict) -> None:
        tensors = snap["tensors"]
        self.optimizer.state.clear()
        with torch.no_grad():
            for name, p in self.trained.items():
                p.copy_(tensors[f"param/{name}"])
                if f"exp_avg/{name}" in tensors:
                    self.optimizer.state[p] = {"step": tensors[f"adam_step/{name}"].reshape(()).clone(),
                                               "exp_avg": tensors[f"exp_avg/{name}"].to(p.device, copy=True),
                                               "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device, copy=True)}
        self.step, self.log = snap["step"], list(snap["log"])

    # ----- state on disk --------------------------------------------------------------------------
    def save_state(self) -> None:
        if self.state_dir is None or self.rank != 0:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        snap = self._good if self._good["step"] == self.step else self._snapshot()
        runstate.atomic_save_tensors({k: v.contiguous() for k, v in snap["tensors"].items()},
                             self.state_dir / "e2e_state.safetensors")
        crash_point("e2e_state.tensors_written")
        paths.atomic_write_text(self.state_dir / "e2e_progress.json", json.dumps(
            {"fingerprint": self.fingerprint, "step": self.step, "log": self.log, "lr_factor": self.lr_factor},
            indent=1))

    def _resume(self) -> None:
        if self.state_dir is None or not (self.state_dir / "e2e_progress.json").exists():
            return
        path = self.state_dir / "e2e_progress.json"
        progress = runstate.read_progress(path, self.fingerprint, {"step": int, "log": list})
        if not 0 <= progress["step"] <= self.steps:
            raise ValueError(f"{path} is at step {progress['step']} of {self.steps}; "
                             f"delete {self.state_dir} to start over")
        tensors = runstate.load_tensors(self.state_dir / "e2e_state.safetensors")
        missing = [f"param/{name}" for name, p in self.trained.items()
                   if f"param/{name}" not in tensors or tensors[f"param/{name}"].shape != p.shape]
        if missing:
            raise ValueError(f"{self.state_dir / 'e2e_state.safetensors'} lacks or misshapes {missing[:3]}; delete "
                             f"{self.state_dir} to start over")
        self._restore({"tensors": tensors, "step": progress["step"], "log": progress["log"]})
        self.lr_factor = progress.get("lr_factor", 1.0)
        self._set_schedule()


def _all_reduce_sum(value: torch.Tensor) -> float:
    if runstate.rank_world()[1] > 1:
        torch.distributed.all_reduce(value)
    return float(value.item())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on_cuda(model: nn.Module) -> bool:
    return _device(model).type == "cuda"
