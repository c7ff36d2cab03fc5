"""Numba kernels: one stretch of the column walk, and one lazy block of the beam, each row on its own.

A row `r` (candidate path × weight row, flattened) walks the columns `j0 ≤ j < j1` of its block
`[i1, i2)` with its targets `T[r, i1:i2]` in cache:

    t = T[r, j] (+ G[i, j] · U_jj)      c = choose(t)      e = (t − s (a(c) − z)) / U_jj
    score += e²      T[r, j+1:i2] −= (e − G[i, j]) · U[j, j+1:i2]      Err[r, j − i1] = e − G[i, j]

Every operation is the reference's, in float32, in the same order, each product rounded on its own, so
a row takes the reference walk's decisions (`ojbkq_core.decoders.walk`); the columns after the block are
updated by the caller with the reference's matrix product. Klein's noise is `ojbkq_core.rng.uniform`
of (seed, path, row, column, slot), drawn only for the codes a draw can still reach (see `reach`).

The grid's alphabet comes as a table `values` `(K,)` float32 (`a(c) = values[c]`, nearest value with ties to
codes of parity `tie`); an empty table is the integers (`a(c) = c`, `rint`).
"""

import numpy as np
from numba import njit, prange

from ojbkq_core import rng

_M32, _COLUMN, _SLOT = rng._M32, rng._COLUMN, rng._SLOT
_HALF = np.float32(0.5)
_TWO24 = np.float32(1 << 24)
_BELOW_ONE = np.nextafter(np.float32(1.0), np.float32(0.0))
_NEG_INF = np.float32(-np.inf)
_BUCKET_SHIFT = 20                   # 4096 buckets of the 32-bit hash


def gumbel_bucket_bounds():
    """`(gmin, gmax)`, each `(4096,)` float64: bounds of the Gumbel draw `_gumbel(x)` over every hash `x` with
    the same top 12 bits: the exact values at the bucket's smallest and largest uniform (the draw grows
    with `x`), widened by 10⁻³ for the float32 rounding of the uniform and the logarithms."""
    def draw(h):
        u = np.minimum((np.float32(h >> 8) + _HALF) / _TWO24, _BELOW_ONE).astype(np.float64)
        return -np.log(-np.log(u))
    buckets = np.arange(4096, dtype=np.int64)
    return draw(buckets << _BUCKET_SHIFT) - 1e-3, draw(((buckets + 1) << _BUCKET_SHIFT) - 1) + 1e-3


_mix = njit(inline="always")(rng._mix)      # the reference's hash, compiled for one int64


@njit(inline="always")
def _gumbel(x):
    """`−log(−log(u))` of the uniform `ojbkq_core.rng.to_unit` makes of the hash `x`."""
    u = (np.float32(x >> 8) + _HALF) / _TWO24
    u = min(u, _BELOW_ONE)
    return -np.log(-np.log(u))


@njit(inline="always")
def _nearest(t, s, z, lo, hi, values, tie):
    """`ojbkq_core.grid.Alphabet.nearest` for one target."""
    K = values.shape[0]
    if K == 0:
        return min(max(np.rint(t / s) + z, lo), hi)
    x = t / s + z
    i = 0
    while i < K and values[i] < x:            # searchsorted: values[i-1] < x <= values[i]
        i += 1
    i = min(max(i, 1), K - 1)
    below = x - values[i - 1]
    above = values[i] - x
    if above < below:
        c = i
    elif above > below:
        c = i - 1
    elif i % 2 == tie:
        c = i
    else:
        c = i - 1
    return min(max(np.float32(c), lo), hi)


@njit(inline="always")
def _value(c, values):
    """`a(c)`: the alphabet's value of code `c` (float32 holding an integer); a code outside the table reads
    its nearest end, as the reference (callers mask it)."""
    K = values.shape[0]
    if K == 0:
        return c
    return values[min(max(int(c), 0), K - 1)]


@njit(inline="always")
def _insert(order, key, p):
    """Insert index `p` into `order[:p]`, kept ascending by `key[order[·]]`; equal keys stay in index order."""
    q = p
    while q > 0 and key[order[q - 1]] > key[p]:
        order[q] = order[q - 1]
        q -= 1
    order[q] = p


@njit(inline="always")
def _subtract_scaled(x, u, a):
    """`x −= a · u` elementwise (each product rounded on its own); a loop LLVM vectorizes."""
    for k in range(x.shape[0]):
        x[k] = x[k] - a * u[k]


@njit(inline="always")
def _reach(kappa, window, spread, ratio):
    """`ojbkq_core.decoders.sampling.reach` for one target."""
    W = window
    q = ratio * ratio / 4
    while W > 1 and kappa * ((W - 0.5) * (W - 0.5) - q) * (1 - 1e-3) > spread + 1.0:
        W -= 1
    return W


