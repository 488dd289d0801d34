"""Calibration activations of one block: capture, storage (RAM or memory-mapped disk), batched passes
and the hook that hands every linear's input to a method (GPTQ's Hessians, Block-AP's input energy)."""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import runstate
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


def _largest_magnitude(values: torch.Tensor) -> float:
    low, high = torch.aminmax(values)  # one pass, no |values| temporary
    return max(-low.item(), high.item())


class ActivationStore:
    """`[n, L, H]` activations in fp16 (fp32 if values exceed fp16's range), in RAM or memory-mapped on disk."""

    def __init__(self, values: torch.Tensor, path: Path | None = None, dtype: str = "float16"):
        self._fill([values], values.shape, path, dtype)

    @classmethod
    def from_batches(cls, batches: Iterable[torch.Tensor], n: int, path: Path | None = None) -> "ActivationStore":
        """The store of `n` rows arriving in consecutive batches, written as they come: no full-size fp32
        copy of them is ever held (at 512 windows of 512 x 576 that copy is 600 MB, and it was made twice)."""
        store = cls.__new__(cls)
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise ValueError("an activation store needs at least one window")
        store._fill(itertools.chain([first], batches), (n, *first.shape[1:]), path, "float16")
        return store

    def _fill(self, batches: Iterable[torch.Tensor], shape: tuple, path: Path | None, dtype: str) -> None:
        tmp = None if path is None else path.with_suffix(".tmp")

        def allocate(kind: str) -> np.ndarray:
            if tmp is None:
                return np.empty(shape, dtype=kind)
            return np.lib.format.open_memmap(tmp, mode="w+", dtype=kind, shape=tuple(shape))

        data, row = allocate(dtype), 0
        for batch in batches:
            values = batch.detach()
            if data.dtype == np.float16 and values.numel() and _largest_magnitude(values) > FP16_SAFE_MAX:
                wider = np.array(data[:row], dtype=np.float32)  # the rows so far, before the file is reused
                del data
                data = allocate("float32")
                data[:row] = wider
            # torch's vectorised conversion into the array's memory: numpy's own fp32 -> fp16 cast is ~10x slower
            # and was ~10% of a Block-AP run (four stores of every calibration window per block)
            torch.from_numpy(data[row:row + values.shape[0]]).copy_(values)
            row += values.shape[0]
        if row != shape[0]:
            raise ValueError(f"activation store expected {shape[0]} rows, got {row}")
        if tmp is None:
            self.data = data
        else:
            data.flush()
            del data
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
def block_outputs(block: nn.Module, ctx: BlockContext, store: ActivationStore, batch_size: int,
                  bf16: bool = False) -> Iterator[torch.Tensor]:
    """The block applied to the stored activations, `batch_size` windows at a time (fp32 outputs); `bf16`
    autocasts the matmuls (~4x faster on CPU: a pass over 128 x 512 tokens of a SmolLM2 block takes 7.7 s
    in fp32)."""
    for i in range(0, len(store), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            yield ctx.call(block, store.get(slice(i, i + batch_size))).float()


def run_block(block: nn.Module, ctx: BlockContext, store: ActivationStore, batch_size: int,
              bf16: bool = False) -> torch.Tensor:
    """`block_outputs` as one tensor."""
    return torch.cat(list(block_outputs(block, ctx, store, batch_size, bf16)))


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
