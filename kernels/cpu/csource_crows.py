"""C source of the row-wise complex forward (inference at small batch), appended to c_source().

The complex twin of csource.py's row loop: each row is split into real and imaginary arrays
(scratch), every level runs in place on them with the twiddle packed structure-of-arrays
(ar, ai, br, bi, cr, ci, dr, di, each contiguous: see kernels/cpu/complex_rows.py), and the
row is written back interleaved (or its real part only). Strides 1, 2, 4 and 8 get constant-s
copies, as in the real loop, so their inner loops unroll.
"""

from __future__ import annotations

CROWS_BODY = r"""
INLINE void crow_level_body_SFX(real_t *RESTRICT re, real_t *RESTRICT im, int64_t n, int64_t s,
                                int tied, const real_t *RESTRICT d, int64_t dk)
{
    const int64_t groups = n / (2 * s), gstep = tied ? 0 : s;
    for (int64_t g = 0; g < groups; g++) {
        real_t *RESTRICT tr = re + 2 * s * g, *RESTRICT br_ = tr + s;
        real_t *RESTRICT ti = im + 2 * s * g, *RESTRICT bi_ = ti + s;
        const real_t *RESTRICT e = d + gstep * g;
        for (int64_t j = 0; j < s; j++) {
            const real_t ar = e[j], ai = e[dk + j], br = e[2 * dk + j], bi = e[3 * dk + j];
            const real_t cr = e[4 * dk + j], ci = e[5 * dk + j];
            const real_t dr = e[6 * dk + j], di = e[7 * dk + j];
            const real_t pr = tr[j], pi = ti[j], qr = br_[j], qi = bi_[j];
            tr[j] = (ar * pr - ai * pi) + (br * qr - bi * qi);
            ti[j] = (ar * pi + ai * pr) + (br * qi + bi * qr);
            br_[j] = (cr * pr - ci * pi) + (dr * qr - di * qi);
            bi_[j] = (cr * pi + ci * pr) + (dr * qi + di * qr);
        }
    }
}

static void crow_level_SFX(real_t *re, real_t *im, int64_t n, int64_t s, int tied,
                           const real_t *d, int64_t dk)
{
    if (tied) {
        switch (s) {
        case 1: crow_level_body_SFX(re, im, n, 1, 1, d, dk); return;
        case 2: crow_level_body_SFX(re, im, n, 2, 1, d, dk); return;
        case 4: crow_level_body_SFX(re, im, n, 4, 1, d, dk); return;
        case 8: crow_level_body_SFX(re, im, n, 8, 1, d, dk); return;
        default: crow_level_body_SFX(re, im, n, s, 1, d, dk); return;
        }
    }
    switch (s) {
    case 1: crow_level_body_SFX(re, im, n, 1, 0, d, dk); return;
    case 2: crow_level_body_SFX(re, im, n, 2, 0, d, dk); return;
    case 4: crow_level_body_SFX(re, im, n, 4, 0, d, dk); return;
    case 8: crow_level_body_SFX(re, im, n, 8, 0, d, dk); return;
    default: crow_level_body_SFX(re, im, n, s, 0, d, dk); return;
    }
}

/* a: xr, xi (0: real input), xs0, xs1, yr, yi (0: real part only), ys0, ys1, batch, n,
   packed twiddle, nblocks, tied, increasing, scratch (2n). Strides in real_t units. */
void crow_SFX(const int64_t *a)
{
    const real_t *xr = (const real_t *)(intptr_t)a[0], *xi = (const real_t *)(intptr_t)a[1];
    real_t *yr = (real_t *)(intptr_t)a[4], *yi = (real_t *)(intptr_t)a[5];
    const int64_t xs0 = a[2], xs1 = a[3], ys0 = a[6], ys1 = a[7], batch = a[8], n = a[9];
    const real_t *tw = (const real_t *)(intptr_t)a[10];
    const int64_t nblocks = a[11];
    const int tied = (int)a[12], inc = (int)a[13];
    real_t *re = (real_t *)(intptr_t)a[14], *im = re + n;
    const int64_t m = ilog2(n), half = n / 2;
    for (int64_t r = 0; r < batch; r++) {
        for (int64_t i = 0; i < n; i++) re[i] = xr[r * xs0 + i * xs1];
        if (xi) for (int64_t i = 0; i < n; i++) im[i] = xi[r * xs0 + i * xs1];
        else memset(im, 0, (size_t)n * sizeof(real_t));
        for (int64_t b = 0; b < nblocks; b++) {
            for (int64_t li = 0; li < m; li++) {
                const int64_t l = inc ? li : m - 1 - li, s = (int64_t)1 << l;
                if (tied) crow_level_SFX(re, im, n, s, 1, tw + b * 8 * n + s, n);
                else crow_level_SFX(re, im, n, s, 0, tw + (b * m + l) * 8 * half, half);
            }
        }
        for (int64_t i = 0; i < n; i++) yr[r * ys0 + i * ys1] = re[i];
        if (yi) for (int64_t i = 0; i < n; i++) yi[r * ys0 + i * ys1] = im[i];
    }
}
"""