@njit(parallel=True, cache=True)
def walk_stretch(T, Us, per, lower, upper, S, Z, s_rows, G, inject, beta, hstate, sample, window, spread, gmin, gmax,
                 codes, Err, score, m, i1, i2, j0, j1, values, tie, gap, ratio):
    """Walk columns `j0 ≤ j < j1` of the block `[i1, i2)` for every row of `T` `(R, n)` float32, in place.
    `Us` `(E, n, n)`: the factor of each of `E` stacked problems, row `r` of problem `(r % m) // per` (one
    problem: `E = 1`, `per = m`).

    Grid: `S[r % s_rows, j]` and `Z[r % s_rows, j]`. `G` `(m, n)` is read when `inject`. With `sample`
    the rows `r ≥ m` draw their code (Klein, inverse temperature `beta[r % m]`, hash prefix `hstate[r]`);
    rows `r < m` (path 0) round to nearest. `gmin`, `gmax` (`gumbel_bucket_bounds`) bound the draws of each
    hash bucket. Writes `codes[r, j]`, `Err[r, j − i1]`, adds to `score[r]`. Alphabet: `values`, `tie` (see
    the module), its least gap `gap` and largest over least `ratio` (for the reach of a draw).
    """
    R = T.shape[0]
    slots = 2 * window + 1 if sample else 1
    opens_o = np.empty((R, slots), np.int64)               # per row: the codes that may win, in slot order
    opens_v = np.empty((R, slots), np.float32)
    opens_x = np.empty((R, slots), np.int64)
    for r in prange(R):
        i = r % m
        U = Us[i // per]
        sr = r % s_rows
        draw = sample and r >= m
        b = beta[i]
        open_o, open_v, open_x = opens_o[r], opens_v[r], opens_x[r]
        total = score[r]
        for j in range(j0, j1):
            d = U[j, j]
            lo, hi = lower[j], upper[j]
            s, z = S[sr, j], Z[sr, j]
            t = T[r, j]
            if inject:
                t = t + G[i, j] * d
            c = _nearest(t, s, z, lo, hi, values, tie)
            if draw:
                # Gumbel-max over the codes within reach, the first maximum in slot order as torch's
                # argmax. The draws are bounded per hash bucket (`gmin`, `gmax`): a code whose logit plus
                # its largest possible draw stays below the nearest code's logit plus its smallest one
                # cannot win and is passed over, and when every other code is, no logarithm is needed.
                q = s * gap / d
                W = _reach(np.float64(b * (q * q)), window, spread, ratio)
                hc = _mix(hstate[r] + ((j * _COLUMN) & _M32))
                x0 = _mix(hc + window * _SLOT)
                dist = (t - s * (_value(c, values) - z)) / d
                logit0 = (-b * dist) * dist
                floor0 = logit0 + gmin[x0 >> _BUCKET_SHIFT]
                n_open = 0
                for o in range(-W, W + 1):
                    cc = c + np.float32(o)
                    if o == 0 or cc < lo or cc > hi:
                        continue
                    dist = (t - s * (_value(cc, values) - z)) / d
                    logit = (-b * dist) * dist
                    x = _mix(hc + (o + window) * _SLOT)
                    if logit + gmax[x >> _BUCKET_SHIFT] >= floor0 - (1e-3 + 1e-5 * (abs(floor0) + abs(logit))):
                        open_o[n_open] = o
                        open_v[n_open] = logit
                        open_x[n_open] = x
                        n_open += 1
                if n_open:
                    best_v, best_o = logit0 + _gumbel(x0), 0
                    for k in range(n_open):
                        o = open_o[k]
                        v = open_v[k] + _gumbel(open_x[k])
                        if v > best_v or (v == best_v and o < best_o):
                            best_v, best_o = v, o
                    c = c + np.float32(best_o)
            e = (t - s * (_value(c, values) - z)) / d
            total += e * e
            fb = e
            if inject:
                fb = e - G[i, j]
            codes[r, j] = c
            Err[r, j - i1] = fb
            _subtract_scaled(T[r, j + 1:i2], U[j, j + 1:i2], fb)
        score[r] = total


@njit(parallel=True, cache=True)
def beam_stretch(Tb, Err, score, anc, S, Z, dynamic, U, lower, upper, E,
                 hist_code, hist_parent, hist_scale, hist_zero, i1, j0, j1, values, tie):
    """Beam search over columns `j0 ≤ j < j1` of the block starting at `i1`, every row on its own, in place.

    `Tb`, `Err` `(B, m, bs)` float32: each beam's targets and feedback errors in the block; `score` `(B, m)`
    the accumulated `Σ e²`; `anc` `(B, m)` int64 each beam's beam at the block start. Grid: `S[b, i]` per
    beam (`dynamic`, carried to the survivors) or `S[i, j]`. Every beam expands to its `E` cheapest codes
    among the `2E+1` around its nearest one and the `B` cheapest partial paths survive, ascending (ties:
    lower beam, then lower code first). Writes `hist_*[i, j, b]` (code, parent, scale, zero): each row's
    history is its own contiguous block. Alphabet: `values`, `tie` (see the module).
    """
    B, m, bs = Tb.shape
    n_off = 2 * E + 1
    inf = np.float32(np.inf)
    for i in prange(m):
        tile = np.empty((B, bs), np.float32)
        err_t = np.empty((B, bs), np.float32)
        new_tile = np.empty((B, bs), np.float32)
        new_err = np.empty((B, bs), np.float32)
        sc = np.empty(B, np.float32)
        zc = np.empty(B, np.float32)
        sc_new = np.empty(B, np.float32)
        zc_new = np.empty(B, np.float32)
        tot = np.empty(B, np.float32)
        an = np.empty(B, np.int64)
        an_new = np.empty(B, np.int64)
        cand_cost = np.empty(n_off, np.float32)
        cand_err = np.empty(n_off, np.float32)
        keep_tot = np.empty(B * E, np.float32)      # per beam its E cheapest codes: total, code, error
        keep_c = np.empty(B * E, np.float32)
        keep_e = np.empty(B * E, np.float32)
        order = np.empty(n_off, np.int64)
        pick = np.empty(B * E, np.int64)
        for b in range(B):
            for k in range(bs):
                tile[b, k] = Tb[b, i, k]
                err_t[b, k] = Err[b, i, k]
            tot[b] = score[b, i]
            an[b] = anc[b, i]
            if dynamic:
                sc[b] = S[b, i]
                zc[b] = Z[b, i]
        for j in range(j0, j1):
            jj = j - i1
            d = U[j, j]
            lo, hi = lower[j], upper[j]
            for b in range(B):
                if dynamic:
                    s, z = sc[b], zc[b]
                else:
                    s, z = S[i, j], Z[i, j]
                t = tile[b, jj]
                c0 = _nearest(t, s, z, lo, hi, values, tie)
                for o in range(n_off):
                    cc = c0 + np.float32(o - E)
                    e = (t - s * (_value(cc, values) - z)) / d
                    cand_err[o] = e
                    cand_cost[o] = inf if (cc < lo or cc > hi) else e * e
                    _insert(order, cand_cost, o)
                for e_i in range(E):
                    o = order[e_i]
                    f = b * E + e_i
                    keep_tot[f] = tot[b] + cand_cost[o]
                    keep_c[f] = c0 + np.float32(o - E)
                    keep_e[f] = cand_err[o]
            # the B cheapest partial paths, ascending, ties by flat index (beam, then code rank)
            for f in range(B * E):
                _insert(pick, keep_tot, f)
            for nb in range(B):
                f = pick[nb]
                par = f // E
                e = keep_e[f]
                for k in range(jj + 1, bs):
                    new_tile[nb, k] = tile[par, k]
                for k in range(jj):
                    new_err[nb, k] = err_t[par, k]
                new_err[nb, jj] = e
                an_new[nb] = an[par]
                if dynamic:
                    sc_new[nb], zc_new[nb] = sc[par], zc[par]
                    s, z = sc[par], zc[par]
                else:
                    s, z = S[i, j], Z[i, j]
                hist_code[i, j, nb] = keep_c[f]
                hist_parent[i, j, nb] = par
                hist_scale[i, j, nb] = s
                hist_zero[i, j, nb] = z
                _subtract_scaled(new_tile[nb, jj + 1:bs], U[j, j + 1:i1 + bs], e)
            for nb in range(B):
                tot[nb] = keep_tot[pick[nb]]
            tile, new_tile = new_tile, tile
            err_t, new_err = new_err, err_t
            an, an_new = an_new, an
            if dynamic:
                sc, sc_new = sc_new, sc
                zc, zc_new = zc_new, zc
        for b in range(B):
            for k in range(bs):
                Tb[b, i, k] = tile[b, k]
                Err[b, i, k] = err_t[b, k]
            score[b, i] = tot[b]
            anc[b, i] = an[b]
            if dynamic:
                S[b, i] = sc[b]
                Z[b, i] = zc[b]


@njit(parallel=True, cache=True)
def backtrack(hist_code, hist_parent, hist_scale, hist_zero, codes, scale, zero):
    """Follow each final beam back from the last column: `codes[b, i, j]` (and its grid) of the beam alive
    at the end in slot `b`, from the per-column histories `hist_*[i, j, b]`."""
    m, n, B = hist_code.shape
    for i in prange(m):
        for b in range(B):
            cur = b
            for j in range(n - 1, -1, -1):
                codes[b, i, j] = hist_code[i, j, cur]
                scale[b, i, j] = hist_scale[i, j, cur]
                zero[b, i, j] = hist_zero[i, j, cur]
                cur = hist_parent[i, j, cur]
