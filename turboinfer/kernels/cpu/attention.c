/* Paged attention, split-KV (Flash-Decoding): a task is one (sequence, KV head, slice of the context); then
 * the slices' partial softmaxes are merged; and the store of a token's new K/V into the cache.
 * Part of decode.c, which #includes it after ti_decode.h and the parts before it: not compiled alone.
 */

#ifdef __AVX512F__
static inline __m512 load16_kv(const void *kv, int kind, int i) {  /* 16 cache values as float32 (int8: codes) */
    if (kind == KV_BFLOAT16) {
        __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)kv + i)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    }
    if (kind == KV_INT8)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)kv + i))));
    return _mm512_loadu_ps((const float *)kv + i);
}
#endif

static inline float load_kv(const void *kv, int kind, int i) {
    if (kind == KV_INT8) return (float)((const int8_t *)kv)[i];
    return load_w(kv, i, kind == KV_BFLOAT16);
}

/* Where K/V of one KV head live: codes plus, for int8, the per-(token, head) scales. */
typedef struct {
    const char *k, *v;
    const float *k_scale, *v_scale;
    size_t row_bytes, head_bytes, head_len;  /* bytes of a token's row, where this head starts in it, its length */
    int kind, num_kv_heads, head;
} KVView;

#define MAX_HEAD_DIM 256

/* One token's K or V row of this head as float32 (codes times the token's scale for int8). */
static inline void load_row(const KVView *kv, const char *base, const float *scales, size_t row, int d, float *out) {
    const char *src = base + row * kv->row_bytes + kv->head_bytes;
    float sc = kv->kind == KV_INT8 ? scales[row * kv->num_kv_heads + kv->head] : 1.f;
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= d; i += 16) _mm512_storeu_ps(out + i, _mm512_mul_ps(load16_kv(src, kv->kind, i), _mm512_set1_ps(sc)));
#endif
    for (; i < d; i++) out[i] = load_kv(src, kv->kind, i) * sc;
}

/* Walks a sequence's cache rows token by token: one division at the start instead of two per token (a division by
 * a runtime block size costs tens of cycles, as much as converting a whole 64-wide row). */
typedef struct {
    const int64_t *block_table;
    int block_size, block, offset;
} RowCursor;

static inline RowCursor row_cursor(const int64_t *block_table, int block_size, int t) {
    RowCursor c = {block_table, block_size, t / block_size, t % block_size};
    return c;
}

static inline size_t next_row(RowCursor *c) {
    size_t r = (size_t)c->block_table[c->block] * c->block_size + c->offset;
    if (++c->offset == c->block_size) {
        c->offset = 0;
        c->block++;
    }
    return r;
}

/* Rows a split reads are scattered over blocks, so the hardware prefetcher loses the stream at every block edge:
 * ask for the row KV_AHEAD tokens on while converting this one. */
#define KV_AHEAD 32

static inline void prefetch_row(const KVView *kv, const char *base, size_t row) {
    const char *src = base + row * kv->row_bytes + kv->head_bytes;
    for (size_t i = 0; i < kv->head_len; i += 64) __builtin_prefetch(src + i, 0, 3);
}

static inline float dot(const float *a, const float *b, int d) {
    int i = 0;
    float s = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *x, int d, float *y) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= d; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(_mm512_set1_ps(a), _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
    for (; i < d; i++) y[i] += a * x[i];
}

/* Partials of an empty split: zero output, max -inf, sum 0 (merge_splits skips it). */
static void clear_parts(float *part, int G, int d) {
    for (int g = 0; g < G; g++) {
        memset(part + (size_t)g * (d + 2), 0, sizeof(float) * d);
        part[(size_t)g * (d + 2) + d] = -INFINITY;
        part[(size_t)g * (d + 2) + d + 1] = 0.f;
    }
}

