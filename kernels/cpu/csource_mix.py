"""C source of the relaxed-permutation kernel (appended to csource.c_source()).

A relaxed permutation (kernels/permutation.py) with fixed probabilities is a chain of steps
S(x)[i] = ca[i] x[i] + cb[i] x[q[i]] (two per level: even/odd, then the half reversals), the
same products and sum that torch computes for (1 - p) x + p y. mix_* runs the chain on each
row (complex rows as 2n interleaved reals, with the steps widened to match), ping-ponging
between the output row and a scratch row so that the last step lands in the output.
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
"""
