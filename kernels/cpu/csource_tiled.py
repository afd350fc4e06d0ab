"""C source of the tiled CPU kernels: forward and backward (training), real and complex.

Appended to csource.c_source() (one library, one build). `_SFX`/`real_t` are instantiated for
float and double as in csource.py.

Layout: a tile of TR = 64 bytes / sizeof(real_t) rows (16 floats, 8 doubles: one AVX-512
register, two AVX2 ones) is transposed into element-major order, buf[i * TR + r] for element
i of row r, so every level of every stride is the same loop: for each pair (top, bot) of the
level, one 2x2 (scalars) times TR-wide vectors. No shuffles for small strides, no strided
loads; a complex tile keeps its real parts (n * TR) then its imaginary parts (split format).

Twiddles are read in the layout of kernels/reference.py (contiguous; complex as (re, im)
pairs): pair p of a level owns 4 (real) or 8 (complex) consecutive numbers, a, b, c, d =
t[0,0], t[0,1], t[1,0], t[1,1].

Backward of one level y = T x on a pair (u, v): grad u = conj(a) gt + conj(c) gb, grad v =
conj(b) gt + conj(d) gb, grad a += gt conj(u), ... (torch's convention for complex autograd).
The level inputs come from the forward: either saved by it for the whole batch (`save`), or
recomputed per tile into a tile-local scratch (save = NULL). Twiddle gradients: vector
partial sums over the TR rows (and, tied, over the groups sharing a twiddle), then one lane sum
per twiddle and tile into a double accumulator. Written with GCC/clang vector extensions.
"""

from __future__ import annotations

# hsum8 / hsum4 per type: the eight (complex) or four (real) lane sums of an untied pair in the
# backward folded together, halving the lanes of pairs of vectors with __builtin_shufflevector
# (GCC >= 12, clang); one lane sum per vector otherwise
_SHUF = "__builtin_shufflevector"
HSUM8 = {
    "float": r"""#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define LO4 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define LO2 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define HI2 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
    vec_f32 h[4], q[2], o;
    for (int k = 0; k < 4; k++)
        h[k] = SHUF(v[2 * k], v[2 * k + 1], LO8) + SHUF(v[2 * k], v[2 * k + 1], HI8);
    for (int k = 0; k < 2; k++)
        q[k] = SHUF(h[2 * k], h[2 * k + 1], LO4) + SHUF(h[2 * k], h[2 * k + 1], HI4);
    o = SHUF(q[0], q[1], LO2) + SHUF(q[0], q[1], HI2);
    for (int k = 0; k < 8; k++) acc[k] += (double)(o[2 * k] + o[2 * k + 1]);
#undef LO8
#undef HI8
#undef LO4
#undef HI4
#undef LO2
#undef HI2
#else
    for (int k = 0; k < 8; k++) acc[k] += hsum_f32(v[k]);
#endif""".replace("SHUF", _SHUF),
    "double": r"""#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    vec_f64 h[4], q[2];
    for (int k = 0; k < 4; k++)
        h[k] = SHUF(v[2 * k], v[2 * k + 1], 0, 1, 2, 3, 8, 9, 10, 11)
               + SHUF(v[2 * k], v[2 * k + 1], 4, 5, 6, 7, 12, 13, 14, 15);
    for (int k = 0; k < 2; k++)
        q[k] = SHUF(h[2 * k], h[2 * k + 1], 0, 1, 4, 5, 8, 9, 12, 13)
               + SHUF(h[2 * k], h[2 * k + 1], 2, 3, 6, 7, 10, 11, 14, 15);
    for (int k = 0; k < 8; k++) acc[k] += q[k / 4][2 * (k % 4)] + q[k / 4][2 * (k % 4) + 1];
#else
    for (int k = 0; k < 8; k++) acc[k] += hsum_f64(v[k]);
#endif""".replace("SHUF", _SHUF),
}
HSUM4 = {
    "float": r"""#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    vec_f32 h0 = SHUF(v[0], v[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                 + SHUF(v[0], v[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec_f32 h1 = SHUF(v[2], v[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
                 + SHUF(v[2], v[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec_f32 q = SHUF(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
                + SHUF(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    vec_f32 o = q + SHUF(q, q, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    for (int k = 0; k < 4; k++) acc[k] += (double)(o[4 * k] + o[4 * k + 1]);
#else
    for (int k = 0; k < 4; k++) acc[k] += hsum_f32(v[k]);
#endif""".replace("SHUF", _SHUF),
    "double": r"""#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
    vec_f64 h0 = SHUF(v[0], v[1], 0, 1, 2, 3, 8, 9, 10, 11)
                 + SHUF(v[0], v[1], 4, 5, 6, 7, 12, 13, 14, 15);
    vec_f64 h1 = SHUF(v[2], v[3], 0, 1, 2, 3, 8, 9, 10, 11)
                 + SHUF(v[2], v[3], 4, 5, 6, 7, 12, 13, 14, 15);
    vec_f64 q = SHUF(h0, h1, 0, 1, 4, 5, 8, 9, 12, 13) + SHUF(h0, h1, 2, 3, 6, 7, 10, 11, 14, 15);
    for (int k = 0; k < 4; k++) acc[k] += q[2 * k] + q[2 * k + 1];
#else
    for (int k = 0; k < 4; k++) acc[k] += hsum_f64(v[k]);
#endif""".replace("SHUF", _SHUF),
}

