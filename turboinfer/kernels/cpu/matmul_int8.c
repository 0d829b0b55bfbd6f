/* The int8 matmul with group-wise scales and zeros (the step's int8 layers, the int8 output projection), and
 * the Q8_0 tied output projection.
 * Part of decode.c, which #includes it after ti_decode.h and the parts before it: not compiled alone.
 */

/* x is quantized to int16 per row as for the output projection below (|error| <= max|x| / 65534); each 32 codes of
 * a weight row are one int16 multiply-add against it, giving 16 partial sums of which lanes 0-7 belong to the first
 * 16 inputs and 8-15 to the next 16, so a vector of the one or two group scales turns them into float. Zeros add
 * sum_g z_g xsum_g with float sums of x (exact). A task is a block of 16 weight rows for up to 4 rows of x, so each
 * weight byte is read from memory once per 4 rows of x. */
#define I8_ROWS 16

static void i8_block(const int16_t *xq, const float *dx, const float *xsum, int mc, int K, int group,
                     const int8_t *q, const float *scale, const float *zero, int n0, int n1, float *y, int ldy) {
    const int ng = K / group;
    for (int n = n0; n < n1; n++) {
        const int8_t *w = q + (size_t)n * K;
        const float *sc = scale + (size_t)n * ng;
        float sums[4] = {0, 0, 0, 0};
#ifdef __AVX512BW__
        __m512 acc[4];
        for (int m = 0; m < 4; m++) acc[m] = _mm512_setzero_ps();
        for (int c = 0; c < K / 32; c++) {
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32 * c)));
            __m512 sv = group == 32 ? _mm512_set1_ps(sc[c])
                                    : _mm512_insertf32x8(_mm512_set1_ps(sc[2 * c]), _mm256_set1_ps(sc[2 * c + 1]), 1);
            for (int m = 0; m < mc; m++) {
                __m512i xv = _mm512_loadu_si512(xq + (size_t)m * K + 32 * c);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(wv, xv)), sv, acc[m]);
            }
        }
        for (int m = 0; m < mc; m++) sums[m] = _mm512_reduce_add_ps(acc[m]) * dx[m];
#else
        for (int g = 0; g < ng; g++) {
            for (int m = 0; m < mc; m++) {
                int32_t t = 0;
                for (int k = g * group; k < (g + 1) * group; k++) t += (int32_t)w[k] * xq[(size_t)m * K + k];
                sums[m] += (float)t * sc[g];
            }
        }
        for (int m = 0; m < mc; m++) sums[m] *= dx[m];
#endif
        if (zero) {
            const float *z = zero + (size_t)n * ng;
            for (int m = 0; m < mc; m++) {
                float t = 0;
                for (int g = 0; g < ng; g++) t += z[g] * xsum[(size_t)m * ng + g];
                sums[m] += t;
            }
        }
        for (int m = 0; m < mc; m++) y[(size_t)m * ldy + n] = sums[m];
    }
}

/* Rows lo .. hi - 1 of x [*, K] as int16: xq = round(x / dx) with dx = max|x| / 32767 per row (|error| <= max|x| /
 * 65534, finer than the bf16 rounding of torch's kernels). With xsum, also the float sum of each group of `group`
 * inputs (xsum [*, K / group]), which carries a layer's zero points exactly. */
static void quantize_rows(const float *x, int lo, int hi, int K, int group, int16_t *xq, float *dx, float *xsum) {
    for (int m = lo; m < hi; m++) {
        const float *xm = x + (size_t)m * K;
        float amax = 0;
        for (int i = 0; i < K; i++) amax = fabsf(xm[i]) > amax ? fabsf(xm[i]) : amax;
        dx[m] = amax > 0 ? amax / 32767.f : 1.f;
        for (int i = 0; i < K; i++) xq[(size_t)m * K + i] = (int16_t)lrintf(xm[i] / dx[m]);
        if (xsum)
            for (int g = 0; g < K / group; g++) {
                float t = 0;
                for (int k = g * group; k < (g + 1) * group; k++) t += xm[k];
                xsum[(size_t)m * (K / group) + g] = t;
            }
    }
}

/* Called by every thread of the team. xq: [M, K] int16 scratch; dx: [M]; xsum: [M, K / group]. */
static void i8_matmul(Team *team, const float *x, int M, int K, int N, int group, const int8_t *q, const float *scale,
                      const float *zero, const void *bias, int bias_bf16, float *y, int ldy, float *xsum, int16_t *xq,
                      float *dx) {
    int lo, hi;
    const int ng = K / group;
    span(team, M, &lo, &hi);
    quantize_rows(x, lo, hi, K, group, xq, dx, zero ? xsum : NULL);
    barrier(team);
    int nblocks = (N + I8_ROWS - 1) / I8_ROWS, mchunks = (M + 3) / 4;
    span(team, nblocks * mchunks, &lo, &hi);
    for (int t = lo; t < hi; t++) {
        int nb = t / mchunks, m0 = (t % mchunks) * 4, mc = M - m0 < 4 ? M - m0 : 4;
        int n0 = nb * I8_ROWS, n1 = n0 + I8_ROWS < N ? n0 + I8_ROWS : N;
        i8_block(xq + (size_t)m0 * K, dx + m0, xsum + (size_t)m0 * ng, mc, K, group, q, scale, zero, n0, n1,
                 y + (size_t)m0 * ldy, ldy);
        if (bias)
            for (int m = m0; m < m0 + mc; m++)
                for (int j = n0; j < n1; j++) y[(size_t)m * ldy + j] += load_w(bias, j, bias_bf16);
    }
    barrier(team);
}

