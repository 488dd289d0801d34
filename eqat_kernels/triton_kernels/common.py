"""Device helpers shared by every kernel: read b-bit codes and zero points out of GPTQ-v2 words.

Codes are one bit stream per column (code k at bit b*k). For 3 bits a code may straddle two words,
so the helper reads the next word only for those (masked load) and shifts without ever shifting by 32.
"""
import triton
import triton.language as tl


@triton.jit
def unpack_bits(lo, hi, shift, BITS: tl.constexpr):
    """Code at bit `shift` of the 64-bit pair (hi:lo); `hi` is read only when BITS == 3."""
    v = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if BITS == 3:
        # (hi << 1) << (31 - shift) == hi << (32 - shift) without the undefined shift by 32
        v = v | ((hi.to(tl.uint32, bitcast=True) << 1) << (31 - shift).to(tl.uint32))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def load_codes(qw_ptr, k, n, K, N, BITS: tl.constexpr):
    """Codes q[k, n] from qweight `[K*b/32, N]`; `k` and `n` broadcast to the tile shape (either orientation)."""
    mask = (k < K) & (n < N)
    bitpos = k * BITS
    shift = bitpos % 32
    ptrs = qw_ptr + (bitpos // 32) * N + n
    lo = tl.load(ptrs, mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(ptrs + N, mask=mask & (shift > 29), other=0)
    else:
        hi = lo
    return unpack_bits(lo, hi, shift, BITS)


@triton.jit
def load_zeros(qz_ptr, gi, n, N, BITS: tl.constexpr):
    """Zero points z[gi, n] from qzeros `[G, N*b/32]` (packed along N)."""
    mask = n < N
    bitpos = n * BITS
    shift = bitpos % 32
    ptrs = qz_ptr + gi * (N * BITS // 32) + bitpos // 32
    lo = tl.load(ptrs, mask=mask, other=0)
    if BITS == 3:
        hi = tl.load(ptrs + 1, mask=mask & (shift > 29), other=0)
    else:
        hi = lo
    return unpack_bits(lo, hi, shift, BITS)


@triton.jit
def dequant_tile(qw_ptr, qz_ptr, s_ptr, k, n, gi, K, N, BITS: tl.constexpr):
    """fp32 `(q - z) * s` for a tile whose features all lie in group `gi`; `n` must be the 1-D column index
    broadcast as either `[1, BN]` (tile [BK, BN]) or `[BN, 1]` (tile [BN, BK])."""
    q = load_codes(qw_ptr, k, n, K, N, BITS)
    z = load_zeros(qz_ptr, gi, n, N, BITS)
    s = tl.load(s_ptr + gi * N + n, mask=n < N, other=0.0).to(tl.float32)
    return (q - z).to(tl.float32) * s


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`acc + a @ b` on tensor cores. UPCAST feeds fp32 operands instead: only for Triton 3.9's CPU
    interpreter, whose bf16 tl.dot returns garbage (a plain 16x16 bf16 dot is off by 1e10 there)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