TILED_BODY = r"""
#define TR_SFX ((int64_t)(TL_BYTES / sizeof(real_t)))

/* rows [r0, r0 + rows) of x into buf (element-major); missing rows / imaginary parts are 0.
   xr, xi: real and imaginary bases (xi NULL: real input), strides s0, s1 in real_t units.
   Blocks of TB elements: the TB destination lines stay in L1 while every row fills them. */
#define TB 16
static void tl_load_SFX(const real_t *xr, const real_t *xi, int64_t s0, int64_t s1, int64_t r0,
                        int64_t rows, int64_t n, int cplx, real_t *buf)
{
    const int64_t R = TR_SFX;
    if (rows < R || (cplx && !xi))
        memset(buf, 0, (size_t)(n * R * (cplx ? 2 : 1)) * sizeof(real_t));
    for (int64_t i0 = 0; i0 < n; i0 += TB) {
        const int64_t i1 = i0 + TB < n ? i0 + TB : n;
        for (int64_t r = 0; r < rows; r++) {
            const real_t *row = xr + (r0 + r) * s0;
            for (int64_t i = i0; i < i1; i++) buf[i * R + r] = row[i * s1];
        }
        if (cplx && xi) {
            real_t *bi = buf + n * R;
            for (int64_t r = 0; r < rows; r++) {
                const real_t *rowi = xi + (r0 + r) * s0;
                for (int64_t i = i0; i < i1; i++) bi[i * R + r] = rowi[i * s1];
            }
        }
    }
}

/* buf's first `rows` rows into y (yi NULL: real part only), in blocks of TB elements. */
static void tl_store_SFX(const real_t *buf, int64_t n, int cplx, int64_t r0, int64_t rows,
                         real_t *yr, real_t *yi, int64_t s0, int64_t s1)
{
    const int64_t R = TR_SFX;
    for (int64_t i0 = 0; i0 < n; i0 += TB) {
        const int64_t i1 = i0 + TB < n ? i0 + TB : n;
        for (int64_t r = 0; r < rows; r++) {
            real_t *row = yr + (r0 + r) * s0;
            for (int64_t i = i0; i < i1; i++) row[i * s1] = buf[i * R + r];
        }
        if (cplx && yi) {
            const real_t *bi = buf + n * R;
            for (int64_t r = 0; r < rows; r++) {
                real_t *rowi = yi + (r0 + r) * s0;
                for (int64_t i = i0; i < i1; i++) rowi[i * s1] = bi[i * R + r];
            }
        }
    }
}
#undef TB

/* One level of stride s: src -> dst (dst may be src). tw: the level's first 2x2. */
static void tl_fwd_real_SFX(const real_t *src, real_t *dst, int64_t n, int64_t s,
                            const real_t *tw, int tied)
{
    const int64_t R = TR_SFX;
    for (int64_t g = 0; g < n / (2 * s); g++) {
        for (int64_t j = 0; j < s; j++) {
            const int64_t i = 2 * s * g + j;
            const real_t *t = tw + 4 * (tied ? j : g * s + j);
            const real_t a = t[0], b = t[1], c = t[2], d = t[3];
            const real_t *u = src + i * R, *v = src + (i + s) * R;
            real_t *yu = dst + i * R, *yv = dst + (i + s) * R;
#pragma omp simd
            for (int64_t r = 0; r < R; r++) {
                const real_t p = u[r], q = v[r];
                yu[r] = a * p + b * q;
                yv[r] = c * p + d * q;
            }
        }
    }
}

static void tl_fwd_cplx_SFX(const real_t *src, real_t *dst, int64_t n, int64_t s,
                            const real_t *tw, int tied)
{
    const int64_t R = TR_SFX, nr = n * R;
    for (int64_t g = 0; g < n / (2 * s); g++) {
        for (int64_t j = 0; j < s; j++) {
            const int64_t i = 2 * s * g + j;
            const real_t *t = tw + 8 * (tied ? j : g * s + j);
            const real_t ar = t[0], ai = t[1], br = t[2], bi = t[3];
            const real_t cr = t[4], ci = t[5], dr = t[6], di = t[7];
            const real_t *ur = src + i * R, *vr = src + (i + s) * R;
            const real_t *ui = ur + nr, *vi = vr + nr;
            real_t *yur = dst + i * R, *yvr = dst + (i + s) * R;
            real_t *yui = yur + nr, *yvi = yvr + nr;
#pragma omp simd
            for (int64_t r = 0; r < R; r++) {
                const real_t pr = ur[r], pi = ui[r], qr = vr[r], qi = vi[r];
                yur[r] = (ar * pr - ai * pi) + (br * qr - bi * qi);
                yui[r] = (ar * pi + ai * pr) + (br * qi + bi * qr);
                yvr[r] = (cr * pr - ci * pi) + (dr * qr - di * qi);
                yvi[r] = (cr * pi + ci * pr) + (dr * qi + di * qr);
            }
        }
    }
}

typedef real_t vec_SFX __attribute__((vector_size(TL_BYTES)));
typedef real_t quad_SFX __attribute__((vector_size(16)));
INLINE vec_SFX ld_SFX(const real_t *p) { vec_SFX v; memcpy(&v, p, sizeof v); return v; }
INLINE void st_SFX(real_t *p, vec_SFX v) { memcpy(p, &v, sizeof v); }

/* The sum of a tile vector's TR lanes: halve in 16-byte vectors, then the last lanes. */
INLINE double hsum_SFX(vec_SFX v)
{
    quad_SFX q[TL_BYTES / 16];
    memcpy(q, &v, sizeof v);
    for (int h = TL_BYTES / 32; h >= 1; h /= 2)
        for (int k = 0; k < h; k++) q[k] += q[k + h];
    double sum = 0;
    for (int k = 0; k < (int)(16 / sizeof(real_t)); k++) sum += q[0][k];
    return sum;
}

/* acc[k] += the lane sum of v[k] for k < 8, k < 4 (the per-type code of csource_tiled.HSUM8) */
INLINE void hsum8_SFX(const vec_SFX *v, double *acc)
{
HSUM8_IMPL
}

INLINE void hsum4_SFX(const vec_SFX *v, double *acc)
{
HSUM4_IMPL
}

/* Backward of one level: x = its input, g = grad of its output, replaced in place by the grad
   of its input; gacc += the level's twiddle gradient if want. Tied levels run j outer, g inner
   so that the sums over a twiddle's groups stay in registers (one lane sum per twiddle). */
INLINE void tl_bwd_real_body_SFX(const real_t *x, real_t *g, int64_t n, int64_t s,
                                 const real_t *tw, int tied, double *gacc, int want)
{
    const int64_t R = TR_SFX, groups = n / (2 * s);
    const int64_t outer = tied ? s : groups, inner = tied ? groups : s;
    for (int64_t o = 0; o < outer; o++) {
        vec_SFX sa = {0}, sb = {0}, sc = {0}, sd = {0};
        for (int64_t q = 0; q < inner; q++) {
            const int64_t gr = tied ? q : o, j = tied ? o : q;
            const int64_t i = 2 * s * gr + j, p = tied ? j : gr * s + j;
            const real_t *t = tw + 4 * p;
            const real_t a = t[0], b = t[1], c = t[2], d = t[3];
            const vec_SFX gt = ld_SFX(g + i * R), gb = ld_SFX(g + (i + s) * R);
            st_SFX(g + i * R, a * gt + c * gb);
            st_SFX(g + (i + s) * R, b * gt + d * gb);
            if (want) {
                const vec_SFX u = ld_SFX(x + i * R), v = ld_SFX(x + (i + s) * R);
                sa += gt * u; sb += gt * v; sc += gb * u; sd += gb * v;
                if (!tied) {
                    const vec_SFX four[4] = {sa, sb, sc, sd};
                    hsum4_SFX(four, gacc + 4 * p);
                    sa = sb = sc = sd = (vec_SFX){0};
                }
            }
        }
        if (want && tied) {
            double *acc = gacc + 4 * o;
            acc[0] += hsum_SFX(sa); acc[1] += hsum_SFX(sb);
            acc[2] += hsum_SFX(sc); acc[3] += hsum_SFX(sd);
        }
    }
}

INLINE void tl_bwd_cplx_body_SFX(const real_t *x, real_t *g, int64_t n, int64_t s,
                                 const real_t *tw, int tied, double *gacc, int want)
{
    const int64_t R = TR_SFX, nr = n * R, groups = n / (2 * s);
    const int64_t outer = tied ? s : groups, inner = tied ? groups : s;
    for (int64_t o = 0; o < outer; o++) {
        vec_SFX acc8[8] = {{0}};
        for (int64_t q = 0; q < inner; q++) {
            const int64_t gr = tied ? q : o, j = tied ? o : q;
            const int64_t i = 2 * s * gr + j, p = tied ? j : gr * s + j;
            const real_t *t = tw + 8 * p;
            const real_t ar = t[0], ai = t[1], br = t[2], bi = t[3];
            const real_t cr = t[4], ci = t[5], dr = t[6], di = t[7];
            real_t *gur = g + i * R, *gvr = g + (i + s) * R;
            const vec_SFX tr = ld_SFX(gur), ti = ld_SFX(gur + nr);
            const vec_SFX br_ = ld_SFX(gvr), bi_ = ld_SFX(gvr + nr);
            /* grad u = conj(a) gt + conj(c) gb, grad v = conj(b) gt + conj(d) gb */
            st_SFX(gur, (ar * tr + ai * ti) + (cr * br_ + ci * bi_));
            st_SFX(gur + nr, (ar * ti - ai * tr) + (cr * bi_ - ci * br_));
            st_SFX(gvr, (br * tr + bi * ti) + (dr * br_ + di * bi_));
            st_SFX(gvr + nr, (br * ti - bi * tr) + (dr * bi_ - di * br_));
            if (want) {
                const real_t *ur = x + i * R, *vr = x + (i + s) * R;
                const vec_SFX pr = ld_SFX(ur), pi = ld_SFX(ur + nr);
                const vec_SFX qr = ld_SFX(vr), qi = ld_SFX(vr + nr);
                /* grad a += gt conj(u), b: gt conj(v), c: gb conj(u), d: gb conj(v) */
                acc8[0] += tr * pr + ti * pi; acc8[1] += ti * pr - tr * pi;
                acc8[2] += tr * qr + ti * qi; acc8[3] += ti * qr - tr * qi;
                acc8[4] += br_ * pr + bi_ * pi; acc8[5] += bi_ * pr - br_ * pi;
                acc8[6] += br_ * qr + bi_ * qi; acc8[7] += bi_ * qr - br_ * qi;
                if (!tied) {
                    double *acc = gacc + 8 * p;
                    hsum8_SFX(acc8, acc);
                    for (int k = 0; k < 8; k++) acc8[k] = (vec_SFX){0};
                }
            }
        }
        if (want && tied) {
            double *acc = gacc + 8 * o;
            for (int k = 0; k < 8; k++) acc[k] += hsum_SFX(acc8[k]);
        }
    }
}

static void tl_bwd_SFX(const real_t *x, real_t *g, int64_t n, int64_t s, const real_t *tw,
                       int tied, double *gacc, int cplx)
{
    if (cplx) {
        if (gacc) tl_bwd_cplx_body_SFX(x, g, n, s, tw, tied, gacc, 1);
        else tl_bwd_cplx_body_SFX(x, g, n, s, tw, tied, gacc, 0);
    } else {
        if (gacc) tl_bwd_real_body_SFX(x, g, n, s, tw, tied, gacc, 1);
        else tl_bwd_real_body_SFX(x, g, n, s, tw, tied, gacc, 0);
    }
}

/* Level k of the sequence (block k / m, in stride order): its stride and twiddle offset. */
static int64_t tl_level_SFX(int64_t k, int64_t n, int64_t m, int tied, int increasing,
                            int cplx, int64_t *tw_off)
{
    const int64_t b = k / m, li = k % m, l = increasing ? li : m - 1 - li;
    const int64_t s = (int64_t)1 << l, nc = cplx ? 8 : 4;
    *tw_off = nc * (tied ? b * (n - 1) + s - 1 : (b * m + l) * (n / 2));
    return s;
}

/* Whether level k is left out: each block's levels of stride below 2**skip are the identity. */
static int tl_skipped_SFX(int64_t k, int64_t m, int increasing, int64_t skip)
{
    const int64_t li = k % m;
    return (increasing ? li : m - 1 - li) < skip;
}

/* The tile buffer that holds level k's input: one past the last level before k that runs. */
static int64_t tl_in_slot_SFX(int64_t k, int64_t m, int increasing, int64_t skip)
{
    for (int64_t j = k - 1; j >= 0; j--)
        if (!tl_skipped_SFX(j, m, increasing, skip)) return j + 1;
    return 0;
}

/* y = B x for a batch, tile by tile. save (NULL or ceil(batch / TR) * L tile buffers): the
   input of every level that runs (level k's at slot tl_in_slot_*(k)), for the backward.
   a: xr, xi, xs0, xs1, yr, yi, ys0, ys1, batch, n, tw, nblocks, tied, increasing, cplx, save,
   scratch (one tile buffer), skip (levels of stride < 2**skip left out: 0 for all levels). */
void tl_forward_SFX(const int64_t *a)
{
    const real_t *xr = (const real_t *)(intptr_t)a[0], *xi = (const real_t *)(intptr_t)a[1];
    real_t *yr = (real_t *)(intptr_t)a[4], *yi = (real_t *)(intptr_t)a[5];
    const int64_t xs0 = a[2], xs1 = a[3], ys0 = a[6], ys1 = a[7], batch = a[8], n = a[9];
    const real_t *tw = (const real_t *)(intptr_t)a[10];
    const int64_t nblocks = a[11];
    const int tied = (int)a[12], inc = (int)a[13], cplx = (int)a[14];
    real_t *save = (real_t *)(intptr_t)a[15], *work = (real_t *)(intptr_t)a[16];
    const int64_t skip = a[17];
    const int64_t R = TR_SFX, m = ilog2(n), L = nblocks * m, lvl = n * R * (cplx ? 2 : 1);
    for (int64_t t = 0, r0 = 0; r0 < batch; t++, r0 += R) {
        const int64_t rows = batch - r0 < R ? batch - r0 : R;
        real_t *base = save ? save + t * L * lvl : work, *cur = base;
        tl_load_SFX(xr, xi, xs0, xs1, r0, rows, n, cplx, base);
        for (int64_t k = 0; k < L; k++) {
            if (tl_skipped_SFX(k, m, inc, skip)) continue;
            int64_t off;
            const int64_t s = tl_level_SFX(k, n, m, tied, inc, cplx, &off);
            real_t *dst = save ? (k + 1 < L ? base + (k + 1) * lvl : work) : work;
            if (cplx) tl_fwd_cplx_SFX(cur, dst, n, s, tw + off, tied);
            else tl_fwd_real_SFX(cur, dst, n, s, tw + off, tied);
            cur = dst;
        }
        tl_store_SFX(cur, n, cplx, r0, rows, yr, yi, ys0, ys1);
    }
}

/* Gradients of y = B x: gx = B^H g (stored if gxr), gtw (double, twiddle layout) += the
   twiddle gradient (if not NULL). Level inputs from save, or recomputed per tile into
   scratch (L tile buffers) when save is NULL. a: xr, xi, xs0, xs1, gr, gi, gs0, gs1, gxr, gxi,
   gxs0, gxs1, gtw, batch, n, tw, nblocks, tied, increasing, cplx, save, scratch, gwork, skip
   (as in tl_forward_*: the left-out levels pass the gradient through, their twiddles get 0). */
void tl_backward_SFX(const int64_t *a)
{
    const real_t *xr = (const real_t *)(intptr_t)a[0], *xi = (const real_t *)(intptr_t)a[1];
    const real_t *gr = (const real_t *)(intptr_t)a[4], *gi = (const real_t *)(intptr_t)a[5];
    real_t *gxr = (real_t *)(intptr_t)a[8], *gxi = (real_t *)(intptr_t)a[9];
    const int64_t xs0 = a[2], xs1 = a[3], gs0 = a[6], gs1 = a[7], gxs0 = a[10], gxs1 = a[11];
    double *gtw = (double *)(intptr_t)a[12];
    const int64_t batch = a[13], n = a[14];
    const real_t *tw = (const real_t *)(intptr_t)a[15];
    const int64_t nblocks = a[16];
    const int tied = (int)a[17], inc = (int)a[18], cplx = (int)a[19];
    const real_t *save = (const real_t *)(intptr_t)a[20];
    real_t *scratch = (real_t *)(intptr_t)a[21], *gw = (real_t *)(intptr_t)a[22];
    const int64_t skip = a[23];
    const int64_t R = TR_SFX, m = ilog2(n), L = nblocks * m, lvl = n * R * (cplx ? 2 : 1);
    for (int64_t t = 0, r0 = 0; r0 < batch; t++, r0 += R) {
        const int64_t rows = batch - r0 < R ? batch - r0 : R;
        const real_t *base = save ? save + t * L * lvl : scratch;
        if (!save) { /* recompute the level inputs of this tile */
            tl_load_SFX(xr, xi, xs0, xs1, r0, rows, n, cplx, scratch);
            real_t *src = scratch;
            for (int64_t k = 0; k + 1 < L; k++) {
                if (tl_skipped_SFX(k, m, inc, skip)) continue;
                int64_t off;
                const int64_t s = tl_level_SFX(k, n, m, tied, inc, cplx, &off);
                real_t *dst = scratch + (k + 1) * lvl;
                if (cplx) tl_fwd_cplx_SFX(src, dst, n, s, tw + off, tied);
                else tl_fwd_real_SFX(src, dst, n, s, tw + off, tied);
                src = dst;
            }
        }
        tl_load_SFX(gr, gi, gs0, gs1, r0, rows, n, cplx, gw);
        for (int64_t k = L - 1; k >= 0; k--) {
            if (tl_skipped_SFX(k, m, inc, skip)) continue;
            int64_t off;
            const int64_t s = tl_level_SFX(k, n, m, tied, inc, cplx, &off);
            const real_t *in = base + tl_in_slot_SFX(k, m, inc, skip) * lvl;
            tl_bwd_SFX(in, gw, n, s, tw + off, tied, gtw ? gtw + off : NULL, cplx);
        }
        if (gxr) tl_store_SFX(gw, n, cplx, r0, rows, gxr, gxi, gxs0, gxs1);
    }
}

int64_t tl_rows_SFX(void) { return TR_SFX; }
"""
