"""E2E-QP (DESIGN section 3): codes and zero points frozen, only the scales train on the whole model's loss.

Every QuantLinear stays packed; its autograd Function gives dx and the fused ds (Triton on CUDA, the
cached reference path on CPU), so this stage trains through the same path inference runs. Works on
one process or under `torchrun` with DistributedDataParallel (gloo on CPU, NCCL on GPU): each rank takes
its slice of every global batch, DDP averages the gradients, so the result matches one process with the
same global batch. State (scales, AdamW moments, step) goes to disk atomically every `save_every` steps
as safetensors + JSON, and a rerun of the same command continues from the last saved step.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from eqat_kernels import QuantLinear

from .blockwise import _atomic_save_tensors, _atomic_write_text
from .examples import Examples, collate

LOSSES = ("ce", "kl")


@dataclass
class E2EConfig:
    """Defaults: published lr (2e-5 for 2-bit, 1e-5 for 3/4-bit) times `lr_scale`, cosine with 3% warm-up."""

    bits: int
    steps: int = 64
    batch_size: int = 1
    grad_accum: int = 2
    lr: float | None = None
    lr_scale: float = 1.0
    warmup: float = 0.03
    clip: float = 0.3
    bf16: bool = True
    gradient_checkpointing: bool = False
    save_every: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("E2E-QP needs steps, batch_size and grad_accum >= 1")
        if self.lr is None:
            self.lr = (2e-5 if self.bits == 2 else 1e-5) * self.lr_scale
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"E2E-QP learning rate must be a positive number, got {self.lr}")

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
            m.scales.data = m.scales.data.float()
            m.train_scales(True)
            scales[f"{name}.scales"] = m.scales
    if not scales:
        raise ValueError("the model has no QuantLinear layers: quantize it (Block-AP, RTN or GPTQ) before E2E-QP")
    return scales


def freeze_scales(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """End of training: scales back to storage dtype and frozen (the checkpoint format stores fp16)."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.is_packed:
            m.train_scales(False)
            m.scales.data = m.scales.data.to(dtype)


