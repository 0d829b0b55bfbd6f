/* The int4 matmul over torch's CPU packing (the step's int4 layers), and its conversion to bf16 for prefill.
 * Part of decode.c, which #includes it after ti_decode.h and the parts before it: not compiled alone.
 */

/* y[m, n] = sum_k x[m, k] W[n, k] for the 64 outputs of row-block nb, m < mc (<= 4). xsum[m, g] = sum of x over
 * group g, which carries the zero points: W = q s + (z8 - 8 s) so y = sum_g s_g (x_g . q_g) + (z8 - 8 s)_g xsum_g. */
static void q4_block(const float *x, int ldx, const float *xsum, int ldxs, int mc, int K, int N, int group,
                     const uint8_t *w, const uint16_t *sz, int nb, float *y, int ldy) {
    const uint8_t *base = w + (size_t)nb * K * 32;
#ifdef __AVX512F__
    __m512 acc[4][4];
    for (int m = 0; m < 4; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    const __m512i lo = _mm512_set1_epi32(15);
    for (int g = 0; g < K / group; g++) {
        __m512 ga[4][4];
        for (int m = 0; m < 4; m++)
            for (int j = 0; j < 4; j++) ga[m][j] = _mm512_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k++) {
            const uint8_t *p = base + (size_t)k * 32;
            __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));       /* outputs 0..15 | 32..47 */
            __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))); /* 16..31 | 48..63 */
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, lo));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, lo));
            __m512 w2 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4));
            __m512 w3 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4));
            for (int m = 0; m < mc; m++) {
                __m512 xb = _mm512_set1_ps(x[(size_t)m * ldx + k]);
                ga[m][0] = _mm512_fmadd_ps(w0, xb, ga[m][0]);
                ga[m][1] = _mm512_fmadd_ps(w1, xb, ga[m][1]);
                ga[m][2] = _mm512_fmadd_ps(w2, xb, ga[m][2]);
                ga[m][3] = _mm512_fmadd_ps(w3, xb, ga[m][3]);
            }
        }
        const uint32_t *pz = (const uint32_t *)(sz + ((size_t)g * N + (size_t)nb * 64) * 2);
        for (int j = 0; j < 4; j++) {
            __m512i pair = _mm512_loadu_si512(pz + 16 * j);  /* (s, z8) bf16 pairs of 16 outputs */
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
            __m512 z8 = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u)));
            __m512 z = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z8);
            for (int m = 0; m < mc; m++) {
                acc[m][j] = _mm512_fmadd_ps(ga[m][j], s, acc[m][j]);
                acc[m][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[(size_t)m * ldxs + g]), acc[m][j]);
            }
        }
    }
    for (int m = 0; m < mc; m++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(y + (size_t)m * ldy + nb * 64 + 16 * j, acc[m][j]);
#else
    float acc[4][64], ga[4][64];
    memset(acc, 0, sizeof acc);
    for (int g = 0; g < K / group; g++) {
        memset(ga, 0, sizeof ga);
        for (int k = g * group; k < (g + 1) * group; k++) {
            const uint8_t *p = base + (size_t)k * 32;
            for (int m = 0; m < mc; m++) {
                float xv = x[(size_t)m * ldx + k];
                for (int j = 0; j < 32; j++) {
                    ga[m][j] += xv * (float)(p[j] & 15);
                    ga[m][j + 32] += xv * (float)(p[j] >> 4);
                }
            }
        }
        const uint16_t *pz = sz + ((size_t)g * N + (size_t)nb * 64) * 2;
        for (int j = 0; j < 64; j++) {
            float s = bf16_to_f32(pz[2 * j]), z = bf16_to_f32(pz[2 * j + 1]) - 8.f * s;
            for (int m = 0; m < mc; m++) acc[m][j] += ga[m][j] * s + z * xsum[(size_t)m * ldxs + g];
        }
    }
    for (int m = 0; m < mc; m++)
        for (int j = 0; j < 64; j++) y[(size_t)m * ldy + nb * 64 + j] = acc[m][j];
#endif
}

/* Called by every thread of the team: row-blocks are split across threads, then all wait. With in_scale, x is
 * first scaled per input feature into xs. */
