"""Launch configurations as data, kept apart from the kernel math (the gemlite way).

Each kernel has a short curated candidate list per M bucket; `select_config` returns the tuned winner
for a shape bucket if `warmup` measured one, else the curated default. Selection only reads a dict,
so nothing is ever re-tuned inside a training step.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# at or below this many rows the split-K GEMV (block_m rows per program) beats tensor-core tiles padded to 16
# rows where the GEMM dequantizes into shared memory (3 bits, fp32 activations); PREDICTED on H100/A100
# (benchmarks/kernel_model.py): M = 4 about even, M = 8 decode 0.7-1.1x fp16 cuBLAS vs the padded GEMM's
# 0.9-2.0x. The fragment-order GEMM wins from M = 2, at 3 bits from M = 1 (`decode_max_m`).
DECODE_MAX_M = 4
# fp16/bf16 forward and dx from this many rows dequantize the weight once (one pass over N x K) and let
# cuBLAS multiply (ds: cuBLAS's fp32 x^T dy, weighted per group by our kernel); None: never. Per (op,
# architecture), and per bit-width where they differ, from the crossover that benchmarks/kernel_model.py
# PREDICTS on 4096 x 4096 with issue slots per pipe (docs/RESULTS.md; from M = 256 the fused tiles are the
# M = 4096 ones): on H100 the fused forward is int-pipe bound at 2/3 bits (0.26-0.41x fp16 cuBLAS at M = 256
# and 512 against 0.44-0.57x dense) and wins at 4 bits up to 512 (0.59-0.60x vs 0.48-0.57x); on A100 the
# fused 2/4-bit forward stays at the tensor roofline, 3 bits lose from 1024 (0.70x vs 0.84x); dense dx
# wins from 256 on both. An unknown architecture takes the rule of the newest one below it.
DENSE_MIN_M: dict[tuple[str, int], int | None | dict[int, int | None]] = {
    ("forward", 80): {2: None, 3: 1024, 4: None}, ("grad_input", 80): 256, ("grad_scales", 80): 256,
    ("forward", 90): {2: 256, 3: 256, 4: 1024}, ("grad_input", 90): 256, ("grad_scales", 90): 256,
}


def uses_dense(op: str, m: int, capability: int, dtype_is_half: bool, bits: int) -> bool:
    """Whether `op` (forward / grad_input / grad_scales) at `m` rows of `bits`-bit weights on compute capability
    `capability` (e.g. 90) takes the dense path; fp32 activations keep the exact fused FMA tiles."""
    known = [cc for o, cc in DENSE_MIN_M if o == op and cc <= capability] or [min(cc for _, cc in DENSE_MIN_M)]
    threshold = DENSE_MIN_M[(op, max(known))]
    if isinstance(threshold, dict):  # per bit-width; a width without a rule (8 bits) takes the widest one's
        threshold = threshold.get(bits, threshold[max(threshold)])
    return dtype_is_half and threshold is not None and m >= threshold


def split_k(tiles: int, k_tiles: int, sms: int, config: "KernelConfig") -> int:
    """How many K ranges a launch of `tiles` output tiles splits into (each program sums one range; a
    reduction adds them in order): enough programs for ~`config.sm_warps` warps per SM, so a grid of few
    tiles (decode, or M = 5..128 on a narrow layer) still keeps every SM's loads in flight."""
    programs = config.sm_warps * sms // config.num_warps
    return max(1, min(k_tiles, -(-programs // tiles)))


def k_ranges(k: int, block_k: int, tiles: int, sms: int, config: "KernelConfig") -> tuple[int, int]:
    """(split, K per split) the launchers use: `split_k`'s count rounded so every range is a whole number of
    K tiles (the launch then has `cdiv(k, K per split)` ranges, which can be fewer than asked for)."""
    k_tiles = -(-k // block_k)
    k_per_split = -(-k_tiles // split_k(tiles, k_tiles, sms, config)) * block_k
    return -(-k // k_per_split), k_per_split


def uses_fragment_order(bits: int, block_m: int, block_k: int, group: int, dtype_is_half: bool) -> bool:
    """Whether the GEMM runs as y^T = W_hat x^T with magic-number codes in mma fragment order
    (`kernels.gemm_fwd_kernel` FRAGMENT): 2/3/4-bit codes (3-bit ones in their low plane's word order),
    fp16/bf16 activations, the mid-M tiles (block_m <= 32: sm_90a w4g128 14.0 -> 5.9 main-loop instructions per
    weight byte, PREDICTED from the SASS, docs/RESULTS.md) and sub-tiles (`fit_block_k`: inside one group,
    `group` as resolved, K for -1) of whole groups of 4 words per column."""
    plane_bits = 2 if bits == 3 else bits
    return (bits in (2, 3, 4) and dtype_is_half and block_m <= 32
            and fit_block_k(block_k, group) % (4 * 32 // plane_bits) == 0)


@functools.cache  # asked on every forward call; a pure function of its arguments
def gemm_tiling(bits: int, block_m: int, block_k: int, group: int, dtype_is_half: bool) -> tuple[int, int, bool]:
    """(K tile, sub-tile, fragment order) of the forward GEMM. The sub-tile lies inside one group
    (`fit_block_k`); a 2/4-bit fragment-order tile keeps the config's whole K tile, several sub-tiles of smaller
    groups (w2g64 in 128-wide tiles: sm_90a 14.7 -> 14.1 instructions per weight byte, PREDICTED), every other
    tile is one sub-tile (w3g64 in 128-wide tiles spilled on sm_80)."""
    sub = fit_block_k(block_k, group)
    fragment = uses_fragment_order(bits, block_m, block_k, group, dtype_is_half)
    return (block_k if fragment and bits != 3 else sub), sub, fragment


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    group_m: int = 8
    # decode and GEMM: split K until the grid holds about this many warps per SM, enough loads in flight to
    # cover DRAM latency with few partial sums to reduce (chosen with benchmarks/kernel_model.py)
    sm_warps: int = 8


# kernel -> M bucket upper bound -> candidates (first = default). None = any larger M.
# Every entry builds for sm_80 and sm_90 at 2/3/4 bits with zero register spills and within sm_80's
# shared memory (tests/test_aot_compile.py); the sweep that chose them is in the README.
CANDIDATES: dict[str, list[tuple[int | None, list[KernelConfig]]]] = {
    "gemm": [
        # 16 x 128 x 128, 3 stages: enough bytes in flight per SM (64 x 64 x 2 stages was predicted latency-bound
        # at 23-42% of the bandwidth; H100 M = 16 w4 1.17-2.10x -> 1.80-2.59x fp16 cuBLAS, docs/RESULTS.md)
        (32, [KernelConfig(16, 128, 128, 4, 3), KernelConfig(16, 64, 64, 4, 2), KernelConfig(16, 128, 64, 4, 2)]),
        (128, [KernelConfig(64, 64, 64, 4, 3), KernelConfig(64, 64, 32, 4, 2)]),
        (None, [KernelConfig(128, 128, 32, 8, 3), KernelConfig(64, 64, 64, 4, 3)]),
    ],
    # decode: block_m rows per program share each unpacked weight (M = 3 runs the 4-row build, one row
    # masked); per bucket the spill-free tile with the fewest main-loop instructions per weight byte and row
    "decode": [(1, [KernelConfig(1, 256, 64, 2, sm_warps=4), KernelConfig(1, 128, 128)]),
               (2, [KernelConfig(2, 128, 64, 2, sm_warps=4)]),
               (None, [KernelConfig(4, 128, 64, 4)])],
    "grad_input": [
        (128, [KernelConfig(32, 64, 64, 4, 2), KernelConfig(64, 64, 64, 4, 2)]),
        (None, [KernelConfig(128, 64, 64, 8, 3), KernelConfig(128, 64, 32, 8, 3)]),
    ],
    "grad_scales": [(None, [KernelConfig(32, 64, 32, 4, 3), KernelConfig(128, 64, 64, 8, 2),
                            KernelConfig(64, 128, 32, 4, 2)])],
    # the dense scale-gradient path's weighting of cuBLAS's fp32 x^T dy (`grad_scales_kernel` with DENSE_GW)
    "grad_scales_dense": [(None, [KernelConfig(1, 128, 32, 4, 2)])],
    # 128 x 64 tiles: twice the codes in flight per program of 64 x 64 (PREDICTED H100 w2g64 4096^2 dense forward
    # 0.89 -> 0.91x fp16 cuBLAS: latency efficiency 0.77 -> 1.0, docs/RESULTS.md); a tile stays inside one group
    "dequantize": [(None, [KernelConfig(1, 128, 64)])],
}

# fp32 activations (`--no-bf16`, exact fp32 products): tl.dot lowers to FMA with each thread holding whole
# K slices of its rows and columns, so the fp16 tiles above spill hundreds of bytes (aot.py builds showed
# 255 registers + 250-3800 B of spills). These stay under ~130 registers at every bit-width on sm_80/sm_90a.
EXACT_CANDIDATES: dict[str, list[tuple[int | None, list[KernelConfig]]]] = {
    "gemm": [(None, [KernelConfig(16, 32, 32, 4, 2)])],
    "grad_input": [(None, [KernelConfig(16, 32, 32, 4, 2)])],
    "grad_scales": [(None, [KernelConfig(32, 32, 32, 4, 2)])],
}

_HALF_SPLIT_GEMM = ([(32, [KernelConfig(16, 128, 128, 4, 3, sm_warps=4)] + CANDIDATES["gemm"][0][1][1:])]
                    + CANDIDATES["gemm"][1:])
# (kernel, bits) whose code differs enough to want other tiles. 3-bit decode combines two planes per code
# (kernels.decode_splitk_kernel): 256x64 tiles of 2 warps spill on sm_80, 128x128 of 4 warps do not.
BITS_CANDIDATES: dict[tuple[str, int], list[tuple[int | None, list[KernelConfig]]]] = {
    # 3/4-bit mid-M tiles in fragment order: half the K split (fewer fp32 partials to write and re-read) is
    # predicted faster on every shape (H100 M = 16: w4 1.96/2.61/3.45x -> 2.11/2.82/3.64x fp16 cuBLAS, w3
    # 2.17/3.05/4.07x -> 2.29/3.26/4.17x); at 2 bits it loses on the larger layers, so 2 bits keep the default
    ("gemm", 4): _HALF_SPLIT_GEMM,
    ("gemm", 3): _HALF_SPLIT_GEMM,
    # 2-bit rows are half the bytes of 4-bit ones: the fp16 decode's programs (two codes per instruction) ran out of
    # bytes in flight at ~4 warps per SM (latency efficiency 0.61 on 4096^2); 6 warps: H100 w2g64 M = 1 fp16
    # 2.46/4.28/5.83x -> 2.92/4.29/6.26x fp16 cuBLAS, bf16 and A100 within 1% (PREDICTED, docs/RESULTS.md)
    ("decode", 2): ([(1, [KernelConfig(1, 256, 64, 2, sm_warps=6), KernelConfig(1, 128, 128)])]
                    + CANDIDATES["decode"][1:]),
    ("decode", 3): [(1, [KernelConfig(1, 128, 128), KernelConfig(1, 64, 128)]),
                    (2, [KernelConfig(2, 128, 64, 2, sm_warps=4)]),
                    (None, [KernelConfig(4, 128, 64, 4)])],
}

_TUNED: dict[str, KernelConfig] = {}
TUNE_M = (1, 2, 4, 16, 64, 256, 2048)  # token counts `eqat tune` times: one per M bucket that runs tiles


def m_bucket(m: int) -> int:
    """Next power of two, so one tuned entry covers a range of batch sizes."""
    return 1 << max(0, (m - 1).bit_length())


_BUCKET_KEY = re.compile(r"^(\w+)\|m(\d+)\|n(\d+)\|k(\d+)\|b(\d+)\|g(-?\d+)(\|fp32)?$")


def bucket_key(kernel: str, m: int, n: int, k: int, bits: int, group: int, exact: bool = False) -> str:
    return f"{kernel}|m{m_bucket(m)}|n{m_bucket(n)}|k{m_bucket(k)}|b{bits}|g{group}" + ("|fp32" if exact else "")


def parse_bucket_key(key) -> tuple[str, int, int, bool] | None:
    """(kernel, M bucket, bits, exact) of a `bucket_key` string, None if `key` is not one."""
    match = _BUCKET_KEY.match(key) if isinstance(key, str) else None
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(5)), bool(match.group(7))


def candidates(kernel: str, m: int, exact: bool = False, bits: int | None = None) -> list[KernelConfig]:
    """`exact`: fp32 activations, whose dots run on FMA (EXACT_CANDIDATES where the kernel has a dot);
    `bits`: BITS_CANDIDATES where that bit-width has its own."""
    if exact and kernel in EXACT_CANDIDATES:
        buckets = EXACT_CANDIDATES[kernel]
    else:
        buckets = BITS_CANDIDATES.get((kernel, bits), CANDIDATES[kernel])
    for upper, configs in buckets:
        if upper is None or m <= upper:
            return configs
    raise AssertionError("the last bucket has no upper bound")


def fit_block_k(block_k: int, group: int) -> int:
    """Largest power-of-two block <= block_k that divides the group, so a tile never straddles groups."""
    while block_k > 16 and group % block_k:
        block_k //= 2
    if group % block_k:
        raise ValueError(f"group size {group} has no block size >= 16 dividing it")
    return block_k


# from this compute capability fp16 codes are read in place, under per-field exponents: the one-row decode at
# 2/4 bits multiplies two codes per instruction (`common.half_pairs_dot`; PREDICTED on H100 w2g64 13.2 -> 8.7
# instructions per weight byte, 28672x8192 4.87 -> 5.83x fp16 cuBLAS) and the fragment GEMM reads 2-bit codes and
# both 3-bit planes without shifts (`common.magic_codes`; w3g128 M = 1 3.07 -> 4.24x, w2g64 M = 16 4.50 -> 4.93x). sm_80's builds of both are worse
# (the decode's pair ANDs split into 16-bit halves and repacked: A100 w4g128 3.72 -> 3.22x; 3 bits 2.18 ->
# 2.15x), so A100 keeps the fp32 FMAs and the shifted 3-bit pairs.
IN_PLACE_FP16_MIN_CAPABILITY = 90


def fp16_in_place(capability: int, dtype_is_fp16: bool) -> bool:
    return dtype_is_fp16 and capability >= IN_PLACE_FP16_MIN_CAPABILITY


def half_pairs(in_place: bool, bits: int, block_m: int) -> bool:
    """Whether the decode multiplies two codes per instruction (`common.half_pairs_dot`): fp16 codes read in place
    (`fp16_in_place`), one row, codes that fit a view's 8 payload bits with room for a pair per half (2 and 4
    bits; 8-bit codes fill a view)."""
    return in_place and block_m == 1 and bits in (2, 4)


@functools.cache  # asked on every forward call; depends only on the curated candidates
def decode_max_m(bits: int, group: int, dtype_is_half: bool) -> int:
    """Rows up to which forward runs the split-K GEMV (`decode_splitk_kernel`), the GEMM above (0: the GEMM
    always); `group` as resolved (K for -1). Where the mid-M GEMM runs in fragment order (`uses_fragment_order`)
    it is PREDICTED faster from M = 2 on every modelled shape (H100 w4g128 M = 4: 1.5-1.8x -> 2.4-3.7x fp16
    cuBLAS), and at 3 bits from M = 1 (w3g128 M = 1: 1.9-2.6x -> 2.2-4.2x; the GEMV combines two planes per
    code, 18.7 instructions per weight byte); 2 and 4 bits keep the GEMV at M = 1, which reads codes in place
    (w2g64 M = 1: 2.5-5.1x vs the GEMM's 1.9-4.1x). Elsewhere up to `DECODE_MAX_M`."""
    gemm = candidates("gemm", 16, not dtype_is_half, bits)[0]
    if not uses_fragment_order(bits, gemm.block_m, gemm.block_k, group, dtype_is_half):
        return DECODE_MAX_M
    return 0 if bits == 3 else 1


def select_config(kernel: str, m: int, n: int, k: int, bits: int, group: int, exact: bool = False) -> KernelConfig:
    return _TUNED.get(bucket_key(kernel, m, n, k, bits, group, exact)) or candidates(kernel, m, exact, bits)[0]


def record_tuned(key: str, config: KernelConfig) -> None:
    _TUNED[key] = config


def tuned() -> dict[str, KernelConfig]:
    """The tuned winners this process knows (what `tuning.save_tuned` writes)."""
    return dict(_TUNED)


def forget_tuned() -> None:
    _TUNED.clear()
