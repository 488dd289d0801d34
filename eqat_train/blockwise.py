"""The block-by-block driver shared by Block-AP, RTN and GPTQ, with resume after every block.

Block i sees `q_in` (calibration activations through the already-quantized blocks 0..i-1) and is
trained or calibrated to reproduce `fp_out` (the fp block on fp inputs). After every block its packed
state and the next block's inputs go to disk atomically, so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from eqat_kernels import QuantLinear

from . import runstate
from .faults import crash_point
from .models import block_linears, find_blocks

FP16_SAFE_MAX = 60000.0
INFER_BATCH = 8  # windows per no-grad block pass: bigger matmuls, same results per window


class _StopForward(Exception):
    pass


@dataclass
class BlockContext:
    """How to call one block standalone: the non-hidden-state arguments captured at block 0."""

    kwargs: dict

    def call(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, **_expand_batch(self.kwargs, hidden.shape[0]))
        return out[0] if isinstance(out, (tuple, list)) else out


def _expand_batch(value, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    if isinstance(value, (tuple, list)):
        return type(value)(_expand_batch(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _expand_batch(v, batch) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, BlockContext]:
    """Hidden states entering block 0 for every window `[n, L, H]` (fp32), and the block call arguments."""
    _, blocks = find_blocks(model)
    captured: list[torch.Tensor] = []
    context: dict = {}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(hidden.detach().float())
        if not context:
            context.update({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(windows.shape[0]):
            try:
                model(windows[i:i + 1], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(captured), BlockContext(context)


class ActivationStore:
    """`[n, L, H]` activations in fp16 (fp32 if values exceed fp16's range), in RAM or memory-mapped on disk."""

    def __init__(self, values: torch.Tensor, path: Path | None = None, dtype: str = "float16"):
        if dtype == "float16" and values.numel() and values.abs().max().item() > FP16_SAFE_MAX:
            dtype = "float32"
        if path is None:
            self.data = values.detach().numpy().astype(dtype) if values.dtype != torch.bfloat16 else values.float().numpy().astype(dtype)
        else:
            tmp = path.with_suffix(".tmp")
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(values.shape))
            mm[:] = values.detach().float().numpy()
            mm.flush()
            del mm
            os.replace(tmp, path)
            self.data = np.load(path, mmap_mode="r")

    @classmethod
    def open(cls, path: Path) -> "ActivationStore":
        store = cls.__new__(cls)
        store.data = runstate.open_array(path)
        return store

    def __len__(self) -> int:
        return self.data.shape[0]

    def get(self, index) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data[index])).float()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(self.data))
        os.replace(tmp, path)


