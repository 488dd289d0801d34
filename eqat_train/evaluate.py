"""Perplexity over token windows: the quality number every table in the README reports."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from tqdm import tqdm

from eqat_kernels import compute_path


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, exact: bool = True,
               progress: bool = True) -> float:
    """exp(mean next-token NLL) over all windows (each predicts its own tokens 1..L-1).

    `exact` computes quantized layers in fp32 from the packed codes (the number a GPU would give);
    otherwise they take the fast CPU path (torch's int4 kernel, bf16).
    """
    if windows.numel() == 0:
        raise ValueError("no evaluation windows")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with compute_path(model, "reference") if exact else contextlib.nullcontext():
        for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
            ids = windows[start:start + batch_size].to(device)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)
