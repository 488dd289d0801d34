"""Integer codes <-> GPTQ-v2 int32 words (docs/DESIGN.md, section 4).

The format is one little-endian bit stream per column: code `k` sits at bit offset `b * k`, least
significant bits first, 32 bits per word. For 2/4/8 bits no code straddles a word; for 3 bits this is
exactly GPTQ's 32-codes-in-3-words layout. One implementation therefore serves every bit-width.
"""
from __future__ import annotations

import torch

from .spec import PACK_UNIT, check_bits

_WORD = 1 << 32


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[R, C]` codes along dim 0 into `[R * bits / 32, C]` int32 words."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if rows % PACK_UNIT:
        raise ValueError(f"cannot pack {rows} rows: a multiple of {PACK_UNIT} is needed")
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: min {c.min().item()}, max {c.max().item()}")
    c = c.reshape(rows // 32, 32, cols)
    words = torch.zeros(rows // 32, bits, cols, dtype=torch.int64, device=codes.device)
    for i in range(32):
        offset = bits * i
        word, shift = divmod(offset, 32)
        words[:, word] |= (c[:, i] << shift) & (_WORD - 1)
        if shift + bits > 32:  # the code straddles into the next word (3-bit only)
            words[:, word + 1] |= c[:, i] >> (32 - shift)
    words = torch.where(words >= (1 << 31), words - _WORD, words)
    return words.reshape(rows * bits // 32, cols).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of `pack_rows`: `[rows * bits / 32, C]` int32 -> `[rows, C]` int32 codes."""
    check_bits(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed words must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if rows % PACK_UNIT or packed.shape[0] != rows * bits // 32:
        raise ValueError(f"{packed.shape[0]} packed rows do not hold {rows} codes of {bits} bits")
    w = packed.to(torch.int64) & (_WORD - 1)
    w = w.reshape(rows // 32, bits, packed.shape[1])
    mask = (1 << bits) - 1
    out = torch.empty(rows // 32, 32, packed.shape[1], dtype=torch.int64, device=packed.device)
    for i in range(32):
        word, shift = divmod(bits * i, 32)
        value = w[:, word] >> shift
        if shift + bits > 32:
            value = value | (w[:, word + 1] << (32 - shift))
        out[:, i] = value & mask
    return out.reshape(rows, packed.shape[1]).to(torch.int32)


def pack_qweight(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """`[K, N]` codes -> qweight `[K * b / 32, N]`."""
    return pack_rows(codes_kn, bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return unpack_rows(qweight, bits, in_features)


def pack_qzeros(zeros_gn: torch.Tensor, bits: int) -> torch.Tensor:
    """`[G, N]` integer zeros -> qzeros `[G, N * b / 32]`, packed along N."""
    return pack_rows(zeros_gn.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    return unpack_rows(qzeros.t().contiguous(), bits, out_features).t().contiguous()


def split_3bit_planes(qweight: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ 3-bit words -> (low 2 bits packed as int2 `[K/16, N]` int32, high bit `[K/16, N]` int16).

    3-bit codes straddle words, which forces per-element gathers in a kernel; two planes of
    power-of-two width unpack with plain shifts. Exact, and `merge_3bit_planes` inverts it.
    The high plane holds 16 codes per 16-bit element (code 16w + j at bit j of element w): the same rows
    as the low plane, so a kernel reads a low word and its high bits with one index (the fragment-order
    GEMM's layout propagation keeps both in registers only then).
    """
    codes = unpack_qweight(qweight, 3, in_features)
    high = _pack_plane(codes >> 2, 1, per_word=16)
    return _pack_plane(codes & 3, 2), torch.where(high >= 1 << 15, high - (1 << 16), high).to(torch.int16)


def merge_3bit_planes(low: torch.Tensor, high: torch.Tensor, in_features: int) -> torch.Tensor:
    codes = _unpack_plane(low, 2, in_features) | (_unpack_plane(high, 1, in_features, 16) << 2)
    return pack_qweight(codes, 3)


def _pack_plane(codes: torch.Tensor, bits: int, per_word: int | None = None) -> torch.Tensor:
    per_word = per_word or 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0] // per_word, per_word, codes.shape[1])
    shifts = (torch.arange(per_word, device=codes.device) * bits).view(1, -1, 1)
    words = (c << shifts).sum(1)
    return torch.where(words >= (1 << 31), words - _WORD, words).to(torch.int32)


def _unpack_plane(words: torch.Tensor, bits: int, rows: int, per_word: int | None = None) -> torch.Tensor:
    per_word = per_word or 32 // bits
    shifts = (torch.arange(per_word, device=words.device) * bits).view(1, -1, 1)
    c = ((words.to(torch.int64) & (_WORD - 1)).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(rows, words.shape[1]).to(torch.int32)