/* ---------------------------------------------------------------- Q8_0 tied output projection */
/* x is first quantized to int16 with one scale per row (|error| <= max|x| / 65534, finer than the bf16 rounding
 * the PyTorch path applies); then each (row, group of 32) is one int16 multiply-add of the codes, and the group
 * scale is applied to the 16 partial sums. Rows go 16 at a time through all groups so their accumulators stay in
 * registers while 512 contiguous bytes of each group's table stream in (prefetched four chunks ahead: 18
 * interleaved streams are more than the hardware prefetcher follows well). */
#define LOGIT_ROWS 16
static float q8_logit_row(const float *x, int H, int V, const int8_t *codes, const uint16_t *scales, int r) {
    float s = 0;
    for (int g = 0; g < H / 32; g++) {
        const int8_t *c = codes + ((size_t)g * V + r) * 32;
        float t = 0;
        for (int j = 0; j < 32; j++) t += c[j] * x[g * 32 + j];
        s += t * f16_to_f32(scales[(size_t)g * V + r]);
    }
    return s;
}

#ifdef __AVX512BW__
/* Rows r0 .. r0 + 15 of the table against row m0 of x (and m0 + 1 when two): inlined with `two` a constant. */
static inline __attribute__((always_inline)) void logit_chunk(const int16_t *xq, const float *dx, int H, int V,
                                                              const int8_t *codes, const uint16_t *scales, int r0,
                                                              int m0, const int two, float *out) {
    __m512 acc0[LOGIT_ROWS], acc1[LOGIT_ROWS];
    for (int r = 0; r < LOGIT_ROWS; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int g = 0; g < H / 32; g++) {
        __m512i x0 = _mm512_loadu_si512(xq + (size_t)m0 * H + g * 32);
        __m512i x1 = two ? _mm512_loadu_si512(xq + (size_t)(m0 + 1) * H + g * 32) : x0;
        const int8_t *c = codes + ((size_t)g * V + r0) * 32;
        float d[LOGIT_ROWS];
        _mm512_storeu_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + (size_t)g * V + r0))));
        for (int l = 0; l < LOGIT_ROWS * 32; l += 64)  /* the same group's rows four chunks ahead */
            _mm_prefetch((const char *)c + 4 * LOGIT_ROWS * 32 + l, _MM_HINT_T0);
        for (int r = 0; r < LOGIT_ROWS; r++) {
            __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(c + r * 32)));
            __m512 dr = _mm512_set1_ps(d[r]);
            acc0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w, x0)), dr, acc0[r]);
            if (two) acc1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w, x1)), dr, acc1[r]);
        }
    }
    for (int r = 0; r < LOGIT_ROWS; r++) {
        out[(size_t)m0 * V + r0 + r] = _mm512_reduce_add_ps(acc0[r]) * dx[m0];
        if (two) out[(size_t)(m0 + 1) * V + r0 + r] = _mm512_reduce_add_ps(acc1[r]) * dx[m0 + 1];
    }
}
#endif

static void q8_logits(Team *team, const float *x, int M, int H, int V, const int8_t *codes, const uint16_t *scales,
                      float *out, int16_t *xq, float *dx) {
    int nchunks = V / LOGIT_ROWS, lo, hi;
#ifdef __AVX512BW__
    span(team, M, &lo, &hi);
    quantize_rows(x, lo, hi, H, 32, xq, dx, NULL);
    barrier(team);
    int mpairs = (M + 1) / 2;
    span(team, nchunks * mpairs, &lo, &hi);
    for (int t = lo; t < hi; t++) {  /* pairs of rows of x over one chunk of the table, then the next */
        int r0 = (t / mpairs) * LOGIT_ROWS, m0 = (t % mpairs) * 2;
        if (m0 + 1 < M)
            logit_chunk(xq, dx, H, V, codes, scales, r0, m0, 1, out);
        else  /* a row of x alone (batch 1): half the registers, so nothing spills */
            logit_chunk(xq, dx, H, V, codes, scales, r0, m0, 0, out);
    }
#else
    (void)xq, (void)dx;
    span(team, nchunks * M, &lo, &hi);
    for (int t = lo; t < hi; t++) {
        int r0 = (t % nchunks) * LOGIT_ROWS, m = t / nchunks;
        for (int r = r0; r < r0 + LOGIT_ROWS; r++)
            out[(size_t)m * V + r] = q8_logit_row(x + (size_t)m * H, H, V, codes, scales, r);
    }
#endif
    for (int m = 0; m < M && team->tid == 0; m++)  /* rows past the last whole chunk */
        for (int r = nchunks * LOGIT_ROWS; r < V; r++)
            out[(size_t)m * V + r] = q8_logit_row(x + (size_t)m * H, H, V, codes, scales, r);
    barrier(team);
}
