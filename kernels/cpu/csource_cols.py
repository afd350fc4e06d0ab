"""C source of the relaxed column levels with their backward (appended to csource.c_source()).

One level of size k = 2h maps each row x of a matrix to z = x (I (x) Q_k), as
kernels/bp_matrix._ColumnLevel does, block by block of k columns:
  a[b h + i] = x[b h + i] + p[1 + b] (x[b h + h - 1 - i] - x[b h + i])  (reverse half b)
  z[j] = lerp(a[j], a[(j % 2) h + j / 2], p[0])                          (even/odd)
with torch's lerp (s + w (e - s) for w < 1/2, e - (e - s)(1 - w) otherwise). cl_forward_* runs
a chain of levels on one row at a time, ping-ponging in scratch rows that stay in cache, so the
matrix is read and written once for the whole chain. Complex rows (interleaved re, im) are
split into a real and an imaginary plane first: the probabilities are real, so each plane goes
through the levels on its own and the planes' probability gradients add up.

cl_backward_* recomputes a row's level inputs from x, then walks the levels back in two passes
per block (cl_level_back_*): the input gradient through the transposed even/odd and reversal
maps, and the three probability gradients (Re(conj(g) .) for complex), accumulated per block in
real_t and per trial in double.

bpl_forward_* / bpl_backward_* are kernels/bp_matrix._BPLevel, the step M_2s = BF_2s
(I_2 (x) M_s) Q_2s of the learned matrix, the same way: row a s + r of the output is row r of
M_s scaled by the twiddles t[r, a, 0] and t[r, a, 1] (one half each), then one column level.
"""

from __future__ import annotations

