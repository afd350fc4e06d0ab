"""The C source of the compiled CPU kernels, kept as a string constant.

It lives in a Python module rather than a .c file next to it so that it ships with any install
of the package (a wheel built without package-data rules would drop a .c file); `compiled.py`
writes it to the cache directory and compiles it there. `_BODY` is written once with the
placeholders `real_t` and `_SFX` and instantiated for float (`_f32`) and double (`_f64`).

Design (one thread, as in the paper's speed figure):
- bfly_*: copy (or gather, for BP's permutation) x into the output buffer once, then apply every
  level of every block in place on it. Level l (stride s = 2**l) is the loop "for each group g,
  for each j < s: read the pair (top[j], bot[j]), 2x2 multiply, write back". The twiddle comes
  prepacked as structure-of-arrays (d1, d2, d3, d4 contiguous), so the inner loop over j is four
  contiguous twiddle streams plus two contiguous data streams, which the compiler vectorises.
- Small strides (s = 1, 2, 4, 8) get their own instantiations with s a compile-time constant:
  the j loop is then unrolled and the g loop vectorised with interleaving shuffles instead of
  running a 1- to 8-trip inner loop.
- Rows are processed in tiles of about 64 KiB: level-outer inside a tile so one level's twiddle is
  reused across the tile's rows while the rows stay cache-resident (batch 1 is one tile).
- fwht_*: the same in-place loop with the 2x2 matrix [[1, 1], [1, -1]] and no twiddle.
- tl_forward_* / tl_backward_*: the tiled training kernels of csource_tiled.py (real and
  complex, forward and backward); mix_*: relaxed permutations at inference (csource_mix.py);
  crow_*: the complex row loop for inference at small batch (csource_crows.py); cl_*: relaxed
  permutation levels on a matrix's columns, forward and backward (csource_cols.py).
No -ffast-math (see compiled.py): every product and sum is rounded as written.
"""

from __future__ import annotations

from kernels.cpu.csource_cols import COLS_BODY
from kernels.cpu.csource_crows import CROWS_BODY
from kernels.cpu.csource_mix import MIX_BODY
from kernels.cpu.csource_tiled import HSUM4, HSUM8, TILED_BODY

ABI_VERSION = 12

_HEADER = r"""
#include <stdint.h>
#include <string.h>

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))
#define TILE_BYTES (64 * 1024)
#define TL_BYTES 64 /* bytes per row vector of a training tile (csource_tiled.py) */

int bfly_abi_version(void) { return %(abi)d; }

static int64_t ilog2(int64_t n) { int64_t m = 0; while (((int64_t)1 << m) < n) m++; return m; }
"""

