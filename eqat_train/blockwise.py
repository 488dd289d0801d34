"""The block-by-block driver shared by Block-AP, RTN and GPTQ, with resume after every block.

Block i sees `q_in` (calibration activations through the already-quantized blocks 0..i-1) and is
trained or calibrated to reproduce `fp_out` (the fp block on fp inputs). After every block its packed
state and the next block's inputs go to disk atomically, so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from eqat_kernels import compute_path, paths

from . import runstate
from .activations import INFER_BATCH, ActivationStore, BlockContext, block_outputs, capture_block_inputs
from .configs import option
from .faults import crash_point
from .models import find_blocks, swap_in_empty_quant_linears


@dataclass
class BlockData:
    """What a block-wise method gets for block `index`: the block, how to call it, and its data."""

    index: int
    block: nn.Module
    ctx: BlockContext | None
    inputs: ActivationStore | None  # calibration activations through the already-quantized blocks
    targets: ActivationStore | None  # the fp block's outputs on fp inputs
    val_inputs: ActivationStore | None
    val_targets: ActivationStore | None
    bf16: bool  # run passes under bf16 autocast


@dataclass
class BlockwiseConfig:
    """A block-wise method (Block-AP, RTN, GPTQ): its settings, and the step the driver calls per block.

    A method declares what data it needs; the driver skips the passes it would waste (RTN needs no
    activations, GPTQ only the inputs)."""

    method: ClassVar[str]
    needs_inputs: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = True

    bits: int = option(2, "bits per weight: 2, 3, 4 (or 8)")
    group_size: int = option(64, "input features per scale/zero group: 32, 64, 128, 256, or -1 (one per row)")

    def __post_init__(self):
        from eqat_kernels.spec import check_bits, check_group_size

        check_bits(self.bits)  # fail before loading a model, not an hour into a run
        check_group_size(self.group_size)

    def quantize_block(self, data: BlockData) -> dict:
        """Replace `data.block`'s linears by packed QuantLinears; returns per-block statistics."""
        raise NotImplementedError

    def as_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