static void q4_matmul(Team *team, const float *x, int M, int K, int N, int group, const uint8_t *w,
                      const uint16_t *sz, const void *bias, int bias_bf16, const float *in_scale, float *xs,
                      float *y, int ldy, float *xsum) {
    int lo, hi;
    if (in_scale) {
        span(team, M * K, &lo, &hi);
        for (int i = lo; i < hi; i++) xs[i] = x[i] * in_scale[i % K];
        barrier(team);
        x = xs;
    }
    span(team, M * (K / group), &lo, &hi);
    for (int i = lo; i < hi; i++) {
        int m = i / (K / group), g = i % (K / group);
        float s = 0;
        for (int k = g * group; k < (g + 1) * group; k++) s += x[(size_t)m * K + k];
        xsum[i] = s;
    }
    barrier(team);
    int nblocks = N / 64, mchunks = (M + 3) / 4;
    span(team, nblocks * mchunks, &lo, &hi);
    for (int t = lo; t < hi; t++) {
        /* consecutive t share a row-block, so its weights are read from memory once and from cache after */
        int nb = t / mchunks, m0 = (t % mchunks) * 4, mc = M - m0 < 4 ? M - m0 : 4;
        q4_block(x + (size_t)m0 * K, K, xsum + (size_t)m0 * (K / group), K / group, mc, K, N, group, w, sz, nb,
                 y + (size_t)m0 * ldy, ldy);
        if (bias)
            for (int m = m0; m < m0 + mc; m++)
                for (int j = nb * 64; j < nb * 64 + 64; j++) y[(size_t)m * ldy + j] += load_w(bias, j, bias_bf16);
    }
    barrier(team);
}

/* ---------------------------------------------------------------- int4 -> bf16, for prefill */
/* W^T as bf16 [K, N] (row k: the N weights of input k, so each block of 64 outputs is one contiguous store) for
 * row-blocks nb0 .. nb1 - 1 of the packed weight; out points at column nb0 * 64 of row 0, row stride ldo. A prefill
 * of many tokens then runs torch's dense bf16 matmul, several times faster than the int4 kernel where the CPU has
 * bf16 dot products. Rounding to nearest even, as torch converts. */
typedef struct {
    const uint8_t *w;
    const uint16_t *sz;
    int N, K, group, nb0, nb1, ldo;
    uint16_t *out;
} Dequant4;

static void dequant4_body(void *arg, Team *team) {
    const Dequant4 *c = arg;
    int lo, hi;
    span(team, c->nb1 - c->nb0, &lo, &hi);
    for (int b = lo; b < hi; b++) {
        const int nb = c->nb0 + b;
        const uint8_t *base = c->w + (size_t)nb * c->K * 32;
        uint16_t *dst = c->out + (size_t)b * 64;
        for (int g = 0; g < c->K / c->group; g++) {
            const uint16_t *pz = c->sz + ((size_t)g * c->N + (size_t)nb * 64) * 2;
#ifdef __AVX512BW__
            __m512 s[4], z[4];
            for (int j = 0; j < 4; j++) {
                __m512i pair = _mm512_loadu_si512(pz + 32 * j);
                s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
                z[j] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s[j],
                                        _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32((int)0xffff0000u))));
            }
            const __m512i lo4 = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
            for (int k = g * c->group; k < (g + 1) * c->group; k++) {
                const uint8_t *p = base + (size_t)k * 32;
                __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
                __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16)));
                __m512i q[4] = {_mm512_and_si512(b0, lo4), _mm512_and_si512(b1, lo4), _mm512_srli_epi32(b0, 4),
                                _mm512_srli_epi32(b1, 4)};
                for (int j = 0; j < 4; j++) {
                    __m512i u = _mm512_castps_si512(_mm512_fmadd_ps(_mm512_cvtepi32_ps(q[j]), s[j], z[j]));
                    u = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
                    _mm256_storeu_si256((__m256i *)(dst + (size_t)k * c->ldo + 16 * j),
                                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
                }
            }
#else
            for (int k = g * c->group; k < (g + 1) * c->group; k++)
                for (int j = 0; j < 64; j++) {
                    uint8_t byte = base[(size_t)k * 32 + (j & 31)];
                    float sj = bf16_to_f32(pz[2 * j]), z8 = bf16_to_f32(pz[2 * j + 1]);
                    float q = (float)(j < 32 ? byte & 15 : byte >> 4);
                    dst[(size_t)k * c->ldo + j] = f32_to_bf16((q - 8.f) * sj + z8);
                }
#endif
        }
    }
}
