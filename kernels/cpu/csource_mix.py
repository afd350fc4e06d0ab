"""C source of the relaxed-permutation kernel (appended to csource.c_source()).

A relaxed permutation (kernels/permutation.py) with fixed probabilities is a chain of steps
S(x)[i] = ca[i] x[i] + cb[i] x[q[i]] (two per level: even/odd, then the half reversals), the
same products and sum that torch computes for (1 - p) x + p y. mix_* runs the chain on each
row (complex rows as 2n interleaved reals, with the steps widened to match), ping-ponging
between the output row and a scratch row so that the last step lands in the output.
tl_mix_* runs the same chain on tiles of the training kernels' element-major layout
(csource_tiled.py; appended after it), where every gather moves a whole vector of rows.
"""

from __future__ import annotations

MIX_BODY = r"""
/* a: x, out (batch, N) contiguous, batch, N, steps, q, ca, cb (steps * N each), scratch (N) */
void mix_SFX(const int64_t *a)
{
    const real_t *x = (const real_t *)(intptr_t)a[0];
    real_t *out = (real_t *)(intptr_t)a[1], *tmp = (real_t *)(intptr_t)a[8];
    const int64_t batch = a[2], N = a[3], steps = a[4];
    const int32_t *q = (const int32_t *)(intptr_t)a[5];
    const real_t *ca = (const real_t *)(intptr_t)a[6], *cb = (const real_t *)(intptr_t)a[7];
    for (int64_t r = 0; r < batch; r++) {
        const real_t *src = x + r * N;
        real_t *dst = out + r * N;
        if (steps == 0) memcpy(dst, src, (size_t)N * sizeof(real_t));
        for (int64_t k = 0; k < steps; k++) {
            real_t *RESTRICT d = (steps - 1 - k) % 2 == 0 ? dst : tmp;
            const int32_t *RESTRICT qk = q + k * N;
            const real_t *RESTRICT ak = ca + k * N, *RESTRICT bk = cb + k * N;
            for (int64_t i = 0; i < N; i++) d[i] = ak[i] * src[i] + bk[i] * src[qk[i]];
            src = d;
        }
    }
}

/* One step of the chain on a tile (element-major, R rows per element; complex: two planes):
   dst[i] = ca[i] src[i] + cb[i] src[q[i]], each a whole vector of rows. */
static void tl_mix_step_SFX(const real_t *src, real_t *dst, int64_t n, int cplx,
                            const int32_t *q, const real_t *ca, const real_t *cb)
{
    const int64_t R = TR_SFX;
    for (int64_t part = 0; part < (cplx ? 2 : 1); part++) {
        const real_t *sp = src + part * n * R;
        real_t *dp = dst + part * n * R;
        for (int64_t i = 0; i < n; i++) {
            const real_t ai = ca[i], bi = cb[i];
            const real_t *u = sp + i * R, *v = sp + (int64_t)q[i] * R;
            real_t *d = dp + i * R;
#pragma omp simd
            for (int64_t r = 0; r < R; r++) d[r] = ai * u[r] + bi * v[r];
        }
    }
}

/* a: xr, xi, xs0, xs1, yr, yi, ys0, ys1, batch, n, steps, q (int32), ca, cb (steps * n each),
   cplx, work (two tile buffers). Strides in real_t units; xi / yi as in tl_forward_*. */
void tl_mix_SFX(const int64_t *a)
{
    const real_t *xr = (const real_t *)(intptr_t)a[0], *xi = (const real_t *)(intptr_t)a[1];
    real_t *yr = (real_t *)(intptr_t)a[4], *yi = (real_t *)(intptr_t)a[5];
    const int64_t xs0 = a[2], xs1 = a[3], ys0 = a[6], ys1 = a[7], batch = a[8], n = a[9];
    const int64_t steps = a[10];
    const int32_t *q = (const int32_t *)(intptr_t)a[11];
    const real_t *ca = (const real_t *)(intptr_t)a[12], *cb = (const real_t *)(intptr_t)a[13];
    const int cplx = (int)a[14];
    const int64_t R = TR_SFX, lvl = n * R * (cplx ? 2 : 1);
    real_t *buf0 = (real_t *)(intptr_t)a[15], *buf1 = buf0 + lvl;
    for (int64_t r0 = 0; r0 < batch; r0 += R) {
        const int64_t rows = batch - r0 < R ? batch - r0 : R;
        real_t *src = buf0, *dst = buf1;
        tl_load_SFX(xr, xi, xs0, xs1, r0, rows, n, cplx, src);
        for (int64_t k = 0; k < steps; k++) {
            tl_mix_step_SFX(src, dst, n, cplx, q + k * n, ca + k * n, cb + k * n);
            real_t *t = src; src = dst; dst = t;
        }
        tl_store_SFX(src, n, cplx, r0, rows, yr, yi, ys0, ys1);
    }
}

/* Training, backward of tl_mix_*: per tile of rows, the chain again from x (each step's input
   kept in `keep`, steps tiles), then the transposed steps from dL/dy down to dL/dx.
   a: gr, gi, gs0, gs1 (dL/dy), xr, xi, xs0, xs1 (x), dr, di, ds0, ds1 (dL/dx out; dr 0: not
   wanted), batch, n, steps, q, qt (inverse of q), ca, cb, cbt (cb[qt]) (steps * n each), cplx,
   keep, work (two tiles), s (steps * n doubles, accumulated):
   s[k][i] += sum over rows (and parts) of g_k[i] (x_k[q[i]] - x_k[i]), x_k the input of step k
   and g_k dL/d(its output): dL/dp for that step's probability, summed over its positions. */
void tl_mix_grad_SFX(const int64_t *a)
{
    const real_t *gyr = (const real_t *)(intptr_t)a[0], *gyi = (const real_t *)(intptr_t)a[1];
    const real_t *xr = (const real_t *)(intptr_t)a[4], *xi = (const real_t *)(intptr_t)a[5];
    real_t *dxr = (real_t *)(intptr_t)a[8], *dxi = (real_t *)(intptr_t)a[9];
    const int64_t gs0 = a[2], gs1 = a[3], xs0 = a[6], xs1 = a[7], ds0 = a[10], ds1 = a[11];
    const int64_t batch = a[12], n = a[13], steps = a[14];
    const int32_t *q = (const int32_t *)(intptr_t)a[15], *qt = (const int32_t *)(intptr_t)a[16];
    const real_t *ca = (const real_t *)(intptr_t)a[17], *cb = (const real_t *)(intptr_t)a[18];
    const real_t *cbt = (const real_t *)(intptr_t)a[19];
    const int cplx = (int)a[20];
    real_t *keep = (real_t *)(intptr_t)a[21], *buf0 = (real_t *)(intptr_t)a[22];
    double *s = (double *)(intptr_t)a[23];
    const int64_t R = TR_SFX, lvl = n * R * (cplx ? 2 : 1);
    real_t *buf1 = buf0 + lvl;
    for (int64_t r0 = 0; r0 < batch; r0 += R) {
        const int64_t rows = batch - r0 < R ? batch - r0 : R;
        tl_load_SFX(xr, xi, xs0, xs1, r0, rows, n, cplx, keep);
        for (int64_t k = 0; k + 1 < steps; k++)
            tl_mix_step_SFX(keep + k * lvl, keep + (k + 1) * lvl, n, cplx, q + k * n, ca + k * n,
                            cb + k * n);
        real_t *g = buf0, *h = buf1;
        tl_load_SFX(gyr, gyi, gs0, gs1, r0, rows, n, cplx, g);
        for (int64_t k = steps - 1; k >= 0; k--) {
            const real_t *x = keep + k * lvl;
            const int32_t *qk = q + k * n, *tk = qt + k * n;
            const real_t *ak = ca + k * n, *bk = cbt + k * n;
            double *sk = s + k * n;
            for (int64_t part = 0; part < (cplx ? 2 : 1); part++) {
                const real_t *gp = g + part * n * R, *xp = x + part * n * R;
                real_t *hp = h + part * n * R;
                for (int64_t i = 0; i < n; i++) {
                    const real_t *gv = gp + i * R, *xv = xp + i * R;
                    const real_t *xq = xp + (int64_t)qk[i] * R, *gt = gp + (int64_t)tk[i] * R;
                    const real_t ai = ak[i], bi = bk[i];
                    real_t *hv = hp + i * R;
                    real_t acc = 0;
#pragma omp simd reduction(+ : acc)
                    for (int64_t r = 0; r < R; r++) {
                        acc += gv[r] * (xq[r] - xv[r]);
                        hv[r] = ai * gv[r] + bi * gt[r];
                    }
                    sk[i] += (double)acc;
                }
            }
            real_t *tmp = g; g = h; h = tmp;
        }
        if (dxr) tl_store_SFX(g, n, cplx, r0, rows, dxr, dxi, ds0, ds1);
    }
}
"""