/* Scores [G, n] -> exp(score - max) in place; each head's max and sum of exponentials into its partials. */
static void softmax_parts(float *scores, int G, int n, float *part, int d) {
    for (int g = 0; g < G; g++) {
        float *sc = scores + (size_t)g * n, mx = -INFINITY, sum = 0;
        for (int t = 0; t < n; t++) mx = sc[t] > mx ? sc[t] : mx;
        int t = 0;
#ifdef __AVX512F__
        __m512 sv = _mm512_setzero_ps();
        for (; t + 16 <= n; t += 16) {
            __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(sc + t, e);
            sv = _mm512_add_ps(sv, e);
        }
        sum = _mm512_reduce_add_ps(sv);
#endif
        for (; t < n; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        part[(size_t)g * (d + 2) + d] = mx;
        part[(size_t)g * (d + 2) + d + 1] = sum;
    }
}

/* The G query heads that share one KV head, over tokens [t0, t1) of a sequence (a split of its context): each K
 * and V row is read and converted once for all G heads. Writes, per head, the unnormalised output, the running
 * max and the sum of exponentials (Flash-Decoding's partials), as part[g * (d + 2) + {0..d-1, d, d+1}]. */
static void attend_split(const float *q, int G, const KVView *kv, const int64_t *block_table, int block_size,
                         int t0, int t1, int d, float scale, float *scores, float *part) {
    float row[MAX_HEAD_DIM];
    int n = t1 - t0;
    clear_parts(part, G, d);
    if (n <= 0) return;
    RowCursor kc = row_cursor(block_table, block_size, t0);
    for (int t = t0; t < t1; t++) {
        load_row(kv, kv->k, kv->k_scale, next_row(&kc), d, row);
        for (int g = 0; g < G; g++) scores[(size_t)g * n + (t - t0)] = dot(q + (size_t)g * d, row, d) * scale;
    }
    softmax_parts(scores, G, n, part, d);
    RowCursor vc = row_cursor(block_table, block_size, t0);
    for (int t = t0; t < t1; t++) {
        load_row(kv, kv->v, kv->v_scale, next_row(&vc), d, row);
        for (int g = 0; g < G; g++) axpy(scores[(size_t)g * n + (t - t0)], row, d, part + (size_t)g * (d + 2));
    }
}

#ifdef __AVX512F__
/* 16 vectors -> one: lane i holds the sum of v[i]'s 16 lanes (a transpose-and-add tree, ~3 operations per vector
 * instead of a horizontal reduction each). */
static inline __m512 reduce16(const __m512 *v) {
    __m512 z[4];
    for (int i = 0; i < 4; i++) {
        __m512 w0 = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * i], v[4 * i + 1]), _mm512_unpackhi_ps(v[4 * i], v[4 * i + 1]));
        __m512 w1 = _mm512_add_ps(_mm512_unpacklo_ps(v[4 * i + 2], v[4 * i + 3]),
                                  _mm512_unpackhi_ps(v[4 * i + 2], v[4 * i + 3]));
        z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(w0), _mm512_castps_pd(w1))));
    }
    __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xdd));
    __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], 0x88), _mm512_shuffle_f32x4(z[2], z[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xdd));
}

/* attend_split for head_dim = 16 * D16 with the vectors in registers: scores of 16 tokens at a time from K rows
 * converted once into an L1 tile, and each V row converted once and accumulated into up to 4 heads' outputs. */
