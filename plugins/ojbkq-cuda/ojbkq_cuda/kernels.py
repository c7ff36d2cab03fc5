"""Triton kernels: one lazy-update block of the column walk, and one block of the beam.

A program owns `BLOCK_M` rows (candidate paths × weight rows, flattened) and keeps their block of targets
`T[r, i1:i1+bs]` in registers while it walks the block's columns one after the other:

    t = T[:, j] (+ G[:, j] · U_jj)      c = choose(t)      e = (t − s (c − z)) / U_jj
    score += e²      T[:, j+1:] −= (e − G[:, j]) · U[j, j+1:]      Err[:, j] = e − G[:, j]

The columns after the block are updated by the caller with one matrix product `Err @ U[block, rest]`.
Klein's Gumbel noise depends only on (seed, path, row, column, slot), not on the targets: `gumbel_kernel`
draws a block's noise beforehand, one element per thread, and the walk reads it (instead of every thread
holding a piece of a row recomputing the same hashes and logarithms).
Products that eager torch rounds on their own are rounded on their own here (`_mul`, no fused
multiply-add) and divisions are IEEE (`div_rn`), so that a path takes the same decisions as the
reference walk up to the summation order of the block products.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# the counter-based hash of ojbkq_core.rng, in uint32 arithmetic (products wrap modulo 2^32)
_C1 = tl.constexpr(0x7FEB352D)
_C2 = tl.constexpr(0x2C1B3C6D)
_C3 = tl.constexpr(0x297A2D39)
_COLUMN = tl.constexpr(0x2545F491)
_SLOT = tl.constexpr(0x0B5AD4EC)
_RINT = tl.constexpr(12582912.0)     # 1.5 · 2^23: (x + _RINT) − _RINT rounds |x| < 2^22 half to even


def _helper(fn):
    """A device function called by the kernels: a Triton function when compiled, plain Python under the
    interpreter (where each call of a Triton function costs milliseconds)."""
    return fn if triton.knobs.runtime.interpret else triton.jit(fn)


@_helper
def _mix(x):
    x = x ^ (x >> 16)
    x = x * _C1
    x = x ^ (x >> 15)
    x = x * _C2
    x = x ^ (x >> 16)
    x = x * _C3
    return x ^ (x >> 15)


@_helper
def _mul(a, b, EXACT: tl.constexpr):
    """`a · b` rounded to float32 on its own (no contraction with a following add)."""
    if EXACT:
        return libdevice.mul_rn(a, b)
    else:
        return a * b


@_helper
def _log(x, EXACT: tl.constexpr):
    if EXACT:
        return libdevice.log(x)
    else:
        return tl.log(x)


@_helper
def _rint(x):
    """Round half to even, as torch.round."""
    x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)
    return (x + _RINT) - _RINT


@_helper
def _nearest(t, s, z, lo, hi, values_ptr, K: tl.constexpr, TIE: tl.constexpr):
    """`ojbkq_core.grid.Alphabet.nearest`: on the integers (`K = 0`) `clamp(rint(t / s) + z)`; on an alphabet
    of `K` sorted values the code of the value nearest `t / s + z`, ties to codes of parity `TIE`."""
    # one return after a compile-time branch: Triton compiles the statements after a return inside `if K == 0`
    if K == 0:
        c = _rint(tl.math.div_rn(t, s)) + z
    else:
        x = tl.math.div_rn(t, s) + z
        i = tl.zeros(x.shape, tl.int32)
        for k in tl.static_range(K):                   # searchsorted: values[i-1] < x <= values[i]
            i += (tl.load(values_ptr + k) < x).to(tl.int32)
        i = tl.minimum(tl.maximum(i, 1), K - 1)
        below = x - tl.load(values_ptr + (i - 1))
        above = tl.load(values_ptr + i) - x
        tie = tl.where(i % 2 == TIE, i, i - 1)
        c = tl.where(above < below, i, tl.where(above > below, i - 1, tie)).to(tl.float32)
    return tl.minimum(tl.maximum(c, lo), hi)


@_helper
def _value(c, values_ptr, K: tl.constexpr):
    """`a(c)`: the code itself on the integers, else the alphabet's value (a code outside the table reads
    its nearest end, as the reference; callers mask it)."""
    if K == 0:
        v = c
    else:
        v = tl.load(values_ptr + tl.minimum(tl.maximum(c.to(tl.int32), 0), K - 1))
    return v


@_helper
def _column(U_ptr, stride_u, lo_ptr, hi_ptr, i1, j, jj, cols, cmask):
    """What a walk at column `j` (the block's `jj`-th) reads: `U[j, block]` right of the diagonal
    (zeros elsewhere), `U_jj` and the code box `[lo_j, hi_j]`."""
    u_row = tl.load(U_ptr + j * stride_u + i1 + cols, mask=cmask & (cols > jj), other=0.0)
    d = tl.load(U_ptr + j * stride_u + j)
    lo = tl.load(lo_ptr + j)
    hi = tl.load(hi_ptr + j)
    return u_row, d, lo, hi


@_helper
def _grid(S_ptr, Z_ptr, offset, mask):
    """The grid's scale `s` and zero `z` at `offset` (1 and 0 where masked off)."""
    s = tl.load(S_ptr + offset, mask=mask, other=1.0)
    z = tl.load(Z_ptr + offset, mask=mask, other=0.0)
    return s, z


@_helper
def _residual(t, s, c, z, d, values_ptr, K: tl.constexpr, EXACT: tl.constexpr):
    """`(t − s (a(c) − z)) / U_jj`: the scaled error of code `c` for target `t`."""
    return tl.math.div_rn(t - _mul(s, _value(c, values_ptr, K) - z, EXACT), d)


@triton.jit
def gumbel_kernel(
    hash_ptr,                        # (R,) per-path-row hash state (ojbkq_core.rng.path_row_state)
    out_ptr,                         # ((R − m)·bs·SLOTS,) float32: noise of row r ≥ m, column i1 + jj, slot o
    R, m, i1, bs, slot0,
    SLOTS: tl.constexpr, BLOCK: tl.constexpr, EXACT: tl.constexpr,
):
    """`−log(−log(u))` for the sampled rows (`r ≥ m`) of one block: `u` is `ojbkq_core.rng.uniform` of
    (seed, path, row, column, slot `slot0 + o`), at `((r − m)·bs + jj)·SLOTS + o`. A block whose draws
    reach fewer codes than the decoder's window draws only the middle `SLOTS` of its slots (`slot0 > 0`)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < (R - m) * bs
    r = m + idx // bs
    jj = (idx % bs).to(tl.int32)
    h = tl.load(hash_ptr + r, mask=mask, other=0).to(tl.uint32)
    hc = _mix(h + ((i1 + jj).to(tl.uint32) * _COLUMN))
    for o in tl.static_range(SLOTS):
        x = _mix(hc + (slot0 + o).to(tl.uint32) * _SLOT)
        un = tl.minimum(((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08, 0.99999994039535522)  # < 1
        tl.store(out_ptr + idx * SLOTS + o, -_log(-_log(un, EXACT), EXACT), mask=mask)


@triton.jit
def walk_block_kernel(
    T_ptr, stride_t,                 # (R, n) float32 targets; the block's columns are read
    U_ptr, stride_u,                 # (n, n) float32 upper factor of H⁻¹ (of a stack: (E, n, n), below)
    lo_ptr, hi_ptr,                  # (n,) code bounds
    S_ptr, Z_ptr, stride_sr, stride_sc, srow_mod,   # grid: S[(r % srow_mod) * stride_sr + j * stride_sc]
    G_ptr, stride_g,                 # (m, n) injection of successive rounding (HAS_INJECT)
    beta_ptr, noise_ptr,             # klein: (m,) inverse temperature, the block's noise (gumbel_kernel)
    codes_ptr, stride_c,             # (R, n) codes out
    err_ptr, stride_e,               # (R, BS) feedback errors of the block out
    score_ptr,                       # (R,) path objective, accumulated in place
    R, m, i1, bs: tl.constexpr,
    BLOCK_M: tl.constexpr, BS: tl.constexpr,
    HAS_INJECT: tl.constexpr, SAMPLE: tl.constexpr, WINDOW: tl.constexpr, EXACT: tl.constexpr,
    values_ptr=None, K: tl.constexpr = 0, TIE: tl.constexpr = 0,     # the grid's alphabet (K = 0: the integers)
    stride_ue=0, per=1,              # a stack of problems: rows of problem e (per rows each) use U_ptr + e·stride_ue
):
    pid = tl.program_id(0)
    # a program's rows lie in one problem (BLOCK_M divides per and m)
    U_ptr = U_ptr + ((pid * BLOCK_M) % m // per).to(tl.int64) * stride_ue
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BS)
    rmask = rows < R
    cmask = cols < bs
    mask2 = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    tile = tl.load(T_ptr + rows64[:, None] * stride_t + (i1 + cols)[None, :], mask=mask2, other=0.0)
    code_tile = tl.zeros([BLOCK_M, BS], dtype=tl.float32)
    err_tile = tl.zeros([BLOCK_M, BS], dtype=tl.float32)
    score = tl.load(score_ptr + rows, mask=rmask, other=0.0)
    srow = (rows % srow_mod).to(tl.int64)
    wrow = rows % m
    if SAMPLE:
        beta = tl.load(beta_ptr + wrow, mask=rmask, other=1.0)
        sampled = rows >= m                       # path 0 (the first m rows) is the Babai path
        noise_row = (rows64 - m) * bs * (2 * WINDOW + 1)
    for jj in range(0, bs):
        j = i1 + jj
        u_row, d, lo, hi = _column(U_ptr, stride_u, lo_ptr, hi_ptr, i1, j, jj, cols, cmask)
        s, z = _grid(S_ptr, Z_ptr, srow * stride_sr + j * stride_sc, rmask)
        t = tl.sum(tl.where(cols[None, :] == jj, tile, 0.0), axis=1)
        if HAS_INJECT:
            g = tl.load(G_ptr + wrow.to(tl.int64) * stride_g + j, mask=rmask, other=0.0)
            t = t + _mul(g, d, EXACT)
        c = _nearest(t, s, z, lo, hi, values_ptr, K, TIE)
        if SAMPLE:
            # Gumbel-max over the codes within WINDOW steps of the nearest one
            best_v = tl.full([BLOCK_M], float("-inf"), tl.float32)
            best_c = c
            for o in tl.static_range(2 * WINDOW + 1):
                cc = c + (o - WINDOW)
                dist = _residual(t, s, cc, z, d, values_ptr, K, EXACT)
                logit = _mul(_mul(-beta, dist, EXACT), dist, EXACT)
                logit = tl.where((cc < lo) | (cc > hi), float("-inf"), logit)
                gum = tl.load(noise_ptr + noise_row + jj * (2 * WINDOW + 1) + o, mask=rmask & sampled, other=0.0)
                v = logit + gum
                take = v > best_v
                best_c = tl.where(take, cc, best_c)
                best_v = tl.where(take, v, best_v)
            c = tl.where(sampled, best_c, c)
        e = _residual(t, s, c, z, d, values_ptr, K, EXACT)
        score = score + _mul(e, e, EXACT)
        fb = e
        if HAS_INJECT:
            fb = e - g
        tile = tile - _mul(fb[:, None], u_row[None, :], EXACT)
        if SAMPLE:
            # collected in the tile and written once per block (measured faster when sampling, H200)
            at = cols[None, :] == jj
            code_tile = tl.where(at, c[:, None], code_tile)
            err_tile = tl.where(at, fb[:, None], err_tile)
        else:
            # written as decided: no tile-wide select per column (babai's decode 0.100 → 0.046 s, 4096×14336)
            tl.store(codes_ptr + rows64 * stride_c + j, c.to(codes_ptr.dtype.element_ty), mask=rmask)
            tl.store(err_ptr + rows64 * stride_e + jj, fb, mask=rmask)
    if SAMPLE:
        tl.store(codes_ptr + rows64[:, None] * stride_c + (i1 + cols)[None, :],
                 code_tile.to(codes_ptr.dtype.element_ty), mask=mask2)
        tl.store(err_ptr + rows64[:, None] * stride_e + cols[None, :], err_tile, mask=mask2)
    tl.store(score_ptr + rows, score, mask=rmask)


@_helper
def _key(value, low):
    """Sortable int64 key of a non-negative float32 `value` (its bits) and a small integer `low`."""
    return (value.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low.to(tl.int64)


@_helper
def _key_value(key):
    return (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@_helper
def _key_low(key):
    return (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def beam_block_kernel(
    T_ptr, stride_t,                 # (B·R, n) float32 targets, beam-major: row b·R + r
    U_ptr, stride_u, lo_ptr, hi_ptr,
    S_ptr, Z_ptr, stride_sb, stride_sr,   # dynamic: (B·R,) at S[b·stride_sb + r]; static: (R, n) at S[r·stride_sr + j]
    score_ptr,                       # (B·R,) accumulated Σ e², in place
    codes_ptr, stride_c,             # (B·R, n) codes of the block, for the beams alive at its end
    err_ptr, stride_e,               # (B·R, BS) their feedback errors
    anc_ptr,                         # (B·R,) int32: each final beam's beam at the block start
    R, i1, bs: tl.constexpr,
    B: tl.constexpr, BP: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, EP2: tl.constexpr,
    ROWS: tl.constexpr, BS: tl.constexpr, DYNAMIC: tl.constexpr, EXACT: tl.constexpr,
    values_ptr=None, K: tl.constexpr = 0, TIE: tl.constexpr = 0,     # the grid's alphabet (K = 0: the integers)
):
    """Beam search over one block for `ROWS` rows: every beam expands to its `E` cheapest codes among the
    `2E+1` around its nearest one, the `B` best partial paths by `Σ e²` survive (ascending), and the
    block's codes and errors are recovered by back-pointers at the end of the block."""
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    b = tl.arange(0, BP)
    cols = tl.arange(0, BS)
    rmask = r < R
    bmask = b < B
    cmask = cols < bs
    rb = b[None, :].to(tl.int64) * R + r[:, None]                      # (ROWS, BP) flat beam-row
    m2 = rmask[:, None] & bmask[None, :]
    m3 = m2[:, :, None] & cmask[None, None, :]
    col3 = cols[None, None, :]
    tile = tl.load(T_ptr + rb[:, :, None] * stride_t + i1 + col3, mask=m3, other=0.0)
    score = tl.load(score_ptr + rb, mask=m2, other=float("inf"))
    if DYNAMIC:
        s, z = _grid(S_ptr, Z_ptr, b[None, :] * stride_sb + r[:, None], m2)
    hc = tl.zeros([ROWS, BP, BS], dtype=tl.float32)
    he = tl.zeros([ROWS, BP, BS], dtype=tl.float32)
    hp = tl.zeros([ROWS, BP, BS], dtype=tl.int32)
    o = tl.arange(0, EP)
    o3 = o[None, None, :]
    pos3 = tl.arange(0, EP2)[None, None, :]
    valid = (pos3 < E) & bmask[None, :, None]
    flat = b[None, :, None] * EP2 + pos3
    for jj in range(0, bs):
        j = i1 + jj
        u_row, d, lo, hi = _column(U_ptr, stride_u, lo_ptr, hi_ptr, i1, j, jj, cols, cmask)
        if not DYNAMIC:
            s1, z1 = _grid(S_ptr, Z_ptr, r * stride_sr + j, rmask)
            s = tl.broadcast_to(s1[:, None], (ROWS, BP))
            z = tl.broadcast_to(z1[:, None], (ROWS, BP))
        t = tl.sum(tl.where(col3 == jj, tile, 0.0), axis=2)              # (ROWS, BP)
        c0 = _nearest(t, s, z, lo, hi, values_ptr, K, TIE)
        cc = c0[:, :, None] + (o3 - E).to(tl.float32)                     # (ROWS, BP, EP)
        err = _residual(t[:, :, None], s[:, :, None], cc, z[:, :, None], d, values_ptr, K, EXACT)
        cost = _mul(err, err, EXACT)
        cost = tl.where((cc < lo) | (cc > hi) | (o3 > 2 * E), float("inf"), cost)
        # each beam's E cheapest codes, ascending
        k1 = ~tl.topk(~_key(cost, o3 + tl.zeros([ROWS, BP, EP], tl.int32)), EP2, dim=2)   # (ROWS, BP, EP2)
        total = score[:, :, None] + _key_value(k1)
        k2 = _key(tl.where(valid, total, 0.0), flat + tl.zeros([ROWS, BP, EP2], tl.int32))
        k2 = tl.where(valid, k2, flat.to(tl.int64) + 0x7FFFFFFF00000000)
        # the B best partial paths, ascending
        sel = ~tl.topk(~tl.reshape(k2, (ROWS, BP * EP2)), BP, dim=1)       # (ROWS, BP)
        f = _key_low(sel)
        parent = f // EP2
        off = tl.gather(tl.reshape(_key_low(k1), (ROWS, BP * EP2)), f, axis=1)
        c = tl.gather(c0, parent, axis=1) + (off - E).to(tl.float32)
        s = tl.gather(s, parent, axis=1)
        z = tl.gather(z, parent, axis=1)
        tp = tl.gather(t, parent, axis=1)
        e = _residual(tp, s, c, z, d, values_ptr, K, EXACT)
        score = _key_value(sel)
        tile = tl.gather(tile, tl.broadcast_to(parent[:, :, None], (ROWS, BP, BS)), axis=1)
        tile = tile - _mul(e[:, :, None], u_row[None, None, :], EXACT)
        at = col3 == jj
        hc = tl.where(at, c[:, :, None], hc)
        he = tl.where(at, e[:, :, None], he)
        hp = tl.where(at, parent[:, :, None], hp)
    # back-pointers: codes and errors of the beams alive at the end of the block
    cur = tl.broadcast_to(b[None, :], (ROWS, BP))
    out_c = tl.zeros([ROWS, BP, BS], dtype=tl.float32)
    out_e = tl.zeros([ROWS, BP, BS], dtype=tl.float32)
    for k in range(0, bs):
        jj = bs - 1 - k
        at = col3 == jj
        c_col = tl.gather(tl.sum(tl.where(at, hc, 0.0), axis=2), cur, axis=1)
        e_col = tl.gather(tl.sum(tl.where(at, he, 0.0), axis=2), cur, axis=1)
        p_col = tl.gather(tl.sum(tl.where(at, hp, 0), axis=2), cur, axis=1)
        out_c = tl.where(at, c_col[:, :, None], out_c)
        out_e = tl.where(at, e_col[:, :, None], out_e)
        cur = p_col
    tl.store(codes_ptr + rb[:, :, None] * stride_c + i1 + col3, out_c.to(codes_ptr.dtype.element_ty), mask=m3)
    tl.store(err_ptr + rb[:, :, None] * stride_e + col3, out_e, mask=m3)
    tl.store(anc_ptr + rb, cur, mask=m2)
    tl.store(score_ptr + rb, score, mask=m2)
