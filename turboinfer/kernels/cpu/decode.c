/* One decode step of a Llama-family model on the CPU, every layer in one call.
 *
 * Why it exists: at batch 1 a small model's decode step is ~1,600 tiny PyTorch ops, and their dispatch costs
 * more than the matmuls. Here the whole step is one call on a team of threads: the int4 matmuls read torch's own packed
 * layout (the same tensors the PyTorch path uses, so no second copy of the weights), the Q8_0 tied output
 * projection reads the embedding's int8 codes, and norms, RoPE, the KV store and paged attention are plain loops.
 * Activations stay float32 from start to end.
 *
 * Layouts (checked from Python before a model is accepted):
 *   int4 weight [N, K] : bytes [N / 64, K, 32]; byte j of row-block b at input k holds output b*64 + j in its low
 *                        nibble and output b*64 + 32 + j in its high nibble (torch's int4pack for CPU);
 *                        scales [K / group, N, 2] bf16 (s, z8) with w = (q - 8) * s + z8.
 *   int8 weight [N, K] : codes [N, K] int8 row-major, scales [N, K / group] float32, zeros the same or NULL;
 *                        w = code * scale + zero, group 16 or 32 (GGUF Q8_0 / Q5_K / Q6_K, converted exactly).
 *   Q8_0 table [V, H]  : codes [H / 32, V, 32] int8, scales [H / 32, V] float16; w = code * scale.
 *   KV cache           : [num_blocks, block_size, num_kv_heads, head_dim] in float32, bf16 or int8; int8 codes
 *                        carry float32 scales [num_blocks, block_size, num_kv_heads] (symmetric, per token and
 *                        head, as kernels/torch_ref/attention.py quantizes).
 *   rotary             : cos, sin [max_position, head_dim / 2] float32, rotate-half (HF) layout.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

enum { D_LAYERS, D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_INTER, D_VOCAB, D_BLOCK_SIZE,
       D_WINDOW, D_BF16, D_HAS_BIAS, D_LOGITS, D_MAX_SEQ, D_KV_KIND, D_LOGITS_GROUP, D_NUM_DIMS };
/* D_LOGITS: 0 the step ends with the final norm; LOGITS_Q8 the tied Q8_0 table below; LOGITS_INT8 an int8 weight
 * [vocab, hidden] with group scales (a Q6_K / Q5_K / Q8_0 output projection or tied table), group D_LOGITS_GROUP */
enum { LOGITS_NONE, LOGITS_Q8, LOGITS_INT8 };
enum { KV_F32, KV_BF16, KV_INT8 };
enum { LIN_INT4, LIN_INT8 };  /* a linear layer's weight format (see Layouts) */
enum { P_IN_NORM, P_QKV_W, P_QKV_S, P_QKV_B, P_O_W, P_O_S, P_POST_NORM, P_GU_W, P_GU_S, P_DOWN_W, P_DOWN_S,
       P_K_CACHE, P_V_CACHE, P_K_SCALE, P_V_SCALE, P_QKV_IS, P_O_IS, P_GU_IS, P_DOWN_IS,
       P_QKV_Z, P_O_Z, P_GU_Z, P_DOWN_Z, P_LIN_META, P_QKV2_W, P_QKV2_S, P_QKV2_Z, P_GU2_W, P_GU2_S, P_GU2_Z,
       P_PER_LAYER };
/* P_*_IS: AWQ input scales [K] float32 of that layer, or NULL: the layer computes (x * s) W^T (int4 only).
 * P_*_Z: an int8 layer's zeros, or NULL. P_LIN_META: int32 [14]: (format, group) of qkv, o, gate_up, down, then
 * for q|k|v and gate|up (rows of the first part, format and group of the second): rows 0 when there is one part.
 * P_QKV2_*, P_GU2_*: the second part's weight, scales and zeros. */
enum { G_FINAL_NORM, G_COS, G_SIN, G_EMB_CODES, G_EMB_SCALES, G_EMB_ZEROS, G_NUM };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's conversion */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {  /* exact, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_w(const void *p, int i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ---------------------------------------------------------------- threads
 * A step runs on a team: the calling thread plus workers that spin on sense-reversing barriers inside the step
 * and, between steps, spin briefly and then sleep on a condition variable. (OpenMP's idle threads keep spinning
 * after a region ends, taking a core from the Python side of the engine and from the server's event loop; here
 * they let go within ~0.5 ms.) The pool lives for the process; one step runs at a time. */