@torch.no_grad()
def run_block(block: nn.Module, ctx: BlockContext, store: ActivationStore, batch_size: int,
              bf16: bool = False) -> torch.Tensor:
    """The block applied to every stored activation, batched; `bf16` autocasts the matmuls (~4x faster
    on CPU: a pass over 128 x 512 tokens of a SmolLM2 block takes 7.7 s in fp32)."""
    outs = []
    for i in range(0, len(store), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outs.append(ctx.call(block, store.get(slice(i, i + batch_size))).float())
    return torch.cat(outs)


# A per-block step. It may set attributes `needs_inputs = False` (data-free, e.g. RTN) or
# `needs_targets = False` (inputs only, e.g. GPTQ's Hessians) so the driver skips passes it would waste.
BlockQuantizer = Callable[[int, nn.Module, BlockContext, ActivationStore, ActivationStore, dict], dict]


@dataclass
class BlockwiseRun:
    """One block-wise quantization of `model` with `quantize_block`, resumable from `state_dir`."""

    model: nn.Module
    bits: int
    group_size: int
    quantize_block: BlockQuantizer
    options: dict
    state_dir: Path | None = None
    offload: bool = False
    batch_size: int = 2
    bf16_passes: bool = False  # targets and propagation under bf16 autocast
    log: list[dict] = field(default_factory=list)

    def run(self, calib: torch.Tensor, val: torch.Tensor | None = None, progress: bool = True) -> list[dict]:
        _, blocks = find_blocks(self.model)
        start = self._resume(blocks)
        needs_inputs = getattr(self.quantize_block, "needs_inputs", True)
        needs_targets = getattr(self.quantize_block, "needs_targets", True)
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
        bar = tqdm(range(start, len(blocks)), desc=f"{self.options.get('method', 'quantize')} w{self.bits}g{self.group_size}",
                   disable=not progress, initial=start, total=len(blocks))
        for i in bar:
            block = blocks[i]
            fp_out = self._store("fp_out", run_block(block, ctx, fp_in, INFER_BATCH, self.bf16_passes)) if fp_in is not None else None
            fv_out = self._store("fv_out", run_block(block, ctx, fv_in, INFER_BATCH, self.bf16_passes)) if fv_in is not None else None
            torch.manual_seed(self.options.get("seed", 0) + i)  # same per block whether resumed or not
            stats = self.quantize_block(i, block, ctx, q_in, fp_out,
                                        {"val_in": qv_in, "val_out": fv_out, "batch_size": self.batch_size})
            if q_in is not None:
                for m in block.modules():
                    if isinstance(m, QuantLinear):
                        m.backend = "reference"  # exact fp32 propagation
                q_next = run_block(block, ctx, q_in, INFER_BATCH, self.bf16_passes)
                qv_next = run_block(block, ctx, qv_in, INFER_BATCH, self.bf16_passes) if qv_in is not None else None
                for m in block.modules():
                    if isinstance(m, QuantLinear):
                        m.backend = "auto"
                q_in, fp_in = self._store("q_in", q_next), fp_out
                if qv_in is not None:
                    qv_in, fv_in = self._store("qv_in", qv_next), fv_out
            stats = {"block": i, **stats}
            self.log.append(stats)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if isinstance(v, float)})
            self._checkpoint(i, block, {"q_in": q_in, "fp_in": fp_in, "qv_in": qv_in, "fv_in": fv_in})
        return self.log

    # ----- storage and resume ------------------------------------------------------------------------
    def _store(self, name: str, values: torch.Tensor) -> ActivationStore:
        path = (self.state_dir / f"{name}.work.npy") if (self.offload and self.state_dir) else None
        return ActivationStore(values, path)

    def _fingerprint(self) -> str:
        return runstate.fingerprint({"bits": self.bits, "group_size": self.group_size, **self.options})

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
        runstate.atomic_write_text(self.state_dir / "progress.json", json.dumps(
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
            swap_in_empty_quant_linears(blocks[i], self.bits, self.group_size)
            saved = self.state_dir / f"block_{i:04d}.safetensors"
            try:
                blocks[i].load_state_dict(runstate.load_tensors(saved))
            except RuntimeError as e:  # parseable, but not this block's tensors
                raise ValueError(f"{saved} does not hold block {i}'s tensors ({str(e)[:200]}); delete "
                                 f"{self.state_dir} to start over") from None
        self.log = progress["log"]
        return done


@torch.no_grad()
def observe_linear_inputs(block: nn.Module, ctx: BlockContext, inputs: ActivationStore, batch: int,
                          observe: Callable[[str, torch.Tensor], None], windows: int | None = None,
                          bf16: bool = False) -> None:
    """Run `block` over the first `windows` of `inputs` (all by default), handing every linear's input to
    `observe(name, x)`: the one hook mechanism behind GPTQ's Hessians and Block-AP's input energy."""
    n = len(inputs) if windows is None else min(len(inputs), windows)
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: observe(name, args[0])) for name in block_linears(block)]
    try:
        for i in range(0, n, batch):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                ctx.call(block, inputs.get(slice(i, min(i + batch, n))))
    finally:
        for h in handles:
            h.remove()


def _replace_linears(block: nn.Module, make: Callable[[str, nn.Linear], QuantLinear]) -> dict[str, QuantLinear]:
    swapped = {}
    for name, lin in block_linears(block).items():
        parent, _, child = name.rpartition(".")
        swapped[name] = make(name, lin)
        setattr(block.get_submodule(parent) if parent else block, child, swapped[name])
    return swapped


def swap_in_empty_quant_linears(block: nn.Module, bits: int, group_size: int) -> dict[str, QuantLinear]:
    """Replace a block's linears by packed QuantLinears of the same shapes, ready for load_state_dict."""
    return _replace_linears(block, lambda name, lin: QuantLinear(
        lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None,
        dtype=torch.float16, device=lin.weight.device))


def swap_in_trainable(block: nn.Module, bits: int, group_size: int, init: str = "minmax",
                      importance: dict[str, torch.Tensor] | None = None) -> dict[str, QuantLinear]:
    """Replace a block's linears by trainable QuantLinears initialised from them (`init`, see from_linear);
    `importance` maps a linear's name in the block to its per-input-feature weight."""
    return _replace_linears(block, lambda name, lin: QuantLinear.from_linear(
        lin, bits, group_size, init, (importance or {}).get(name)))