_BODY = r"""
/* One level of stride s on one row of n, in place. Untied: group g uses d[g*s + j] (gstep s);
   tied: every group uses d[j] (gstep 0). */
INLINE void level_body_SFX(real_t *RESTRICT x, int64_t n, int64_t s, int tied,
                           const real_t *RESTRICT d1, const real_t *RESTRICT d2,
                           const real_t *RESTRICT d3, const real_t *RESTRICT d4)
{
    const int64_t groups = n / (2 * s), gstep = tied ? 0 : s;
    for (int64_t g = 0; g < groups; g++) {
        real_t *RESTRICT top = x + 2 * s * g;
        real_t *RESTRICT bot = top + s;
        const real_t *RESTRICT e1 = d1 + gstep * g, *RESTRICT e2 = d2 + gstep * g;
        const real_t *RESTRICT e3 = d3 + gstep * g, *RESTRICT e4 = d4 + gstep * g;
        for (int64_t j = 0; j < s; j++) {
            const real_t a = top[j], b = bot[j];
            top[j] = e1[j] * a + e2[j] * b;
            bot[j] = e3[j] * a + e4[j] * b;
        }
    }
}

#define LEVEL_CASE_SFX(S, T) level_body_SFX(x, n, S, T, d1, d2, d3, d4)

static void level_SFX(real_t *RESTRICT x, int64_t n, int64_t s, int tied,
                      const real_t *RESTRICT d1, const real_t *RESTRICT d2,
                      const real_t *RESTRICT d3, const real_t *RESTRICT d4)
{
    /* constant s and tied in each call below: the compiler specialises each copy */
    if (tied) {
        switch (s) {
        case 1: LEVEL_CASE_SFX(1, 1); return;
        case 2: LEVEL_CASE_SFX(2, 1); return;
        case 4: LEVEL_CASE_SFX(4, 1); return;
        case 8: LEVEL_CASE_SFX(8, 1); return;
        default: LEVEL_CASE_SFX(s, 1); return;
        }
    }
    switch (s) {
    case 1: LEVEL_CASE_SFX(1, 0); return;
    case 2: LEVEL_CASE_SFX(2, 0); return;
    case 4: LEVEL_CASE_SFX(4, 0); return;
    case 8: LEVEL_CASE_SFX(8, 0); return;
    default: LEVEL_CASE_SFX(s, 0); return;
    }
}

/* Copy row r of the strided source into out (gathering through perm when given). */
static void load_row_SFX(const real_t *src, int64_t ss0, int64_t ss1, const int64_t *perm,
                         real_t *out, int64_t n, int64_t r)
{
    const real_t *row = src + r * ss0;
    real_t *dst = out + r * n;
    if (perm) {
        for (int64_t i = 0; i < n; i++) dst[i] = row[perm[i] * ss1];
    } else if (ss1 == 1) {
        if (row != dst) memmove(dst, row, (size_t)n * sizeof(real_t));
    } else {
        for (int64_t i = 0; i < n; i++) dst[i] = row[i * ss1];
    }
}

/* out (batch, n) contiguous = B_{nblocks-1} ... B_0 (x[:, perm] or x).
   Packed twiddle: untied (nblocks, m, 4, n/2); tied (nblocks, 4, n) with level l's s matrices at
   [s, 2s) of each of the four arrays (index 0 unused; it keeps the arrays aligned). */
void bfly_SFX(const real_t *src, int64_t ss0, int64_t ss1, const int64_t *perm, real_t *out,
              int64_t batch, int64_t n, const real_t *tw, int64_t nblocks, int tied,
              int increasing)
{
    const int64_t m = ilog2(n), half = n / 2;
    int64_t tile = TILE_BYTES / (n * (int64_t)sizeof(real_t));
    if (tile < 1) tile = 1;
    for (int64_t r0 = 0; r0 < batch; r0 += tile) {
        const int64_t r1 = r0 + tile < batch ? r0 + tile : batch;
        for (int64_t r = r0; r < r1; r++) load_row_SFX(src, ss0, ss1, perm, out, n, r);
        for (int64_t b = 0; b < nblocks; b++) {
            for (int64_t li = 0; li < m; li++) {
                const int64_t l = increasing ? li : m - 1 - li, s = (int64_t)1 << l;
                const real_t *d1;
                int64_t dk;
                if (tied) { d1 = tw + b * 4 * n + s; dk = n; }
                else { d1 = tw + (b * m + l) * 4 * half; dk = half; }
                for (int64_t r = r0; r < r1; r++)
                    level_SFX(out + r * n, n, s, tied, d1, d1 + dk, d1 + 2 * dk, d1 + 3 * dk);
            }
        }
    }
}

/* The same call with its eleven arguments in one int64 array (pointers as integers): ctypes
   converts each argument of a call separately, so one argument instead of eleven is most of the
   per-call overhead at small n. a[11], a[12]: a bias (NULL: none) added to the first a[12]
   entries of every output row (a layer's bias, fused to save a call at batch 1). */
void bfly_SFX_argv(const int64_t *a)
{
    real_t *out = (real_t *)(intptr_t)a[4];
    const real_t *bias = (const real_t *)(intptr_t)a[11];
    bfly_SFX((const real_t *)(intptr_t)a[0], a[1], a[2], (const int64_t *)(intptr_t)a[3],
             out, a[5], a[6], (const real_t *)(intptr_t)a[7], a[8], (int)a[9], (int)a[10]);
    if (bias)
        for (int64_t r = 0; r < a[5]; r++)
            for (int64_t i = 0; i < a[12]; i++) out[r * a[6] + i] += bias[i];
}

INLINE void fwht_body_SFX(real_t *RESTRICT x, int64_t n, int64_t s)
{
    for (int64_t g = 0; g < n / (2 * s); g++) {
        real_t *RESTRICT top = x + 2 * s * g;
        real_t *RESTRICT bot = top + s;
        for (int64_t j = 0; j < s; j++) {
            const real_t a = top[j], b = bot[j];
            top[j] = a + b;
            bot[j] = a - b;
        }
    }
}

/* In-place unnormalised Walsh-Hadamard transform (Sylvester order) of each row of x. */
void fwht_SFX(real_t *x, int64_t batch, int64_t n)
{
    for (int64_t r = 0; r < batch; r++) {
        real_t *row = x + r * n;
        for (int64_t s = 1; s < n; s *= 2) {
            switch (s) {
            case 1: fwht_body_SFX(row, n, 1); break;
            case 2: fwht_body_SFX(row, n, 2); break;
            case 4: fwht_body_SFX(row, n, 4); break;
            case 8: fwht_body_SFX(row, n, 8); break;
            default: fwht_body_SFX(row, n, s); break;
            }
        }
    }
}
"""


def c_source() -> str:
    """The full C translation unit: header plus the bodies for float and for double."""
    parts = [_HEADER % {"abi": ABI_VERSION}]
    for ctype, suffix in (("float", "_f32"), ("double", "_f64")):
        for body in (_BODY, TILED_BODY, MIX_BODY, CROWS_BODY, COLS_BODY):
            body = body.replace("HSUM8_IMPL", HSUM8[ctype]).replace("HSUM4_IMPL", HSUM4[ctype])
            parts.append(body.replace("real_t", ctype).replace("_SFX", suffix))
    return "".join(parts)