#define MAX_THREADS 256
#define IDLE_SPINS 20000

typedef struct {
    atomic_int count, sense;
} Barrier;

typedef struct {
    int tid, n, sense;
    Barrier *bar;
} Team;

static void barrier(Team *t) {
    if (t->n == 1) return;
    int s = !t->sense;
    t->sense = s;
    if (atomic_fetch_add_explicit(&t->bar->count, 1, memory_order_acq_rel) == t->n - 1) {
        atomic_store_explicit(&t->bar->count, 0, memory_order_relaxed);
        atomic_store_explicit(&t->bar->sense, s, memory_order_release);
    } else {
        while (atomic_load_explicit(&t->bar->sense, memory_order_acquire) != s) cpu_relax();
    }
}

/* This thread's share [lo, hi) of n iterations (static, contiguous: consecutive iterations share weights). */
static inline void span(const Team *t, int n, int *lo, int *hi) {
    *lo = (int)((long long)n * t->tid / t->n);
    *hi = (int)((long long)n * (t->tid + 1) / t->n);
}

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int num_workers, active, pid;
    atomic_uint generation;
    atomic_int finished, idle_spins;  /* idle_spins: how long workers spin for the next job after this one */
    void (*fn)(void *, Team *);
    void *arg;
    Barrier bar;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, 0, NULL, NULL, {0, 0}};
static pthread_mutex_t step_mu = PTHREAD_MUTEX_INITIALIZER;

static void *worker_main(void *arg) {
    /* arg: the generation current when the thread was created (its first step is the next one) and its id */
    int tid = (int)((uintptr_t)arg & 0xffff);
    unsigned seen = (unsigned)((uintptr_t)arg >> 16);
    for (;;) {
        const int spins = atomic_load_explicit(&pool.idle_spins, memory_order_relaxed);
        unsigned g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        for (int i = 0; i < spins && g == seen; i++) {
            cpu_relax();
            g = atomic_load_explicit(&pool.generation, memory_order_acquire);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((g = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        if (tid >= pool.active) continue;
        Team t = {tid, pool.active, 0, &pool.bar};
        pool.fn(pool.arg, &t);
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
    }
    return NULL;
}

static void after_fork_in_child(void) {  /* the workers did not come along */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&step_mu, NULL);
    pool.num_workers = 0;
}

/* Run fn on nthreads threads (this one included); returns when all have finished. Afterwards the workers spin for
 * idle_spins pauses before they sleep: decode steps follow each other within a millisecond, but a kernel called in
 * the middle of torch ops (prefill) passes 0, or the spinning workers would slow torch's own threads. */
static void run_team(int nthreads, void (*fn)(void *, Team *), void *arg, int idle_spins) {
    nthreads = nthreads < 1 ? 1 : nthreads > MAX_THREADS ? MAX_THREADS : nthreads;
    if (pool.pid != getpid()) {
        if (pool.pid == 0) pthread_atfork(NULL, NULL, after_fork_in_child);
        pool.pid = getpid();
        pool.num_workers = 0;
    }
    while (pool.num_workers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t arg = ((uintptr_t)atomic_load(&pool.generation) << 16) | (uintptr_t)(pool.num_workers + 1);
        int rc = pthread_create(&th, &attr, worker_main, (void *)arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.num_workers++;
    }
    if (nthreads > pool.num_workers + 1) nthreads = pool.num_workers + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.active = nthreads;
    atomic_store(&pool.idle_spins, idle_spins);
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.bar.count, 0);
    atomic_store(&pool.bar.sense, 0);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    Team t = {0, nthreads, 0, &pool.bar};
    fn(arg, &t);
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < nthreads - 1) cpu_relax();
}

/* ---------------------------------------------------------------- exp, for softmax and SiLU */
#ifdef __AVX512F__
static inline __m512 exp512(__m512 x) {
    /* exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2 / 2; degree-6 Taylor on r: relative error < 2e-7 */
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* ---------------------------------------------------------------- small vector ops (one thread) */
static void rms_norm(const float *x, const void *w, int bf16, int n, float eps, float *out) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float inv = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * load_w(w, i, bf16);
}

static void silu_mul(const float *gu, int inter, float *out) {  /* gu: [gate | up] */
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= inter; i += 16) {
        __m512 g = _mm512_loadu_ps(gu + i), u = _mm512_loadu_ps(gu + inter + i);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(s, u));
    }