COLS_BODY = r"""
/* a (k) = block xb with its halves relaxed-reversed by q1, q2 */
INLINE void cl_rev_SFX(const real_t *RESTRICT xb, real_t *RESTRICT a, int64_t h, real_t q1,
                       real_t q2)
{
    for (int64_t i = 0; i < h; i++) a[i] = xb[i] + q1 * (xb[h - 1 - i] - xb[i]);
    const real_t *RESTRICT u = xb + h;
    for (int64_t i = 0; i < h; i++) a[h + i] = u[i] + q2 * (u[h - 1 - i] - u[i]);
}

/* z (n) = x (n) (I (x) Q_k), one real plane; a: scratch (k) */
static void cl_level_SFX(const real_t *RESTRICT x, real_t *RESTRICT z, int64_t n, int64_t k,
                         const real_t *p, real_t *RESTRICT a)
{
    const int64_t h = k / 2;
    const real_t p0 = p[0];
    for (int64_t o = 0; o < n; o += k) {
        real_t *RESTRICT zb = z + o;
        cl_rev_SFX(x + o, a, h, p[1], p[2]);
        if (p0 < (real_t)0.5) {
            for (int64_t i = 0; i < h; i++) {
                zb[2 * i] = a[2 * i] + p0 * (a[i] - a[2 * i]);
                zb[2 * i + 1] = a[2 * i + 1] + p0 * (a[h + i] - a[2 * i + 1]);
            }
        } else {
            const real_t w = (real_t)1 - p0;
            for (int64_t i = 0; i < h; i++) {
                zb[2 * i] = a[i] - (a[i] - a[2 * i]) * w;
                zb[2 * i + 1] = a[h + i] - (a[h + i] - a[2 * i + 1]) * w;
            }
        }
    }
}

/* gx (n) from g (n), the gradient of the level's output, and x (n), its input; one real
   plane. acc[0..2] += the probability gradients. ga: scratch (k).
   With d = gE - g (gE[b h + i] = g[2 i + b]): ga = lerp(g, gE, p0) and dp0 = sum a d; with
   dga = flip(ga) - ga on each half: gx = ga + p[1 + b] dga and dp[1 + b] = sum x dga. */
static void cl_level_back_SFX(const real_t *RESTRICT x, const real_t *RESTRICT g,
                              real_t *RESTRICT gx, int64_t n, int64_t k, const real_t *p,
                              double *acc, real_t *RESTRICT ga)
{
    const int64_t h = k / 2;
    const real_t p0 = p[0], q1 = p[1], q2 = p[2], w = (real_t)1 - p0;
    const int small = p0 < (real_t)0.5;
    for (int64_t o = 0; o < n; o += k) {
        const real_t *RESTRICT xb = x + o, *RESTRICT gb = g + o;
        const real_t *RESTRICT xu = xb + h, *RESTRICT gu = gb + h;
        real_t *RESTRICT gxb = gx + o;
        real_t s0 = 0, s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s0)
        for (int64_t i = 0; i < h; i++) {
            const real_t a0 = xb[i] + q1 * (xb[h - 1 - i] - xb[i]);
            const real_t a1 = xu[i] + q2 * (xu[h - 1 - i] - xu[i]);
            const real_t e0 = gb[2 * i], e1 = gb[2 * i + 1];
            const real_t d0 = e0 - gb[i], d1 = e1 - gu[i];
            ga[i] = small ? gb[i] + p0 * d0 : e0 - d0 * w;
            ga[h + i] = small ? gu[i] + p0 * d1 : e1 - d1 * w;
            s0 += a0 * d0 + a1 * d1;
        }
        const real_t *RESTRICT gau = ga + h;
        real_t *RESTRICT gxu = gxb + h;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < h; i++) {
            const real_t d0 = ga[h - 1 - i] - ga[i], d1 = gau[h - 1 - i] - gau[i];
            gxb[i] = ga[i] + q1 * d0;
            gxu[i] = gau[i] + q2 * d1;
            s1 += xb[i] * d0;
            s2 += xu[i] * d1;
        }
        acc[0] += (double)s0;
        acc[1] += (double)s1;
        acc[2] += (double)s2;
    }
}

/* planes (2 n) <- interleaved complex row (n entries), and back */
static void cl_split_SFX(const real_t *RESTRICT row, real_t *RESTRICT planes, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        planes[i] = row[2 * i];
        planes[n + i] = row[2 * i + 1];
    }
}

static void cl_join_SFX(const real_t *RESTRICT planes, real_t *RESTRICT row, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        row[2 * i] = planes[i];
        row[2 * i + 1] = planes[n + i];
    }
}

/* z = x (I (x) Q_{k_0}) ... (I (x) Q_{k_{L-1}}) row by row.
   a: x, z (lead, rows, n[, 2]) contiguous, lead, rows, n, levels, ks (int64, levels),
   p (lead, levels, 3) real_t, cplx, work (4 n + max k real_t). */
void cl_forward_SFX(const int64_t *a)
{
    const real_t *x = (const real_t *)(intptr_t)a[0];
    real_t *z = (real_t *)(intptr_t)a[1];
    const int64_t lead = a[2], rows = a[3], n = a[4], levels = a[5];
    const int64_t *ks = (const int64_t *)(intptr_t)a[6];
    const real_t *p = (const real_t *)(intptr_t)a[7];
    const int cplx = (int)a[8];
    const int64_t np = cplx ? 2 : 1, w = np * n;
    real_t *buf[2] = {(real_t *)(intptr_t)a[9], (real_t *)(intptr_t)a[9] + 2 * n};
    real_t *scratch = buf[1] + 2 * n;
    for (int64_t l = 0; l < lead; l++) {
        const real_t *pl = p + l * levels * 3;
        for (int64_t r = 0; r < rows; r++) {
            const real_t *xr = x + (l * rows + r) * w;
            real_t *zr = z + (l * rows + r) * w;
            if (levels == 0) { memcpy(zr, xr, (size_t)w * sizeof(real_t)); continue; }
            const real_t *src = xr;
            if (cplx) { cl_split_SFX(xr, buf[0], n); src = buf[0]; }
            for (int64_t j = 0; j < levels; j++) {
                real_t *dst = (!cplx && j == levels - 1) ? zr : buf[(j + cplx) % 2];
                for (int64_t q = 0; q < np; q++)
                    cl_level_SFX(src + q * n, dst + q * n, n, ks[j], pl + 3 * j, scratch);
                src = dst;
            }
            if (cplx) cl_join_SFX(src, zr, n);
        }
    }
}

/* gx and the probability gradients of cl_forward_*.
   a: x, gz, gx (lead, rows, n[, 2]) contiguous, gacc (lead, levels, 3) double (added to) or 0,
   lead, rows, n, levels, ks, p, cplx, work ((levels + 2) 2 n + 2 max k real_t). */
void cl_backward_SFX(const int64_t *a)
{
    const real_t *x = (const real_t *)(intptr_t)a[0], *gz = (const real_t *)(intptr_t)a[1];
    real_t *gx = (real_t *)(intptr_t)a[2];
    double *gacc = (double *)(intptr_t)a[3];
    const int64_t lead = a[4], rows = a[5], n = a[6], levels = a[7];
    const int64_t *ks = (const int64_t *)(intptr_t)a[8];
    const real_t *p = (const real_t *)(intptr_t)a[9];
    const int cplx = (int)a[10];
    real_t *work = (real_t *)(intptr_t)a[11];
    const int64_t np = cplx ? 2 : 1, w = np * n;
    int64_t kmax = 2;
    for (int64_t j = 0; j < levels; j++) kmax = ks[j] > kmax ? ks[j] : kmax;
    /* ins[j]: level j's input planes; gbuf: gradient ping-pong; sa, sga: level scratch */
    real_t *gbuf[2] = {work + levels * 2 * n, work + (levels + 1) * 2 * n};
    real_t *sa = work + (levels + 2) * 2 * n, *sga = sa + kmax;
    double dummy[3] = {0, 0, 0};
    for (int64_t l = 0; l < lead; l++) {
        const real_t *pl = p + l * levels * 3;
        for (int64_t r = 0; r < rows; r++) {
            const int64_t off = (l * rows + r) * w;
            if (levels == 0) {
                memcpy(gx + off, gz + off, (size_t)w * sizeof(real_t));
                continue;
            }
            const real_t *ins0 = x + off, *g = gz + off;
            if (cplx) {
                cl_split_SFX(x + off, work, n);
                ins0 = work;
                cl_split_SFX(gz + off, gbuf[0], n);
                g = gbuf[0];
            }
            for (int64_t j = 0; j + 1 < levels; j++) {
                const real_t *in = j ? work + j * 2 * n : ins0;
                for (int64_t q = 0; q < np; q++)
                    cl_level_SFX(in + q * n, work + (j + 1) * 2 * n + q * n, n, ks[j],
                                 pl + 3 * j, sa);
            }
            for (int64_t j = levels - 1; j >= 0; j--) {
                const real_t *in = j ? work + j * 2 * n : ins0;
                real_t *dst = (!cplx && j == 0) ? gx + off : gbuf[(levels - 1 - j + cplx) % 2];
                double *acc = gacc ? gacc + (l * levels + j) * 3 : dummy;
                for (int64_t q = 0; q < np; q++)
                    cl_level_back_SFX(in + q * n, g + q * n, dst + q * n, n, ks[j], pl + 3 * j,
                                      acc, sga);
                g = dst;
            }
            if (cplx) cl_join_SFX(g, gx + off, n);
        }
    }
}
/* X (2 s per plane: [t0 M, t1 M]) from M (s per plane) and two twiddle entries t0, t1 */
static void bpl_expand_SFX(const real_t *RESTRICT M, const real_t *t0, const real_t *t1,
                           real_t *RESTRICT X, int64_t s, int cplx)
{
    const real_t *ts[2] = {t0, t1};
    for (int h = 0; h < 2; h++) {
        const real_t tr = ts[h][0];
        real_t *RESTRICT xr = X + h * s;
        if (!cplx) {
            for (int64_t j = 0; j < s; j++) xr[j] = tr * M[j];
            continue;
        }
        const real_t ti = ts[h][1], *RESTRICT mi = M + s;
        real_t *RESTRICT xi = xr + 2 * s;
        for (int64_t j = 0; j < s; j++) {
            xr[j] = tr * M[j] - ti * mi[j];
            xi[j] = tr * mi[j] + ti * M[j];
        }
    }
}

/* z (lead, 2 s, 2 s) = BF_2s (I_2 (x) mat) Q_2s (kernels/bp_matrix._BPLevel): row a s + r of z
   is row r of mat expanded by the twiddle row t[r, a] into [t[r, a, 0] M, t[r, a, 1] M], then
   one column level of size 2 s. a: mat (lead, s, s[, 2]), t (lead, s, 2, 2[, 2]), z, lead, s,
   p (lead, 3) real_t, cplx, work (20 s real_t). */
void bpl_forward_SFX(const int64_t *a)
{
    const real_t *mat = (const real_t *)(intptr_t)a[0], *t = (const real_t *)(intptr_t)a[1];
    real_t *z = (real_t *)(intptr_t)a[2];
    const int64_t lead = a[3], s = a[4];
    const real_t *p = (const real_t *)(intptr_t)a[5];
    const int cplx = (int)a[6];
    real_t *work = (real_t *)(intptr_t)a[7];
    const int64_t np = cplx ? 2 : 1, n = 2 * s;
    real_t *M = work, *X = M + 2 * s, *Z = X + 2 * n, *scratch = Z + 2 * n;
    for (int64_t l = 0; l < lead; l++) {
        for (int64_t r = 0; r < s; r++) {
            const real_t *row = mat + (l * s + r) * s * np, *tr = t + (l * s + r) * 4 * np;
            const real_t *m = row;
            if (cplx) { cl_split_SFX(row, M, s); m = M; }
            for (int64_t h = 0; h < 2; h++) {
                real_t *zr = z + (l * n + h * s + r) * n * np;
                bpl_expand_SFX(m, tr + 2 * h * np, tr + (2 * h + 1) * np, X, s, cplx);
                if (!cplx) { cl_level_SFX(X, zr, n, n, p + 3 * l, scratch); continue; }
                for (int64_t q = 0; q < 2; q++)
                    cl_level_SFX(X + q * n, Z + q * n, n, n, p + 3 * l, scratch);
                cl_join_SFX(Z, zr, n);
            }
        }
    }
}

/* The gradients of bpl_forward_*: gmat (written), gt (written; 0: skipped) and gacc (lead, 3)
   double (added to; 0: skipped). a: mat, t, gz, gmat, gt, gacc, lead, s, p, cplx,
   work (20 s real_t). Twiddle and matrix gradients in torch's convention: grad t = sum of
   g conj(M), grad M = sum of conj(t) g. */
void bpl_backward_SFX(const int64_t *a)
{
    const real_t *mat = (const real_t *)(intptr_t)a[0], *t = (const real_t *)(intptr_t)a[1];
    const real_t *gz = (const real_t *)(intptr_t)a[2];
    real_t *gmat = (real_t *)(intptr_t)a[3], *gt = (real_t *)(intptr_t)a[4];
    double *gacc = (double *)(intptr_t)a[5];
    const int64_t lead = a[6], s = a[7];
    const real_t *p = (const real_t *)(intptr_t)a[8];
    const int cplx = (int)a[9];
    real_t *work = (real_t *)(intptr_t)a[10];
    const int64_t np = cplx ? 2 : 1, n = 2 * s;
    real_t *M = work, *gM = M + 2 * s, *X = gM + 2 * s, *G = X + 2 * n, *gX = G + 2 * n;
    real_t *sga = gX + 2 * n;
    double dummy[3] = {0, 0, 0};
    for (int64_t l = 0; l < lead; l++) {
        double *acc = gacc ? gacc + 3 * l : dummy;
        for (int64_t r = 0; r < s; r++) {
            const real_t *row = mat + (l * s + r) * s * np, *tr = t + (l * s + r) * 4 * np;
            const real_t *m = row;
            if (cplx) { cl_split_SFX(row, M, s); m = M; }
            for (int64_t j = 0; j < np * s; j++) gM[j] = 0;
            for (int64_t h = 0; h < 2; h++) {
                const int64_t zoff = (l * n + h * s + r) * n * np;
                bpl_expand_SFX(m, tr + 2 * h * np, tr + (2 * h + 1) * np, X, s, cplx);
                const real_t *g = gz + zoff;
                if (cplx) { cl_split_SFX(gz + zoff, G, n); g = G; }
                for (int64_t q = 0; q < np; q++)
                    cl_level_back_SFX(X + q * n, g + q * n, gX + q * n, n, n, p + 3 * l, acc, sga);
                for (int64_t e = 0; e < 2; e++) {
                    const int64_t ti = (2 * h + e) * np;
                    const real_t *RESTRICT gr = gX + e * s;
                    if (!cplx) {
                        const real_t tv = tr[ti];
                        real_t sum = 0;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = 0; j < s; j++) {
                            sum += gr[j] * m[j];
                            gM[j] += tv * gr[j];
                        }
                        if (gt) gt[(l * s + r) * 4 + 2 * h + e] = sum;
                        continue;
                    }
                    const real_t *RESTRICT gi = gr + n, *RESTRICT mi = m + s;
                    const real_t vr = tr[ti], vi = tr[ti + 1];
                    real_t sr = 0, si = 0;
#pragma omp simd reduction(+ : sr, si)
                    for (int64_t j = 0; j < s; j++) {
                        sr += m[j] * gr[j] + mi[j] * gi[j];
                        si += m[j] * gi[j] - mi[j] * gr[j];
                        gM[j] += vr * gr[j] + vi * gi[j];
                        gM[s + j] += vr * gi[j] - vi * gr[j];
                    }
                    if (gt) {
                        gt[((l * s + r) * 4 + 2 * h + e) * 2] = sr;
                        gt[((l * s + r) * 4 + 2 * h + e) * 2 + 1] = si;
                    }
                }
            }
            real_t *out = gmat + (l * s + r) * s * np;
            if (cplx) cl_join_SFX(gM, out, s);
            else memcpy(out, gM, (size_t)s * sizeof(real_t));
        }
    }
}
"""
