"""The Triton kernels: forward GEMM and decode GEMV (split-K with an in-launch deterministic reduction),
input gradient, scale gradient, dequantize. Launch logic and configs live elsewhere.

Every tile along K lies inside one quantization group (BLOCK_K divides the group size), so each
tile reads its scales and zero points once; the partial last group is masked, never assumed away.
"""
import triton
import triton.language as tl

from .common import (dequant_tile, exact_float, fragment_order, load_code_tile, load_zeros, magic_codes, mma,
                     plane_dot)


@triton.jit
def finish_split(acc, first_row, rm, m_rows, offs_n, n_mask, ticket, M, N, b_ptr, y_ptr, stride_ym, ws_ptr,
                 tickets_ptr, HAS_BIAS: tl.constexpr):
    """Write the [BLOCK_M, BLOCK_N] output tile whose rows start at `first_row` (rows from `m_rows` on
    masked), `acc` being this program's sum over its K range (grid axis 1 = the K ranges).

    One range: y = acc (+ bias) directly. Several: every program writes its fp32 partial to ws[range, m, n]
    and takes a ticket for its tile; the one that draws the last adds the partials in range order (the same
    order whichever program finishes last: deterministic), writes y and resets the ticket to 0 for the next
    launch, so a split costs no second launch and no memset.
    """
    out_mask = (rm[:, None] < m_rows) & n_mask[None, :]
    splits = tl.num_programs(1)
    last = splits == 1
    if not last:
        plane = tl.cast(M, tl.int64) * N  # ws[range] as int64 (M may be the constant 1)
        tile = ws_ptr + (first_row + rm[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(tile + tl.program_id(1) * plane, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket releases them (acq_rel)
        last = tl.atomic_add(tickets_ptr + ticket, 1, sem="acq_rel") == splits - 1
        if last:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for _ in range(splits):  # in range order; .cg: from L2, where the other programs' partials are
                acc += tl.load(tile, mask=out_mask, other=0.0, cache_modifier=".cg")
                tile += plane
            tl.atomic_xchg(tickets_ptr + ticket, 0, sem="relaxed")  # the launch boundary orders it
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_tile = y_ptr + first_row.to(tl.int64) * stride_ym
        tl.store(y_tile + rm[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def gemm_fwd_kernel(
    x_ptr, qw_ptr, qh_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr, M, N, K, stride_xm, stride_ym,
    K_PER_SPLIT, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FRAGMENT: tl.constexpr, SUB_K: tl.constexpr, EVEN_K: tl.constexpr, IN_PLACE: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W_hat^T (+ bias), tiled tl.dot with W dequantized in registers.

    Program (tile, s) sums K range s; several ranges (few tiles: M = 5..128 on narrow layers) are added in
    order by the tile's last program (`finish_split`), in the same launch. FRAGMENT (2/3/4-bit codes, fp16/bf16,
    `configs.uses_fragment_order`): the transposed product y^T = W_hat x^T, so the weight tile is the mma's
    A operand and stays in registers (on sm_90 wgmma takes A from registers, B from shared memory); its codes
    become floats by the magic number (`common.magic_codes`), K in fragment order on both sides, and the
    scale multiplies each tile's fp32 product (one FMA per output, not one multiply per weight). A FRAGMENT K
    tile may hold several groups: it runs as BLOCK_K / SUB_K sub-tiles of one group each (`configs.gemm_tiling`),
    so a small group (w2g64) does not pay a whole iteration's fixed costs per 64 features. EVEN_K (K a multiple
    of BLOCK_K, as in every real layer): no feature masks in the loop (at w2g64 M = 16 they were a tenth of it).
    IN_PLACE (fp16, `configs.fp16_in_place`): 2-bit codes and both 3-bit planes read without shifts.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n  # grouped ordering keeps weight tiles hot in L2
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    rm = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # the tile's first row as one int64 scalar (M x K and M x N can pass 2^31), rows inside it in int32
    x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    k_start = pid_k * K_PER_SPLIT
    if FRAGMENT:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        offs_s = tl.arange(0, SUB_K)
        for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
            for j in tl.static_range(BLOCK_K // SUB_K):
                ks = k0 + j * SUB_K
                k = ks + offs_s
                if EVEN_K:
                    xt = tl.load(x_tile + rm[None, :] * stride_xm + k[:, None], mask=offs_m[None, :] < M, other=0.0)
                    gi = ks // GROUP
                else:
                    xt = tl.load(x_tile + rm[None, :] * stride_xm + k[:, None],
                                 mask=(offs_m[None, :] < M) & (k[:, None] < K), other=0.0)
                    # a sub-tile past K (the last tile of several groups) reads the last group's scale and zero
                    # point: in bounds, and its activations are masked to 0
                    gi = tl.minimum(ks, K - 1) // GROUP
                xt = fragment_order(xt, BITS)
                z = load_zeros(qz_ptr, gi, offs_n, N, BITS)
                # q - z, exact in fp16/bf16 (fp32 under the interpreter's bf16); masked words read as code 0, their
                # activations are masked to 0
                w = magic_codes(qw_ptr, qh_ptr, z, ks, offs_n, K, N, BITS, SUB_K, xt.dtype, UPCAST, EVEN_K, IN_PLACE)
                s = tl.load(s_ptr + gi * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
                part = mma(w, xt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_PRECISION, UPCAST)
                acc_t += s[:, None] * part
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_tile + rm[:, None] * stride_xm + k[None, :],
                        mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
            w = dequant_tile(qw_ptr, qh_ptr, qz_ptr, s_ptr, k0, offs_n, k0 // GROUP, K, N, BITS, BLOCK_K, False)
            acc = mma(x, w.to(x.dtype), acc, DOT_PRECISION, UPCAST)
    finish_split(acc, pid_m * BLOCK_M, rm, M - pid_m * BLOCK_M, offs_n, offs_n < N, pid, M, N, b_ptr, y_ptr,
                 stride_ym, ws_ptr, tickets_ptr, HAS_BIAS)


@triton.jit
def decode_splitk_kernel(
    x_ptr, qw_ptr, qh_ptr, qz_ptr, s_ptr, b_ptr, y_ptr, ws_ptr, tickets_ptr, M, N, K, stride_xm, stride_ym,
    K_PER_SPLIT, GROUP: tl.constexpr, BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF_PAIRS: tl.constexpr, EVEN: tl.constexpr,
):
    """y = x @ W_hat^T (+ bias) for decode-sized M in one launch: program (n tile, K range, row tile) sums one
    K range; several ranges are added in order by the tile's last program (`finish_split`).

    A program serves BLOCK_M rows, so a weight is loaded and unpacked once for all of them (M = 2..4 would
    otherwise read the whole weight once per row). At 2 and 4 bits the codes are read in place (`plane_dot`:
    an AND and a subtraction per weight, an FMA per row; HALF_PAIRS, one fp16 row: the same per pair of codes,
    `configs.fp16_in_place`); 3-bit codes are combined from their two planes first. EVEN: N a multiple of
    BLOCK_N and K of BLOCK_K, no masks on the loop's code and one-row activation loads.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rm = tl.arange(0, BLOCK_M)
    x_tile = x_ptr + first * stride_xm
    m_rows = M - first
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        gi = k0 // GROUP
        if BITS == 3:
            # two planes would cost two conversions per weight in plane_dot; one combined code costs one
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_tile + rm[:, None] * stride_xm + k[None, :],
                        mask=(rm[:, None] < m_rows) & (k[None, :] < K), other=0.0).to(tl.float32)
            q = exact_float(load_code_tile(qw_ptr, qh_ptr, k0, offs_n, K, N, BITS, BLOCK_K, False))
            dot = tl.sum(x[:, :, None] * q[None, :, :], axis=1)
            xsum = tl.sum(x, axis=1)
        else:
            dot, xsum = plane_dot(x_tile, stride_xm, m_rows, qw_ptr, k0, offs_n, n_mask, K, N, BITS, BLOCK_K,
                                  BLOCK_M, HALF_PAIRS, EVEN)
        z = load_zeros(qz_ptr, gi, offs_n, N, BITS).to(tl.float32)
        s = tl.load(s_ptr + gi * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        # sum_k x_k (q - z) s = s * (sum_k x_k q_k - z * sum_k x_k): one multiply per group, not per weight
        acc += s[None, :] * (dot - z[None, :] * xsum[:, None])
    finish_split(acc, first, rm, m_rows, offs_n, n_mask, tl.program_id(2) * tl.num_programs(0) + pid_n, M, N,
                 b_ptr, y_ptr, stride_ym, ws_ptr, tickets_ptr, HAS_BIAS)


@triton.jit
def grad_input_kernel(
    dy_ptr, qw_ptr, qh_ptr, qz_ptr, s_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm,
    GROUP: tl.constexpr, BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[M, K] = dy[M, N] @ W_hat[N, K], reading the packed weights transposed."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rm
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    gi = (pid_k * BLOCK_K) // GROUP
    dy_tile = dy_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_dym  # int64 tile base, int32 inside
    dx_tile = dx_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_dxm
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + offs_n
        dy = tl.load(dy_tile + rm[:, None] * stride_dym + n[None, :],
                     mask=(offs_m[:, None] < M) & (n[None, :] < N), other=0.0)
        w = dequant_tile(qw_ptr, qh_ptr, qz_ptr, s_ptr, pid_k * BLOCK_K, n, gi, K, N, BITS, BLOCK_K, True)
        acc = mma(dy, w.to(dy.dtype), acc, DOT_PRECISION, UPCAST)
    tl.store(dx_tile + rm[:, None] * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def grad_scales_kernel(
    x_ptr, dy_ptr, gw_ptr, qw_ptr, qh_ptr, qz_ptr, s_ptr, ds_ptr, dz_ptr, M, N, K, stride_xm, stride_dym, FIRST_GROUP,
    GROUP: tl.constexpr, BITS: tl.constexpr, COMPUTE_DZ: tl.constexpr, DENSE_GW: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """ds[g, n] = sum_{k in g} (q - z)[k, n] * (x^T dy)[k, n], one program per (group, N tile).

    Fused (DENSE_GW off): the K x N weight gradient exists only tile by tile in registers, each program
    summing x^T dy over all M. DENSE_GW: `gw_ptr` holds x^T dy in fp32 for the rows of groups FIRST_GROUP..
    (one chunk, computed by cuBLAS) and the program only weights and sums it. Each program owns its output
    elements, so the result is deterministic (no atomics).
    """
    pid_n = tl.program_id(0)
    gi = FIRST_GROUP + tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    z = load_zeros(qz_ptr, gi, offs_n, N, BITS)
    ds = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kk in range(0, GROUP, BLOCK_K):
        k = gi * GROUP + kk + offs_k
        if DENSE_GW:
            # the chunk's rows start at FIRST_GROUP's first row; its base as int64 (a chunk may pass 2^31 elements)
            row = (tl.program_id(1) * GROUP + kk).to(tl.int64) * N
            gw = tl.load(gw_ptr + row + offs_k[:, None] * N + offs_n[None, :],
                         mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        else:
            gw = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            # scalar tile bases advance as 64-bit pointers (M x K, M x N may pass 2^31); offsets inside a tile
            # stay int32 and loop-invariant
            x_off = offs_m[None, :] * stride_xm + k[:, None]
            dy_off = offs_m[:, None] * stride_dym + offs_n[None, :]
            x_base = x_ptr
            dy_base = dy_ptr
            for m0 in range(0, M, BLOCK_M):
                m = m0 + offs_m
                xt = tl.load(x_base + x_off, mask=(m[None, :] < M) & (k[:, None] < K), other=0.0)
                dy = tl.load(dy_base + dy_off, mask=(m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
                gw = mma(xt, dy, gw, DOT_PRECISION, UPCAST)
                x_base += BLOCK_M * stride_xm
                dy_base += BLOCK_M * stride_dym
        q = load_code_tile(qw_ptr, qh_ptr, gi * GROUP + kk, offs_n, K, N, BITS, BLOCK_K, False)
        ds += tl.sum((q - z[None, :]).to(tl.float32) * gw, axis=0)
        if COMPUTE_DZ:
            dz += tl.sum(gw, axis=0)
    tl.store(ds_ptr + gi * N + offs_n, ds, mask=offs_n < N)
    if COMPUTE_DZ:
        s = tl.load(s_ptr + gi * N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(dz_ptr + gi * N + offs_n, -s * dz, mask=offs_n < N)


@triton.jit
def dequantize_kernel(
    qw_ptr, qh_ptr, qz_ptr, s_ptr, w_ptr, N, K,
    GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Dense W_hat[N, K] in the output dtype."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    gi = (pid_k * BLOCK_K) // GROUP
    w = dequant_tile(qw_ptr, qh_ptr, qz_ptr, s_ptr, pid_k * BLOCK_K, offs_n, gi, K, N, BITS, BLOCK_K, True)
    w_tile = w_ptr + (pid_n * BLOCK_N).to(tl.int64) * K  # N x K can pass 2^31 (a 262k-token head x 8192)
    tl.store(w_tile + tl.arange(0, BLOCK_N)[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