#endif
    for (; i < inter; i++) out[i] = gu[i] / (1.f + expf(-gu[i])) * gu[inter + i];
}

static void rope(float *head, int half, const float *cos, const float *sin) {  /* rotate-half layout */
    for (int i = 0; i < half; i++) {
        float a = head[i], b = head[i + half];
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

/* ---------------------------------------------------------------- int4 matmul, torch's CPU packing */
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

int ti_int4_to_bf16(const uint8_t *w, const uint16_t *sz, int N, int K, int group, int nb0, int nb1, uint16_t *out,
                    int ldo, int nthreads) {
    if (N % 64 || K % group || nb0 < 0 || nb1 > N / 64 || nb0 > nb1) return -1;
    Dequant4 c = {w, sz, N, K, group, nb0, nb1, ldo, out};
    pthread_mutex_lock(&step_mu);
    run_team(nthreads, dequant4_body, &c, 0);
    pthread_mutex_unlock(&step_mu);
    return 0;
}

/* ---------------------------------------------------------------- int8 matmul, group-wise scales and zeros */
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

/* One linear layer of the step, whichever its format; a merged layer whose shards come in two formats has a second
 * part (rows from `rows` on, format kind2), which writes the next columns of the same output. */
typedef struct {
    int kind, group;
    const void *w, *s, *z, *is, *b;
    int rows, kind2, group2;  /* rows == 0: one part */
    const void *w2, *s2, *z2;
} Lin;

typedef struct {
    float *xs, *xsum, *dx;
    int16_t *xq;
} LinScratch;

static void linear_part(Team *team, int kind, int group, const void *w, const void *s, const void *z, const void *is,
                        const void *b, int bias_bf16, const float *x, int M, int K, int N, const LinScratch *ws,
                        float *y, int ldy) {
    if (kind == LIN_INT8)
        i8_matmul(team, x, M, K, N, group, w, s, z, b, bias_bf16, y, ldy, ws->xsum, ws->xq, ws->dx);
    else
        q4_matmul(team, x, M, K, N, group, w, s, b, bias_bf16, is, ws->xs, y, ldy, ws->xsum);
}

static void linear(Team *team, const Lin *l, const float *x, int M, int K, int N, int bias_bf16, const LinScratch *ws,
                   float *y) {
    const int n1 = l->rows ? l->rows : N;
    linear_part(team, l->kind, l->group, l->w, l->s, l->z, l->is, l->b, bias_bf16, x, M, K, n1, ws, y, N);
    if (l->rows) {
        const void *b2 = l->b ? (const char *)l->b + (size_t)n1 * (bias_bf16 ? 2 : 4) : NULL;
        linear_part(team, l->kind2, l->group2, l->w2, l->s2, l->z2, NULL, b2, bias_bf16, x, M, K, N - n1, ws, y + n1,
                    N);
    }
}

/* Standalone entry for an int8 layer outside the step (prefill of a few tokens, models the step does not take).
 * work: M * (K / 2 + K / 16 + 2) floats. */
typedef struct {
    Lin l;
    const float *x;
    int M, K, N;
    float *y;
    LinScratch ws;
} LinCall;

static void linear_body(void *arg, Team *team) {
    const LinCall *c = arg;
    linear(team, &c->l, c->x, c->M, c->K, c->N, 0, &c->ws, c->y);
}

int ti_int8_matmul(const float *x, int M, int K, int N, int group, const int8_t *q, const float *scale,
                   const float *zero, float *y, float *work, int nthreads) {
    if ((group != 16 && group != 32) || K % 32) return -1;
    LinCall c = {{LIN_INT8, group, q, scale, zero, NULL, NULL, 0, 0, 0, NULL, NULL, NULL}, x, M, K, N, y,
                 {NULL, work, NULL, NULL}};
    c.ws.dx = work + (size_t)M * (K / 16);
    c.ws.xq = (int16_t *)(c.ws.dx + M + 1);
    pthread_mutex_lock(&step_mu);
    run_team(nthreads, linear_body, &c, 0);
    pthread_mutex_unlock(&step_mu);
    return 0;
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

/* ---------------------------------------------------------------- paged attention for one query head */
#ifdef __AVX512F__
static inline __m512 load16_kv(const void *kv, int kind, int i) {  /* 16 cache values as float32 (int8: codes) */
    if (kind == KV_BF16) {
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
    return load_w(kv, i, kind == KV_BF16);
}

/* Where K/V of one KV head live: codes plus, for int8, the per-(token, head) scales. */
typedef struct {
    const char *k, *v;
    const float *k_scale, *v_scale;
    size_t row_bytes, head_bytes, head_len;  /* bytes of a token's row, where this head starts in it, its length */
    int kind, num_kv_heads, head;
} KVView;

#define MAX_HEAD_DIM 256
#define MAX_SPLITS 16

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
    } else if (kind == KV_BF16) {
        for (int j = 0; j < d; j++) ((uint16_t *)dst)[j] = f32_to_bf16(x[j]);
    } else {
        memcpy(dst, x, sizeof(float) * d);
    }
}

/* ---------------------------------------------------------------- the step */
/* dims: D_NUM_DIMS ints; fparams: eps, attn_scale; ptrs: P_PER_LAYER per layer then G_NUM globals.
 * x: [M, hidden] float32 embeddings in, final normed hidden out. positions, seq_lens: [M]; block_tables [M, bt_stride].
 * logits: [M, vocab] (when dims[D_LOGITS]). work: float32 scratch, see ti_workspace_floats. */
size_t ti_workspace_floats(const int64_t *dims, int M, int nthreads) {
    int64_t H = dims[D_HIDDEN], nh = dims[D_HEADS], nkv = dims[D_KV_HEADS], hd = dims[D_HEAD_DIM];
    int64_t I = dims[D_INTER];
    int64_t qkv = (nh + 2 * nkv) * hd;
    int64_t big = qkv > 2 * I ? qkv : 2 * I;
    int64_t kmax = H > I ? H : I;
    kmax = kmax > nh * hd ? kmax : nh * hd;
    /* res, xn, buf, ao, act | xsum (groups of 16 or more) | dx | xs (AWQ) | xq (int16) | attention partials, scores */
    return (size_t)(M * (2 * H + big + nh * hd + I + kmax / 16 + 2 + kmax + kmax / 2 + 1) +
                    M * nh * MAX_SPLITS * (hd + 2) + nthreads * (nh / nkv) * dims[D_MAX_SEQ] + 64);
}

/* Everything a thread of the step needs; filled once by ti_decode_step. */
typedef struct {
    const int64_t *dims, *positions, *seq_lens, *block_tables;
    void *const *ptrs;
    float *x, *logits, *res, *xn, *buf, *ao, *act, *parts, *scores;
    LinScratch ws;
    float eps, scale;
    int M, bt_stride, nsplit;
} Step;

static void step_body(void *arg, Team *team) {
    const Step *c = arg;
    const int64_t *dims = c->dims, *positions = c->positions, *seq_lens = c->seq_lens, *block_tables = c->block_tables;
    const int M = c->M, bt_stride = c->bt_stride, nsplit = c->nsplit;
    const int L = dims[D_LAYERS], H = dims[D_HIDDEN], nh = dims[D_HEADS], nkv = dims[D_KV_HEADS];
    const int hd = dims[D_HEAD_DIM], I = dims[D_INTER], bs = dims[D_BLOCK_SIZE];
    const int window = dims[D_WINDOW], bf16 = dims[D_BF16], max_seq = dims[D_MAX_SEQ], kv_kind = dims[D_KV_KIND];
    const int qkv_n = (nh + 2 * nkv) * hd, gsize = nh / nkv, half = hd / 2;
    const size_t el = kv_kind == KV_INT8 ? 1 : kv_kind == KV_BF16 ? 2 : 4, row_bytes = (size_t)nkv * hd * el;
    const size_t part_stride = (size_t)gsize * (hd + 2);
    void *const *glob = c->ptrs + (size_t)L * P_PER_LAYER;
    float *x = c->x, *res = c->res, *xn = c->xn, *buf = c->buf, *ao = c->ao, *act = c->act;
    float *parts = c->parts, *my_scores = c->scores + (size_t)team->tid * gsize * max_seq;
    const int tid = team->tid;
    int lo, hi;

    for (int l = 0; l < L; l++) {
        void *const *p = c->ptrs + (size_t)l * P_PER_LAYER;
        const int32_t *meta = p[P_LIN_META];
        const Lin qkv = {meta[0], meta[1], p[P_QKV_W], p[P_QKV_S], p[P_QKV_Z], p[P_QKV_IS], p[P_QKV_B],
                         meta[8], meta[9], meta[10], p[P_QKV2_W], p[P_QKV2_S], p[P_QKV2_Z]};
        const Lin o = {meta[2], meta[3], p[P_O_W], p[P_O_S], p[P_O_Z], p[P_O_IS], NULL, 0, 0, 0, NULL, NULL, NULL};
        const Lin gu = {meta[4], meta[5], p[P_GU_W], p[P_GU_S], p[P_GU_Z], p[P_GU_IS], NULL,
                        meta[11], meta[12], meta[13], p[P_GU2_W], p[P_GU2_S], p[P_GU2_Z]};
        const Lin down = {meta[6], meta[7], p[P_DOWN_W], p[P_DOWN_S], p[P_DOWN_Z], p[P_DOWN_IS], NULL,
                          0, 0, 0, NULL, NULL, NULL};
        for (int m = 0; m < M && tid == 0; m++) {
            float *xm = x + (size_t)m * H, *rm = res + (size_t)m * H;
            if (l == 0) memcpy(rm, xm, sizeof(float) * H);
            else for (int i = 0; i < H; i++) rm[i] += xm[i];
            rms_norm(rm, p[P_IN_NORM], bf16, H, c->eps, xn + (size_t)m * H);
        }
        barrier(team);
        linear(team, &qkv, xn, M, H, qkv_n, bf16, &c->ws, buf);
        /* RoPE on q and k heads, then the new K/V into the cache */
        span(team, M * (nh + nkv), &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int m = i / (nh + nkv), h = i % (nh + nkv);
            const float *cs = (const float *)glob[G_COS] + (size_t)positions[m] * half;
            const float *sn = (const float *)glob[G_SIN] + (size_t)positions[m] * half;
            rope(buf + (size_t)m * qkv_n + (size_t)h * hd, half, cs, sn);
        }
        barrier(team);
        span(team, M * nkv, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int m = i / nkv, h = i % nkv;
            int64_t pos = positions[m];
            size_t row = (size_t)block_tables[(size_t)m * bt_stride + pos / bs] * bs + pos % bs;
            const float *kn = buf + (size_t)m * qkv_n + (size_t)(nh + h) * hd, *vn = kn + (size_t)nkv * hd;
            size_t off = row * row_bytes + (size_t)h * hd * el, soff = row * nkv + h;
            store_head(kn, hd, kv_kind, (char *)p[P_K_CACHE] + off, kv_kind == KV_INT8 ? (float *)p[P_K_SCALE] + soff : NULL);
            store_head(vn, hd, kv_kind, (char *)p[P_V_CACHE] + off, kv_kind == KV_INT8 ? (float *)p[P_V_SCALE] + soff : NULL);
        }
        barrier(team);
        span(team, M * nkv * nsplit, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int m = i / (nkv * nsplit), kvh = i / nsplit % nkv, sp = i % nsplit;
            int len = (int)seq_lens[m], start = window > 0 && len > window ? len - window : 0;
            int chunk = (len - start + nsplit - 1) / nsplit, t0 = start + sp * chunk;
            int t1 = t0 + chunk < len ? t0 + chunk : len;
            KVView kv = {p[P_K_CACHE], p[P_V_CACHE], p[P_K_SCALE], p[P_V_SCALE], row_bytes, (size_t)kvh * hd * el,
                         (size_t)hd * el, kv_kind, nkv, kvh};
            attend(buf + (size_t)m * qkv_n + (size_t)kvh * gsize * hd, gsize, &kv, block_tables + (size_t)m * bt_stride,
                   bs, t0, t1, hd, c->scale, my_scores, parts + (size_t)i * part_stride);
        }
        barrier(team);
        span(team, M * nh, &lo, &hi);
        for (int i = lo; i < hi; i++) {
            int m = i / nh, h = i % nh, kvh = h / gsize, g = h % gsize;
            merge_splits(parts + ((size_t)(m * nkv + kvh) * nsplit) * part_stride + (size_t)g * (hd + 2), nsplit,
                         part_stride, hd, ao + (size_t)m * nh * hd + (size_t)h * hd);
        }
        barrier(team);
        linear(team, &o, ao, M, nh * hd, H, 0, &c->ws, x);
        for (int m = 0; m < M && tid == 0; m++) {
            float *xm = x + (size_t)m * H, *rm = res + (size_t)m * H;
            for (int i = 0; i < H; i++) rm[i] += xm[i];
            rms_norm(rm, p[P_POST_NORM], bf16, H, c->eps, xn + (size_t)m * H);
        }
        barrier(team);
        linear(team, &gu, xn, M, H, 2 * I, 0, &c->ws, buf);
        span(team, M, &lo, &hi);
        for (int m = lo; m < hi; m++) silu_mul(buf + (size_t)m * 2 * I, I, act + (size_t)m * I);
        barrier(team);
        linear(team, &down, act, M, I, H, 0, &c->ws, x);
    }
    for (int m = 0; m < M && tid == 0; m++) {
        float *xm = x + (size_t)m * H, *rm = res + (size_t)m * H;
        for (int i = 0; i < H; i++) rm[i] += xm[i];
        rms_norm(rm, glob[G_FINAL_NORM], bf16, H, c->eps, xm);
    }
    barrier(team);
    if (dims[D_LOGITS] == LOGITS_Q8)
        q8_logits(team, x, M, H, dims[D_VOCAB], glob[G_EMB_CODES], glob[G_EMB_SCALES], c->logits, c->ws.xq, c->ws.dx);
    else if (dims[D_LOGITS] == LOGITS_INT8)
        i8_matmul(team, x, M, H, dims[D_VOCAB], dims[D_LOGITS_GROUP], glob[G_EMB_CODES], glob[G_EMB_SCALES],
                  glob[G_EMB_ZEROS], NULL, 0, c->logits, dims[D_VOCAB], c->ws.xsum, c->ws.xq, c->ws.dx);
}

int ti_decode_step(const int64_t *dims, const float *fparams, void *const *ptrs, int M, float *x,
                   const int64_t *positions, const int64_t *seq_lens, const int64_t *block_tables, int bt_stride,
                   float *logits, float *work, int nthreads) {
    const int H = dims[D_HIDDEN], nh = dims[D_HEADS], nkv = dims[D_KV_HEADS], hd = dims[D_HEAD_DIM];
    const int I = dims[D_INTER], qkv_n = (nh + 2 * nkv) * hd, big = qkv_n > 2 * I ? qkv_n : 2 * I;
    int kmax = H > I ? H : I;
    kmax = kmax > nh * hd ? kmax : nh * hd;
    for (int m = 0; m < M; m++)
        if (positions[m] + 1 != seq_lens[m] || seq_lens[m] > dims[D_MAX_SEQ]) return -1;
    Step c = {dims, positions, seq_lens, block_tables, ptrs, x, logits, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
              {NULL, NULL, NULL, NULL}, fparams[0], fparams[1], M, bt_stride, 0};
    c.res = work;
    c.xn = c.res + (size_t)M * H;
    c.buf = c.xn + (size_t)M * H;  /* q|k|v, then gate|up */
    c.ao = c.buf + (size_t)M * big;
    c.act = c.ao + (size_t)M * nh * hd;
    c.ws.xsum = c.act + (size_t)M * I;  /* sums of x per group */
    c.ws.dx = c.ws.xsum + (size_t)M * (kmax / 16 + 1);  /* int16 scale of each row of x */
    c.ws.xs = c.ws.dx + (size_t)M + 1;  /* x times a layer's AWQ input scales */
    c.ws.xq = (int16_t *)(c.ws.xs + (size_t)M * kmax);  /* x as int16 */
    c.parts = c.ws.xs + (size_t)M * kmax + (size_t)M * kmax / 2 + 1;  /* [M, nkv, nsplit, G, hd + 2] partials */
    c.scores = c.parts + (size_t)M * nh * MAX_SPLITS * (hd + 2);
    /* Split each sequence's context so that there are a few attention tasks per thread even for one sequence. */
    c.nsplit = (4 * nthreads + M * nkv - 1) / (M * nkv);
    c.nsplit = c.nsplit < 1 ? 1 : c.nsplit > MAX_SPLITS ? MAX_SPLITS : c.nsplit;
    /* ... and, once attention is a large part of the step, a count of tasks that every thread gets the same number
     * of (9 tasks on 2 threads leave one idle 1/9 of the time). Short contexts keep the fewer, cheaper splits. */
    int64_t longest = 0;
    for (int m = 0; m < M; m++) longest = seq_lens[m] > longest ? seq_lens[m] : longest;
    for (int ns = c.nsplit; longest >= 1024 && ns <= MAX_SPLITS && ns <= 2 * c.nsplit; ns++)
        if ((M * nkv * ns) % nthreads == 0) {
            c.nsplit = ns;
            break;
        }
    pthread_mutex_lock(&step_mu);
    run_team(nthreads, step_body, &c, IDLE_SPINS);
    pthread_mutex_unlock(&step_mu);
    return 0;
}