def token_loss_sum(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the tokens whose label is not -100, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


class E2ETrainer:
    """Owns the model, optimizer, schedule and step state of one E2E-QP run."""

    def __init__(self, model: nn.Module, examples: Examples, cfg: E2EConfig, state_dir: Path | None = None,
                 fingerprint_extra: dict | None = None):
        from transformers import get_cosine_schedule_with_warmup

        self.model, self.examples, self.cfg = model, examples, cfg
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.rank, self.world = _dist_rank_world()
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        if len(examples) < self.global_batch:
            raise ValueError(f"E2E-QP global batch is {self.global_batch} examples but only {len(examples)} were given")
        self.scales = trainable_scales(model)
        self.optimizer = torch.optim.AdamW(self.scales.values(), lr=cfg.lr, weight_decay=0.0)
        self.schedule = get_cosine_schedule_with_warmup(self.optimizer, math.ceil(cfg.warmup * cfg.steps), cfg.steps)
        self.step, self.log = 0, []
        self.fingerprint = _fingerprint({**cfg.as_dict(), **(fingerprint_extra or {}), "examples": len(examples),
                                         "world_batch": self.global_batch})
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=None if not _on_cuda(model) else [_device(model)])

    # ----- data order ---------------------------------------------------------------------------
    def global_batch_indices(self, step: int) -> list[int]:
        """Examples of the whole global batch at `step`: a seeded permutation per pass over the data."""
        per_epoch = len(self.examples) // self.global_batch
        epoch, pos = divmod(step, per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        return order[pos * self.global_batch:(pos + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This rank's contiguous slice of the global batch, cut into micro-batches."""
        per_rank = self.cfg.batch_size * self.cfg.grad_accum
        mine = self.global_batch_indices(step)[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i:i + self.cfg.batch_size] for i in range(0, per_rank, self.cfg.batch_size)]

    # ----- training -----------------------------------------------------------------------------
    def train(self, progress: bool = True) -> list[dict]:
        self._resume()
        model = self.ddp or self.model
        if self.cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        device = _device(self.model)
        bar = tqdm(range(self.step, self.cfg.steps), desc=f"e2e_qp w{self.cfg.bits}", initial=self.step,
                   total=self.cfg.steps, disable=not progress or self.rank != 0)
        try:
            for step in bar:
                loss = self._one_step(model, step, device)
                self.step = step + 1
                self.log.append({"step": self.step, "loss": loss, "lr": self.schedule.get_last_lr()[0]})
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save_state()
        finally:
            self.model.eval()
            if self.cfg.gradient_checkpointing and hasattr(self.model, "gradient_checkpointing_disable"):
                self.model.gradient_checkpointing_disable()
        freeze_scales(self.model)
        return self.log

    def _one_step(self, model: nn.Module, step: int, device: torch.device) -> float:
        micro = self.micro_batches(step)
        tokens = sum(self.examples.target_count(i) for i in self.global_batch_indices(step))
        denom = tokens / self.world  # DDP divides the summed gradient by world
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j, idx in enumerate(micro):
            batch = {k: v.to(device) for k, v in collate(self.examples, idx).items()}
            sync = j == len(micro) - 1
            with (model.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()), \
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                loss_sum, _ = token_loss_sum(model, batch)
            loss = loss_sum / denom
            if not torch.isfinite(loss):
                raise FloatingPointError(f"E2E-QP step {step + 1}: the loss is {loss.item()} (diverged); "
                                         f"lower --e2e-lr-scale (now lr={self.cfg.lr:g})")
            with model.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext():
                loss.backward()
            total += loss_sum.item()
        torch.nn.utils.clip_grad_norm_(list(self.scales.values()), self.cfg.clip)
        self.optimizer.step()
        self.schedule.step()
        return _all_reduce_sum(total, device) / (denom * self.world)

    # ----- state on disk --------------------------------------------------------------------------
    def save_state(self) -> None:
        if self.state_dir is None or self.rank != 0:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"scale/{k}": v.detach().contiguous() for k, v in self.scales.items()}
        names = list(self.scales)
        for i, p in enumerate(self.scales.values()):
            st = self.optimizer.state.get(p)
            if st:
                tensors[f"exp_avg/{names[i]}"] = st["exp_avg"].contiguous()
                tensors[f"exp_avg_sq/{names[i]}"] = st["exp_avg_sq"].contiguous()
                tensors[f"adam_step/{names[i]}"] = st["step"].reshape(1).contiguous()
        _atomic_save_tensors(tensors, self.state_dir / "e2e_state.safetensors")
        _atomic_write_text(self.state_dir / "e2e_progress.json", json.dumps(
            {"fingerprint": self.fingerprint, "step": self.step, "log": self.log}, indent=1))

    def _resume(self) -> None:
        if self.state_dir is None or not (self.state_dir / "e2e_progress.json").exists():
            return
        progress = json.loads((self.state_dir / "e2e_progress.json").read_text())
        if progress["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.state_dir} holds an E2E-QP run with other settings; use another output "
                             "folder or delete it to start over")
        tensors = load_file(self.state_dir / "e2e_state.safetensors")
        with torch.no_grad():
            for name, p in self.scales.items():
                p.copy_(tensors[f"scale/{name}"])
                if f"exp_avg/{name}" in tensors:
                    self.optimizer.state[p] = {"step": tensors[f"adam_step/{name}"].reshape(()).clone(),
                                               "exp_avg": tensors[f"exp_avg/{name}"].clone(),
                                               "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].clone()}
        self.step, self.log = progress["step"], progress["log"]
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended on resume
            warnings.simplefilter("ignore")
            for _ in range(self.step):
                self.schedule.step()


def _fingerprint(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_sum(value: float, device: torch.device) -> float:
    if _dist_rank_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _on_cuda(model: nn.Module) -> bool:
    return _device(model).type == "cuda"
