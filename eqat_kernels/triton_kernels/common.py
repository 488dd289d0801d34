"""Device helpers shared by every kernel: read b-bit codes and zero points out of GPTQ-v2 words.

Codes are one bit stream per column (code k at bit b*k). Weights reach the kernels with 3-bit split
into a 2-bit and a 1-bit plane (exact repack at load time) so that every word unpacks with shifts;
zero points stay in the stream format, where a 3-bit zero may straddle two words.
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
def _unpack_words(qw_ptr, k0, offs_n, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr, TRANS: tl.constexpr):
    """Codes for features k0..k0+BLOCK_K of a plane whose codes never straddle words: 2/4/8 bits in int32
    words, or (BITS = 1) the 3-bit high plane's 16 codes per int16 (`packing.split_3bit_planes`).

    Each packed word is loaded once ([BLOCK_K*BITS/32, BN], no duplicate addresses) and expanded with
    shifts in registers. TRANS gives the tile as [BN, BLOCK_K] instead of [BLOCK_K, BN].
    """
    PER: tl.constexpr = 16 if BITS == 1 else 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER
    rows = k0 // PER + tl.arange(0, WORDS)
    shifts = tl.arange(0, PER) * BITS
    if TRANS:
        words = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None],
                        mask=(rows[None, :] < K // PER) & (offs_n[:, None] < N), other=0)
        if BITS == 1:
            words = words.to(tl.uint16, bitcast=True).to(tl.int32)
        q = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (offs_n.shape[0], BLOCK_K))
    else:
        words = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :],
                        mask=(rows[:, None] < K // PER) & (offs_n[None, :] < N), other=0)
        if BITS == 1:
            words = words.to(tl.uint16, bitcast=True).to(tl.int32)
        q = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q, (BLOCK_K, offs_n.shape[0]))
    return q


@triton.jit
def _split8(t):
    """The 8 columns, in order, of `t` viewed [R, 2, 2, 2] (column 4a + 2b + c at [:, a, b, c])."""
    c0, c1 = tl.split(t)
    c0b0, c0b1 = tl.split(c0)
    c1b0, c1b1 = tl.split(c1)
    f0, f4 = tl.split(c0b0)
    f2, f6 = tl.split(c0b1)
    f1, f5 = tl.split(c1b0)
    f3, f7 = tl.split(c1b1)
    return f0, f1, f2, f3, f4, f5, f6, f7


@triton.jit
def field_columns(x, BITS: tl.constexpr):
    """The 32 // BITS slices along the last axis of `x` as a tuple of tensors shaped `x.shape[:-1]` (BITS = 2,
    4 or 8): a tree of tl.split, register picks without a layout change."""
    if BITS == 8:
        c0, c1 = tl.split(tl.reshape(x, x.shape[:-1] + (2, 2)))
        f0, f2 = tl.split(c0)
        f1, f3 = tl.split(c1)
        cols = (f0, f1, f2, f3)
    elif BITS == 4:
        cols = _split8(tl.reshape(x, x.shape[:-1] + (2, 2, 2)))
    else:
        even, odd = tl.split(tl.reshape(x, x.shape[:-1] + (2, 2, 2, 2)))
        e0, e1, e2, e3, e4, e5, e6, e7 = _split8(even)
        o0, o1, o2, o3, o4, o5, o6, o7 = _split8(odd)
        cols = (e0, o0, e1, o1, e2, o2, e3, o3, e4, o4, e5, o5, e6, o6, e7, o7)
    return cols


# fp32 2^23: its mantissa step is exactly 1, so OR-ing an integer below 2^23 into its mantissa gives the float
# 2^23 + q with no conversion instruction (int -> float conversions run at an eighth of the issue rate)
MAGIC_F32 = tl.constexpr(0x4B000000)
MAGIC_F32_VALUE = tl.constexpr(8388608.0)


@triton.jit
def exact_float(q):
    """float(q) for integers 0 <= q < 2^23 (int32/uint32) without a conversion instruction: an OR under the
    exponent of 2^23, a bitcast, and an fp32 subtraction."""
    return (q | MAGIC_F32).to(tl.float32, bitcast=True) - MAGIC_F32_VALUE


# fp16 with every exponent bit set (0x7C00, both halves): AND-ing a view under it with a field's mask plus the
# exponent bits of 2^(10 - position) keeps the float 2^(10 - position) + code, whose mantissa step is exactly 1
VIEW_EXPONENTS = tl.constexpr(0x7C007C00)
VIEW_BITS = tl.constexpr(8)  # payload bits per half of a view (mask 0x00FF00FF): fits the fp16 mantissa, splits a half


@triton.jit
def half_pairs_dot(x_tile, words, k, K, BITS: tl.constexpr, EVEN: tl.constexpr):
    """(sum_k x[k] * code[k, n], sum_k x[k]) for one fp16 row, two codes per instruction: codes j and j + HALF
    of a word (one in each 16-bit half) are one fp16 pair, read in place under per-field exponents.

    Each half becomes two views of VIEW_BITS payload bits under all-ones exponents (two ANDs and a shift per
    word); a field is then one AND with one immediate (its mask plus the exponent of 2^(10 - its bit
    position), whose mantissa step is 1 at the field), which leaves the pair (2^e + code, 2^e + code')
    exactly. One paired subtraction centres it (code - 2^(BITS-1)) and one paired FMA multiplies it with the
    activation pair. A word's 16 // BITS fused multiply-adds per lane accumulate in fp16 (one rounding each;
    |sum| <= 2^(BITS-1) * 16 // BITS * max|x|, 32 max|x| at 4 bits, so activations up to 2047 cannot overflow)
    and then go to fp32, one conversion per word and lane; the centring comes back as 2^(BITS-1) * sum(x). No
    int -> float conversion, no shift per field; the fp16 partials about double the output's own rounding error
    (3-4.5e-4 against 2e-4 relative in the interpreter tests, tolerance 1e-3)."""
    WORDS: tl.constexpr = words.shape[0]
    BN: tl.constexpr = words.shape[1]
    HALF: tl.constexpr = 16 // BITS
    FIELDS: tl.constexpr = VIEW_BITS // BITS  # fields per view
    x = tl.load(x_tile + k) if EVEN else tl.load(x_tile + k, mask=k < K, other=0.0)  # [WORDS, PER] fp16
    # [WORDS, 2, HALF] -> per field j the activations of codes j and j + HALF as a trailing pair axis
    pairs = field_columns(tl.reshape(x, (WORDS, 2, HALF)), 2 * BITS)
    views = ((words & 0x00FF00FF) | VIEW_EXPONENTS, ((words >> VIEW_BITS) & 0x00FF00FF) | VIEW_EXPONENTS)
    acc = tl.zeros((WORDS, BN, 2), dtype=tl.float16)
    for v in tl.static_range(2):
        for f in tl.static_range(FIELDS):
            field = views[v] & ((((1 << BITS) - 1) << (BITS * f)) | ((25 - BITS * f) << 10)) * 0x00010001
            centred = _half_pair(field, tl.float16) - ((1 << (10 - BITS * f)) + (1 << (BITS - 1)))
            acc += centred * pairs[v * FIELDS + f][:, None, :]
    part = tl.sum(acc.to(tl.float32), axis=2)
    xsum = tl.zeros((1,), dtype=tl.float32) + tl.sum(tl.sum(x.to(tl.float32), axis=1), axis=0)
    dot = tl.sum(part, axis=0)[None, :] + (1 << (BITS - 1)) * xsum[:, None]
    return dot, xsum


@triton.jit
def plane_dot(x_tile, stride_xm, m_rows, plane_ptr, k0, offs_n, n_mask, K, N, BITS: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, HALF_PAIRS: tl.constexpr, EVEN: tl.constexpr):
    """(sum_k x[r, k] * code[k, n], sum_k x[r, k]) over k0..k0+BLOCK_K for the BLOCK_M rows at `x_tile`
    (rows from `m_rows` on are masked) of a plane whose codes never straddle words: `[BLOCK_M, BN]`, `[BLOCK_M]`.

    Field j of a word is read in place, never shifted down to bit 0. One row (decode proper): under the fp32
    magic exponent (`MAGIC_F32`) each 16-bit half of a word is the float 2^23 + half, and AND-ing one field's
    mask with the exponent bits leaves 2^23 + code * 2^(BITS*(j % HALF)), exact; a subtraction makes it the
    scaled code, so a weight costs an AND, a subtraction and an FMA and no int -> float conversion (those run
    at an eighth of the issue rate); x is scaled by 2^-(BITS*(j % HALF)) instead (exact), and every field
    accumulates into one [words, columns] partial in the words' load layout: no layout conversion of the
    weights and no cross-thread sum inside the K loop. Several rows: a field as a float is code * 2^(BITS*j)
    after one conversion, shared by the rows' FMAs; a partial sum per field, [rows, words, fields, columns],
    is rescaled after the K sum (the one-row form spills at 4 rows, and so does the magic form). HALF_PAIRS
    (one fp16 row, `configs.fp16_in_place`): two codes per instruction, `half_pairs_dot`. EVEN: the tile's words
    and features all exist (N a multiple of BN, K of BLOCK_K: every real layer), so the code loads and the
    one-row activation loads need no masks (a masked load first zeroes its registers: 16 CS2R per w4 iteration).
    """
    PER: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = PER // 2  # fields per 16 bits
    WORDS: tl.constexpr = BLOCK_K // PER
    words_at = k0 // PER + tl.arange(0, WORDS)
    if EVEN:
        words = tl.load(plane_ptr + words_at[:, None] * N + offs_n[None, :]).to(tl.uint32, bitcast=True)
    else:
        words = tl.load(plane_ptr + words_at[:, None] * N + offs_n[None, :],
                        mask=(words_at[:, None] < K // PER) & n_mask[None, :], other=0).to(tl.uint32, bitcast=True)
    fields = tl.arange(0, PER)
    k = k0 + tl.arange(0, WORDS)[:, None] * PER + fields[None, :]  # [WORDS, PER]
    if HALF_PAIRS:  # one fp16 row, two codes per instruction
        dot, xsum = half_pairs_dot(x_tile, words, k, K, BITS, EVEN)
    elif BLOCK_M == 1:
        # field j is read in place from its 16-bit half: code * 2^(BITS*(j % HALF)), below 2^16
        rescale = ((127 - (fields % HALF) * BITS) << 23).to(tl.float32, bitcast=True)  # 2^-(BITS*(j % HALF)), exact
        # (a program's first row always exists: the grid has cdiv(M, BLOCK_M) row tiles)
        x = (tl.load(x_tile + k) if EVEN else tl.load(x_tile + k, mask=k < K, other=0.0)).to(tl.float32)  # [WORDS, PER]
        xs = field_columns(x * rescale[None, :], BITS)
        part = tl.zeros((WORDS, offs_n.shape[0]), dtype=tl.float32)
        # each 16-bit half under the fp32 magic's exponent once; a field is then one AND with one immediate
        # (the field's mask and the exponent bits): two constants in one LOP3 would cost a register each
        # (k0 >> 31 is 0 at run time, but the compiler cannot know it: with a known magic it merges the OR into
        # every field's AND, a three-input LOP3 whose constant register ptxas re-creates for each field)
        magic = (tl.full((), MAGIC_F32, tl.int32) | (k0 >> 31)).to(tl.uint32, bitcast=True)
        lower = (words & 0xFFFF) | magic
        upper = (words >> 16) | magic
        for j in tl.static_range(PER):
            half = lower if j < HALF else upper
            field = half & (MAGIC_F32 | (((1 << BITS) - 1) << (BITS * (j % HALF))))
            part += xs[j][:, None] * (field.to(tl.float32, bitcast=True) - MAGIC_F32_VALUE)
        dot = tl.sum(part, axis=0)[None, :]
        xsum = tl.zeros((1,), dtype=tl.float32) + tl.sum(tl.sum(x, axis=1), axis=0)
    else:
        rescale = ((127 - fields * BITS) << 23).to(tl.float32, bitcast=True)  # 2^-(BITS*j), exact
        field_masks = ((1 << BITS) - 1) << (fields * BITS).to(tl.uint32)  # [PER] uint32
        q = (words[:, None, :] & field_masks[None, :, None]).to(tl.float32)  # code * 2^(BITS*j)
        rm = tl.arange(0, BLOCK_M)
        x = tl.load(x_tile + rm[:, None, None] * stride_xm + k[None, :, :],
                    mask=(rm[:, None, None] < m_rows) & (k[None, :, :] < K), other=0.0).to(tl.float32)
        per_field = tl.sum(x[:, :, :, None] * q[None, :, :, :], axis=1)  # [BLOCK_M, PER, BN]
        dot = tl.sum(per_field * rescale[None, :, None], axis=1)
        xsum = tl.sum(tl.sum(x, axis=2), axis=1)
    return dot, xsum


@triton.jit
def load_code_tile(qw_ptr, qh_ptr, k0, offs_n, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                   TRANS: tl.constexpr):
    """int32 codes q[k0:k0+BLOCK_K, offs_n] ([BN, BLOCK_K] if TRANS). For 3 bits `qw_ptr`/`qh_ptr` are the
    low-2-bit and high-1-bit planes of `packing.split_3bit_planes`; otherwise `qh_ptr` is unused."""
    if BITS == 3:
        low = _unpack_words(qw_ptr, k0, offs_n, K, N, 2, BLOCK_K, TRANS)
        high = _unpack_words(qh_ptr, k0, offs_n, K, N, 1, BLOCK_K, TRANS)
        q = low | (high << 2)
    else:
        q = _unpack_words(qw_ptr, k0, offs_n, K, N, BITS, BLOCK_K, TRANS)
    return q


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
def dequant_tile(qw_ptr, qh_ptr, qz_ptr, s_ptr, k0, offs_n, gi, K, N, BITS: tl.constexpr,
                 BLOCK_K: tl.constexpr, TRANS: tl.constexpr):
    """fp32 `(q - z) * s` for features k0..k0+BLOCK_K, all inside group `gi`."""
    q = load_code_tile(qw_ptr, qh_ptr, k0, offs_n, K, N, BITS, BLOCK_K, TRANS)
    z = load_zeros(qz_ptr, gi, offs_n, N, BITS)
    s = tl.load(s_ptr + gi * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    if TRANS:
        w = (q - z[:, None]).to(tl.float32) * s[:, None]
    else:
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
    return w


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`acc + a @ b` on tensor cores. UPCAST feeds fp32 operands instead: only for Triton 3.9's CPU
    interpreter, whose bf16 tl.dot returns garbage (a plain 16x16 bf16 dot is off by 1e10 there)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


# ----- codes as tensor-core A operands: magic-number conversion, K in fragment order ---------------------
# A 16-bit float whose exponent field says 2^10 (fp16 0x6400) or 2^7 (bf16 0x4300) has a mantissa step of
# exactly 1, so OR-ing a small integer q into its low mantissa bits gives the float 1024 + q (128 + q) with no
# conversion instruction; one 32-bit LOP3 does two codes, (word >> b*p) & mask | magic, into the two halves
# of a register: codes p and p + 16/b of the word. Those halves are adjacent K positions of an mma A-operand
# fragment only if K is taken in "fragment order" (weights and activations alike; a dot product does not
# care about the order of K): within each K tile, thread t = lane % 4 of an mma row holds K pairs
# (2t, 2t+1) and (2t+8, 2t+9) of every 16, and each of its words supplies exactly those.


@triton.jit
def magic_value(DT: tl.constexpr):
    """1024.0 (fp16) or 128.0 (bf16): the float whose low mantissa bits take a code as an integer."""
    if DT.is_bf16():
        return 128.0
    return 1024.0


@triton.jit
def _half_pair(m, DT: tl.constexpr):
    """The two 16-bit halves of uint32 `m` as `DT` (fp16/bf16), a trailing pair axis, bitcast in place."""
    return tl.join((m & 0xFFFF).to(tl.uint16).to(DT, bitcast=True), (m >> 16).to(tl.uint16).to(DT, bitcast=True))


@triton.jit
def _code_pair(words, high, p: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, INTERPRETED_BF16: tl.constexpr):
    """(magic + code p, magic + code p + 16/B) in `DT` for every word, as a trailing pair axis (B: the plane's
    bits, 2 for 3-bit codes): one LOP3 per pair, the halves bitcast in place (INTERPRETED_BF16: in fp32, see
    `magic_codes`). 3 bits: the high bits (`high`, pair p at bits p and p + 16) are OR-ed in at bit 2."""
    if DT.is_bf16():
        MAGIC: tl.constexpr = 0x43004300
    else:
        MAGIC: tl.constexpr = 0x64006400
    if BITS == 3:
        m = ((words >> (2 * p)) & 0x00030003) | MAGIC  # `high`: the pair's high bits at p and p + 16
        if p >= 2:
            m = m | ((high >> (p - 2)) & 0x00040004)
        else:
            m = m | ((high << (2 - p)) & 0x00040004)
    else:
        MASK: tl.constexpr = ((1 << BITS) - 1) * 0x00010001
        m = ((words >> (BITS * p)) & MASK) | MAGIC
    if INTERPRETED_BF16:
        lo = ((m & 0xFFFF) << 16).to(tl.float32, bitcast=True)  # bf16 is fp32's upper half
        hi = ((m >> 16) << 16).to(tl.float32, bitcast=True)
        return tl.join(lo, hi)
    return _half_pair(m, DT)


# 3-bit codes in place (fp16): the low plane's pair p sits at bit 2 (p % 4) + 2 of a view, its high bits at bit
# p + 2 of the high view, both under per-field exponents, so two ANDs leave 2^e + low and 2^e' + 4 high exactly;
# their sum (< 2048: exact) is `code + offset3(p)`, a constant subtracted from the low pair
@triton.jit
def offset3(p: tl.constexpr):
    """2^e + 2^e' that the in-place 3-bit pair p (0..7) carries on top of its code."""
    return (1 << (8 - 2 * (p % 4))) + (1 << (10 - p))




@triton.jit
def _low_in_place(words, p: tl.constexpr, BITS: tl.constexpr):
    """The 2-bit fields of codes p and p + 8 of 2-bit-plane words as an fp16 pair, minus the offsets their
    exponents add (at 3 bits also the high bit's, `offset3`): one AND under the view's all-ones exponents and an
    HADD2 with an immediate. Views: bits 0-7 / 8-15 of each half at bits 2-9 (in a constant: a run-time zero
    OR-ed in, as in plane_dot, stopped Triton from propagating the mma operand layout back to the loads)."""
    POS: tl.constexpr = 2 * (p % 4) + 2
    if p < 4:
        view = ((words << 2) & 0x03FC03FC) | VIEW_EXPONENTS
    else:
        view = ((words >> 6) & 0x03FC03FC) | VIEW_EXPONENTS
    pair = _half_pair(view & (((3 << POS) | ((25 - POS) << 10)) * 0x00010001), tl.float16)
    if BITS == 3:
        pair = pair - offset3(p)
    else:
        pair = pair - (1 << (10 - POS))
    return pair


@triton.jit
def _high_in_place(high_view, p: tl.constexpr):
    """2^e' + 4 x high bit of codes p and p + 8 (fp16 pair): one AND."""
    return _half_pair(high_view & (((1 << (p + 2)) | ((25 - p) << 10)) * 0x00010001), tl.float16)


@triton.jit
def _pairs_tile(q0, q1, q2, q3, q4, q5, q6, q7, BLOCK_K: tl.constexpr):
    """[BN, BLOCK_K] in fragment order from the eight [BN, W, 2] pairs of 2-bit-plane words (pair p: codes
    p and p + 8)."""
    BN: tl.constexpr = q0.shape[0]
    WORDS: tl.constexpr = q0.shape[1]
    v = tl.join(tl.join(tl.join(q0, q1), tl.join(q2, q3)), tl.join(tl.join(q4, q5), tl.join(q6, q7)))
    v = tl.reshape(v, (BN, 4, WORDS // 4, 2, 2, 2, 2))
    v = tl.permute(v, (0, 2, 6, 5, 4, 1, 3))  # [BN, u, p2, p1, p0, t, h]
    return tl.reshape(v, (BN, BLOCK_K))


@triton.jit
def magic_codes(qw_ptr, qh_ptr, z, k0, offs_n, K, N, BITS: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr,
                INTERPRETED_BF16: tl.constexpr, EVEN_K: tl.constexpr, FP16_IN_PLACE: tl.constexpr):
    """[BN, BLOCK_K] `code - z` (zero points `z`, int32 [BN]) in `DT`, exact, for features k0..k0+BLOCK_K of 2-, 3-
    or 4-bit codes, K in fragment order (`fragment_order`; 3-bit codes in the 2-bit plane's). BLOCK_K must hold a
    multiple of 4 words per column (of the low plane at 3 bits). INTERPRETED_BF16: Triton 3.9's CPU interpreter
    bitcasts uint16 to bf16 wrongly (denormals) and computes bf16 arithmetic wrongly, so there the same values
    come back in fp32 (exact: small integers). 3 bits: each low-plane word's 16 high bits are the int16 at the
    same index of the high plane. FP16_IN_PLACE (fp16 only) reads 2-bit codes and both 3-bit planes in place,
    views under per-field exponents as in `half_pairs_dot`; otherwise each pair is shifted down and, at 3 bits,
    the high bits, spread once per word so that pair p's sit at bits p and p + 16, are shifted to bit 2 and OR-ed
    into the low pair. EVEN_K: every word of the tile exists."""
    PB: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // PB
    WORDS: tl.constexpr = BLOCK_K // PER
    BN: tl.constexpr = offs_n.shape[0]
    rows = k0 // PER + tl.arange(0, WORDS)
    if EVEN_K:
        mask = offs_n[:, None] < N
    else:
        mask = (rows[None, :] < K // PER) & (offs_n[:, None] < N)
    words = tl.load(qw_ptr + rows[None, :] * N + offs_n[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
    IN_PLACE: tl.constexpr = FP16_IN_PLACE and (BITS == 2 or BITS == 3) and DT == tl.float16
    if BITS == 3:
        high = tl.load(qh_ptr + rows[None, :] * N + offs_n[:, None], mask=mask, other=0)
        high = high.to(tl.uint16, bitcast=True).to(tl.uint32)
        if IN_PLACE:  # the high bit of pair p at bit p + 2 of each half, all-ones exponents
            high = (((high << 2) | (high << 10)) & 0x03FC03FC) | VIEW_EXPONENTS
        else:
            high = high | (high << 8)  # code p + 8h's high bit: bit p + 8h -> also p + 16h (bits 8-15: never read)
    else:
        high = words
    if IN_PLACE:
        # low pairs minus their offsets (constants per pair: a tile of them made before the loop broke the layout
        # propagation to the mma operand), plus the high tile at 3 bits: exact codes (integers below 2048)
        v = _pairs_tile(_low_in_place(words, 0, BITS), _low_in_place(words, 1, BITS), _low_in_place(words, 2, BITS),
                        _low_in_place(words, 3, BITS), _low_in_place(words, 4, BITS), _low_in_place(words, 5, BITS),
                        _low_in_place(words, 6, BITS), _low_in_place(words, 7, BITS), BLOCK_K)
        if BITS == 3:
            v += _pairs_tile(_high_in_place(high, 0), _high_in_place(high, 1), _high_in_place(high, 2),
                             _high_in_place(high, 3), _high_in_place(high, 4), _high_in_place(high, 5),
                             _high_in_place(high, 6), _high_in_place(high, 7), BLOCK_K)
        magic = 0.0
    elif PB == 4:
        # pairs p = 0..3 joined along new trailing axes, lowest bit of p innermost: [BN, W, h, p0, p1]
        v = tl.join(tl.join(_code_pair(words, high, 0, BITS, DT, INTERPRETED_BF16),
                            _code_pair(words, high, 1, BITS, DT, INTERPRETED_BF16)),
                    tl.join(_code_pair(words, high, 2, BITS, DT, INTERPRETED_BF16),
                            _code_pair(words, high, 3, BITS, DT, INTERPRETED_BF16)))  # code p + 4h, p = p0 + 2 p1
        v = tl.reshape(v, (BN, 4, WORDS // 4, 2, 2, 2))  # word = t * W/4 + u
        v = tl.permute(v, (0, 2, 5, 4, 1, 3))  # [BN, u, p1, p0, t, h]
        v = tl.reshape(v, (BN, BLOCK_K))
        magic = magic_value(DT)
    else:
        v = _pairs_tile(_code_pair(words, high, 0, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 1, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 2, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 3, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 4, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 5, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 6, BITS, DT, INTERPRETED_BF16),
                        _code_pair(words, high, 7, BITS, DT, INTERPRETED_BF16), BLOCK_K)
        magic = magic_value(DT)
    if INTERPRETED_BF16:
        return v - (z.to(tl.float32) + magic)[:, None]
    # broadcast, then add: (z + magic)[:, None] made the compiler swap every pair's halves twice
    return v - (z.to(DT)[:, None] + tl.full((1, 1), magic, DT))


@triton.jit
def fragment_order(xt, BITS: tl.constexpr):
    """The rows (K) of an activation tile [BLOCK_K, BM] in the order `magic_codes` gives the codes: code
    index within a tile k = PER * (t * W/4 + u) + p + (PER/2) h, fragment position ((u, p, t), h)."""
    BK: tl.constexpr = xt.shape[0]
    BM: tl.constexpr = xt.shape[1]
    PER: tl.constexpr = 32 // (2 if BITS == 3 else BITS)  # 3-bit codes come in the 2-bit plane's order
    WORDS: tl.constexpr = BK // PER
    if PER == 8:
        v = tl.reshape(xt, (4, WORDS // 4, 2, 2, 2, BM))  # t, u, h, p1, p0
        v = tl.permute(v, (1, 3, 4, 0, 2, 5))  # u, p1, p0, t, h
    else:
        v = tl.reshape(xt, (4, WORDS // 4, 2, 2, 2, 2, BM))  # t, u, h, p2, p1, p0
        v = tl.permute(v, (1, 3, 4, 5, 0, 2, 6))  # u, p2, p1, p0, t, h
    return tl.reshape(v, (BK, BM))