static inline __attribute__((always_inline)) void attend_tile(const int D16, const float *q, int G, const KVView *kv,
                                                              const int64_t *block_table, int block_size, int t0,
                                                              int t1, float scale, float *scores, float *part) {
    const int d = 16 * D16, HC = D16 <= 4 ? 4 : 2;  /* heads per pass over V: HC * D16 accumulators <= 16 */
    float tile[16 * MAX_HEAD_DIM] __attribute__((aligned(64)));
    int n = t1 - t0;
    clear_parts(part, G, d);
    if (n <= 0) return;
    RowCursor kc = row_cursor(block_table, block_size, t0);
    RowCursor ka = row_cursor(block_table, block_size, t0 + KV_AHEAD < t1 ? t0 + KV_AHEAD : t0);
    for (int tb = t0; tb < t1; tb += 16) {
        int nt = t1 - tb < 16 ? t1 - tb : 16;
        for (int i = 0; i < nt; i++) {
            if (tb + i + KV_AHEAD < t1) prefetch_row(kv, kv->k, next_row(&ka));
            load_row(kv, kv->k, kv->k_scale, next_row(&kc), d, tile + i * d);
        }
        for (int g = 0; g < G; g++) {
            __m512 qv[8], acc[16];
            for (int c = 0; c < D16; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + g * d + 16 * c), _mm512_set1_ps(scale));
            for (int i = 0; i < 16; i++) {
                acc[i] = _mm512_setzero_ps();
                if (i < nt)
                    for (int c = 0; c < D16; c++) acc[i] = _mm512_fmadd_ps(qv[c], _mm512_load_ps(tile + i * d + 16 * c), acc[i]);
            }
            _mm512_mask_storeu_ps(scores + (size_t)g * n + (tb - t0), (__mmask16)((1u << nt) - 1), reduce16(acc));
        }
    }
    softmax_parts(scores, G, n, part, d);
    for (int g0 = 0; g0 < G; g0 += HC) {
        __m512 o[4][8];
        for (int gi = 0; gi < HC; gi++)
            for (int c = 0; c < D16; c++) o[gi][c] = _mm512_setzero_ps();
        RowCursor vc = row_cursor(block_table, block_size, t0);
        RowCursor va = row_cursor(block_table, block_size, t0 + KV_AHEAD < t1 ? t0 + KV_AHEAD : t0);
        for (int t = t0; t < t1; t++) {
            if (t + KV_AHEAD < t1) prefetch_row(kv, kv->v, next_row(&va));
            size_t r = next_row(&vc);
            const char *src = kv->v + r * kv->row_bytes + kv->head_bytes;
            __m512 vs = _mm512_set1_ps(kv->kind == KV_INT8 ? kv->v_scale[r * kv->num_kv_heads + kv->head] : 1.f);
            __m512 vr[8];
            for (int c = 0; c < D16; c++) vr[c] = _mm512_mul_ps(load16_kv(src, kv->kind, 16 * c), vs);
            for (int gi = 0; gi < HC; gi++) {
                if (g0 + gi >= G) break;
                __m512 pw = _mm512_set1_ps(scores[(size_t)(g0 + gi) * n + (t - t0)]);
                for (int c = 0; c < D16; c++) o[gi][c] = _mm512_fmadd_ps(pw, vr[c], o[gi][c]);
            }
        }
        for (int gi = 0; gi < HC && g0 + gi < G; gi++)
            for (int c = 0; c < D16; c++) _mm512_storeu_ps(part + (size_t)(g0 + gi) * (d + 2) + 16 * c, o[gi][c]);
    }
}
#endif

/* Dispatch: register-tiled code for the common head sizes, the general loop otherwise. */
static void attend(const float *q, int G, const KVView *kv, const int64_t *block_table, int block_size, int t0,
                   int t1, int d, float scale, float *scores, float *part) {
#ifdef __AVX512F__
    if (d == 64) return attend_tile(4, q, G, kv, block_table, block_size, t0, t1, scale, scores, part);
    if (d == 128) return attend_tile(8, q, G, kv, block_table, block_size, t0, t1, scale, scores, part);
#endif
    attend_split(q, G, kv, block_table, block_size, t0, t1, d, scale, scores, part);
}

/* Combine a head's splits: out = sum_s e^(max_s - max) out_s / sum_s e^(max_s - max) sum_s. */
static void merge_splits(const float *parts, int nsplit, size_t stride, int d, float *out) {
    float mx = -INFINITY, den = 0;
    for (int s = 0; s < nsplit; s++) mx = parts[s * stride + d] > mx ? parts[s * stride + d] : mx;
    memset(out, 0, sizeof(float) * d);
    for (int s = 0; s < nsplit; s++) {
        const float *p = parts + s * stride;
        if (p[d + 1] == 0.f) continue;  /* an empty split */
        float w = expf(p[d] - mx);
        den += w * p[d + 1];
        axpy(w, p, d, out);
    }
    for (int i = 0; i < d; i++) out[i] /= den;
}

/* One token's K or V for one head into the cache; int8 as quantize_kv: scale = max|x| / 127, codes rounded to
 * nearest even and clamped. */
static void store_head(const float *x, int d, int kind, char *dst, float *scale_dst) {
    if (kind == KV_INT8) {
        float amax = 0;
        for (int j = 0; j < d; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        float s = (amax > 1e-8f ? amax : 1e-8f) / 127.f;
        for (int j = 0; j < d; j++) {
            float c = rintf(x[j] / s);
            ((int8_t *)dst)[j] = (int8_t)(c > 127.f ? 127.f : c < -127.f ? -127.f : c);
        }
        *scale_dst = s;
    } else if (kind == KV_BFLOAT16) {
        for (int j = 0; j < d; j++) ((uint16_t *)dst)[j] = f32_to_bf16(x[j]);
    } else {
        memcpy(dst, x, sizeof(float) * d);
    }
}