@dataclass
class BlockwiseRun:
    """One block-wise quantization of `model` with `quantize_block`, resumable from `state_dir`."""

    model: nn.Module
    method: BlockwiseConfig
    options: dict  # everything that must match for a saved state to be resumed
    state_dir: Path | None = None
    offload: bool = False
    bf16_passes: bool = False  # targets and propagation under bf16 autocast
    seed: int = 0  # block i trains from torch.manual_seed(seed + i), resumed or not
    log: list[dict] = field(default_factory=list)

    def run(self, calib: torch.Tensor, val: torch.Tensor | None = None, progress: bool = True) -> list[dict]:
        _, blocks = find_blocks(self.model)
        start = self._resume(blocks)
        needs_inputs, needs_targets = self.method.needs_inputs, self.method.needs_targets
        use_val = val is not None and needs_targets
        q_in = fp_in = qv_in = fv_in = None
        if needs_inputs and (start == 0 or self.state_dir is None):
            fp_h, ctx = capture_block_inputs(self.model, torch.cat([calib, val]) if use_val else calib)
            n_cal = calib.shape[0]
            q_in = self._store("q_in", fp_h[:n_cal])
            fp_in = self._store("fp_in", fp_h[:n_cal]) if needs_targets else None
            qv_in = self._store("qv_in", fp_h[n_cal:]) if use_val else None
            fv_in = self._store("fv_in", fp_h[n_cal:]) if use_val else None
        elif needs_inputs:
            _, ctx = capture_block_inputs(self.model, calib[:1])
            q_in, fp_in, qv_in, fv_in = (ActivationStore.open(self.state_dir / f"{k}.npy") if (self.state_dir / f"{k}.npy").exists() else None
                                         for k in ("q_in", "fp_in", "qv_in", "fv_in"))
        else:
            ctx = None  # data-free method (RTN): no activations at all
        m = self.method
        bar = tqdm(range(start, len(blocks)), desc=f"{m.method} w{m.bits}g{m.group_size}",
                   disable=not progress, initial=start, total=len(blocks))
        for i in bar:
            block = blocks[i]
            fp_out = self._pass("fp_out", block, ctx, fp_in) if fp_in is not None else None
            fv_out = self._pass("fv_out", block, ctx, fv_in) if fv_in is not None else None
            torch.manual_seed(self.seed + i)  # same per block whether resumed or not
            stats = self.method.quantize_block(BlockData(i, block, ctx, q_in, fp_out, qv_in, fv_out, self.bf16_passes))
            if q_in is not None:
                with compute_path(block, "reference"):  # exact fp32 propagation
                    q_in, fp_in = self._pass("q_in", block, ctx, q_in), fp_out
                    if qv_in is not None:
                        qv_in, fv_in = self._pass("qv_in", block, ctx, qv_in), fv_out
            stats = {"block": i, **stats}
            self.log.append(stats)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if isinstance(v, float)})
            self._checkpoint(i, block, {"q_in": q_in, "fp_in": fp_in, "qv_in": qv_in, "fv_in": fv_in})
        return self.log

    # ----- storage and resume ------------------------------------------------------------------------
    def _store(self, name: str, values: torch.Tensor) -> ActivationStore:
        return ActivationStore(values, self._work_path(name))

    def _pass(self, name: str, block: nn.Module, ctx, inputs: ActivationStore) -> ActivationStore:
        """`block` over `inputs`, each batch written to the new store as it comes."""
        return ActivationStore.from_batches(block_outputs(block, ctx, inputs, INFER_BATCH, self.bf16_passes),
                                            len(inputs), self._work_path(name))

    def _work_path(self, name: str) -> Path | None:
        if not (self.offload and self.state_dir):
            return None
        self.state_dir.mkdir(parents=True, exist_ok=True)  # a fresh run's first stores come before any checkpoint
        return self.state_dir / f"{name}.work.npy"

    def _fingerprint(self) -> str:
        return runstate.fingerprint({**self.method.as_dict(), **self.options})

    def _checkpoint(self, i: int, block: nn.Module, stores: dict) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        runstate.atomic_save_tensors({k: v.detach().contiguous() for k, v in block.state_dict().items()},
                             self.state_dir / f"block_{i:04d}.safetensors")
        crash_point("block_checkpoint.tensors_written")
        for name, store in stores.items():
            if store is not None:
                store.save(self.state_dir / f"{name}.npy")
        crash_point("block_checkpoint.activations_written")
        paths.atomic_write_text(self.state_dir / "progress.json", json.dumps(
            {"fingerprint": self._fingerprint(), "blocks_done": i + 1, "log": self.log}, indent=1))

    def _resume(self, blocks: nn.ModuleList) -> int:
        """Restore finished blocks from `state_dir`; returns the first block still to do."""
        if self.state_dir is None or not (self.state_dir / "progress.json").exists():
            return 0
        path = self.state_dir / "progress.json"
        progress = runstate.read_progress(path, self._fingerprint(), {"blocks_done": int, "log": list})
        done = progress["blocks_done"]
        if not 0 <= done <= len(blocks):
            raise ValueError(f"{path} says {done} blocks are done, but the model has {len(blocks)}; delete "
                             f"{self.state_dir} to start over")
        for i in range(done):
            swap_in_empty_quant_linears(blocks[i], self.method.bits, self.method.group_size)
            saved = self.state_dir / f"block_{i:04d}.safetensors"
            try:
                blocks[i].load_state_dict(runstate.load_tensors(saved))
            except RuntimeError as e:  # parseable, but not this block's tensors
                raise ValueError(f"{saved} does not hold block {i}'s tensors ({str(e)[:200]}); delete "
                                 f"{self.state_dir} to start over") from None
        self.log = progress["log"]
        return done
