"""An independent GPTQ checkpoint writer for tests, written after AutoGPTQ's `QuantLinear.pack` loops
(numpy, word by word), not with eqat's packer: folders it writes are what other tools hand our users.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import save_file


def _pack_columns(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's row loop: `[K, N]` uint32 codes -> `[K * bits / 32, N]` uint32 words."""
    k, n = intweight.shape
    q = np.zeros((k // 32 * bits, n), dtype=np.uint64)
    w = intweight.astype(np.uint64)
    i = row = 0
    while row < q.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                q[row] |= w[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, one code split 2|1, 10 codes, one split 1|2, 10 codes
            for j in range(i, i + 10):
                q[row] |= w[j] << np.uint64(3 * (j - i))
            i += 10
            q[row] |= (w[i] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
            row += 1
            q[row] |= (w[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                q[row] |= w[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            q[row] |= (w[i] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
            row += 1
            q[row] |= (w[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                q[row] |= w[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return (q & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.view(np.int32).copy())


def quantize_layer(w: torch.Tensor, bits: int, group: int, sym: bool, act_order: bool, rng: np.random.Generator):
    """Min-max (or symmetric) group quantization of `[N, K]` weights, groups over a random feature order
    when `act_order` (GPTQ's desc_act), as integer codes `[K, N]`, zeros `[G, N]`, scales `[G, N]`, g_idx."""
    n, k = w.shape
    order = rng.permutation(k) if act_order else np.arange(k)
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // group
    wt = w.t().double().numpy()  # [K, N]
    codes = np.zeros((k, n), dtype=np.uint32)
    zeros = np.zeros((k // group, n), dtype=np.uint32)
    scales = np.zeros((k // group, n), dtype=np.float64)
    qmax = (1 << bits) - 1
    for gi in range(k // group):
        rows = np.nonzero(g_idx == gi)[0]
        block = wt[rows]
        if sym:
            s = np.maximum(np.abs(block).max(0), 1e-8) * 2 / qmax
            z = np.full(n, (qmax + 1) // 2)
        else:
            lo, hi = np.minimum(block.min(0), 0), np.maximum(block.max(0), 0)
            s = np.maximum(hi - lo, 1e-8) / qmax
            z = np.clip(np.round(-lo / s), 1, qmax)  # >= 1 so that v1's z - 1 stays representable
        s = s.astype(np.float16).astype(np.float64)
        codes[rows] = np.clip(np.round(block / s + z), 0, qmax).astype(np.uint32)
        zeros[gi], scales[gi] = z, s
    return codes, zeros, scales, g_idx


def write_gptq_folder(model, tokenizer, out, bits: int, group: int, *, fmt: str = "gptq_v2", sym: bool = False,
                      act_order: bool = False, with_g_idx: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Quantize every linear of every block and write a GPTQ folder; returns the dense `W_hat` per layer."""
    rng = np.random.default_rng(seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    dense = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
            continue
        codes, zeros, scales, g_idx = quantize_layer(mod.weight.detach(), bits, group, sym, act_order, rng)
        stored_zeros = zeros - 1 if fmt == "gptq" else zeros
        state.pop(f"{name}.weight")
        state[f"{name}.qweight"] = _to_int32(_pack_columns(codes, bits))
        state[f"{name}.qzeros"] = _to_int32(_pack_columns(stored_zeros.T.copy(), bits).T.copy())
        state[f"{name}.scales"] = torch.from_numpy(scales).half()
        if with_g_idx:
            state[f"{name}.g_idx"] = torch.from_numpy(g_idx)
        w_hat = (codes.astype(np.float64) - zeros[g_idx]) * scales[g_idx]  # [K, N]
        dense[name] = torch.from_numpy(w_hat.T.copy())
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                     "desc_act": act_order, **({"checkpoint_format": fmt} if fmt != "gptq" else {})}
    (out / "config.json").write_text(json.dumps(config, default=str))
    tokenizer.save_pretrained(out)
    return dense
