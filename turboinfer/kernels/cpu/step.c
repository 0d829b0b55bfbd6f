/* The decode step, every layer in one call, and the library's entry points (declared in ti_decode.h).
 * Part of decode.c, which #includes it after ti_decode.h and the parts before it: not compiled alone.
 */

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

/* ---------------------------------------------------------------- the step */
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
    const size_t el = kv_kind == KV_INT8 ? 1 : kv_kind == KV_BFLOAT16 ? 2 : 4, row_bytes = (size_t)nkv * hd * el;
    const size_t part_stride = (size_t)gsize * (hd + 2);
    void *const *glob = c->ptrs + (size_t)L * P_PER_LAYER;
    float *x = c->x, *res = c->res, *xn = c->xn, *buf = c->buf, *ao = c->ao, *act = c->act;
    float *parts = c->parts, *my_scores = c->scores + (size_t)team->tid * gsize * max_seq;
    const int tid = team->tid;
    int lo, hi;

    for (int l = 0; l < L; l++) {
        void *const *p = c->ptrs + (size_t)l * P_PER_LAYER;
        const int32_t *meta = p[P_LIN_META];
        const Lin qkv = {meta[META_QKV_FORMAT], meta[META_QKV_GROUP], p[P_QKV_W], p[P_QKV_S], p[P_QKV_Z],
                         p[P_QKV_IS], p[P_QKV_B], meta[META_QKV2_ROWS], meta[META_QKV2_FORMAT],
                         meta[META_QKV2_GROUP], p[P_QKV2_W], p[P_QKV2_S], p[P_QKV2_Z]};
        const Lin o = {meta[META_O_FORMAT], meta[META_O_GROUP], p[P_O_W], p[P_O_S], p[P_O_Z], p[P_O_IS], NULL,
                       0, 0, 0, NULL, NULL, NULL};
        const Lin gu = {meta[META_GU_FORMAT], meta[META_GU_GROUP], p[P_GU_W], p[P_GU_S], p[P_GU_Z], p[P_GU_IS], NULL,
                        meta[META_GU2_ROWS], meta[META_GU2_FORMAT], meta[META_GU2_GROUP], p[P_GU2_W], p[P_GU2_S],
                        p[P_GU2_Z]};
        const Lin down = {meta[META_DOWN_FORMAT], meta[META_DOWN_GROUP], p[P_DOWN_W], p[P_DOWN_S], p[P_DOWN_Z],
                          p[P_DOWN_IS], NULL, 0, 0, 0, NULL, NULL, NULL};
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
            int64_t last = seq_lens[m] - 1;  /* the row this token's K/V take: not its position */
            size_t row = (size_t)block_tables[(size_t)m * bt_stride + last / bs] * bs + last % bs;
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

/* ---------------------------------------------------------------- entry points */
size_t ti_workspace_floats(const int64_t *dims, int M, int nthreads) {
    return work_layout(dims, M, nthreads).total;
}

int ti_decode_step(const int64_t *dims, const float *fparams, void *const *ptrs, int M, float *x,
                   const int64_t *positions, const int64_t *seq_lens, const int64_t *block_tables, int bt_stride,
                   float *logits, float *work, int nthreads) {
    const int nkv = dims[D_KV_HEADS];
    for (int m = 0; m < M; m++)
        if (seq_lens[m] < 1 || seq_lens[m] > dims[D_MAX_SEQ] || positions[m] < 0 || positions[m] >= dims[D_ROPE_ROWS])
            return -1;
    const WorkLayout w = work_layout(dims, M, nthreads);
    Step c = {dims, positions, seq_lens, block_tables, ptrs, x, logits, work + w.res, work + w.xn, work + w.buf,
              work + w.ao, work + w.act, work + w.parts, work + w.scores,
              {work + w.xs, work + w.xsum, work + w.dx, (int16_t *)(work + w.xq)},
              fparams[F_EPS], fparams[F_ATTN_SCALE], M, bt_stride, 0};
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

int ti_int4_to_bf16(const uint8_t *w, const uint16_t *sz, int N, int K, int group, int nb0, int nb1, uint16_t *out,
                    int ldo, int nthreads) {
    if (N % 64 || K % group || nb0 < 0 || nb1 > N / 64 || nb0 > nb1) return -1;
    Dequant4 c = {w, sz, N, K, group, nb0, nb1, ldo, out};
    pthread_mutex_lock(&step_mu);
    run_team(nthreads, dequant4_body, &c, 0);
    pthread_mutex_unlock(&step_mu);
    return 0;
}

/* An int8 layer outside the step (prefill of a few tokens, models the step does not take). */
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

size_t ti_int8_workspace_floats(int M, int K) {
    return int8_work_layout(M, K).total;
}

int ti_int8_matmul(const float *x, int M, int K, int N, int group, const int8_t *q, const float *scale,
                   const float *zero, float *y, float *work, int nthreads) {
    if ((group != 16 && group != 32) || K % 32) return -1;
    const Int8WorkLayout w = int8_work_layout(M, K);
    LinCall c = {{LIN_INT8, group, q, scale, zero, NULL, NULL, 0, 0, 0, NULL, NULL, NULL}, x, M, K, N, y,
                 {NULL, work + w.xsum, work + w.dx, (int16_t *)(work + w.xq)}};
    pthread_mutex_lock(&step_mu);
    run_team(nthreads, linear_body, &c, 0);
    pthread_mutex_unlock(&step_mu);
    return 0;
}

/* The interface this build was compiled with, for the loader to compare with runner/cpu_decode.py's
 * declaration: one line per list of ti_decode.h, "key name,name,..." in order (a name's index is its enum value),
 * lower case. Built once; the string lives for the process. */
#define TI_NAME(E) #E,
static const char *const ti_names_dims[] = {TI_DIMS(TI_NAME)}, *const ti_names_logits[] = {TI_LOGITS(TI_NAME)},
                  *const ti_names_kv[] = {TI_KV_KINDS(TI_NAME)}, *const ti_names_lin[] = {TI_LIN_FORMATS(TI_NAME)},
                  *const ti_names_layer[] = {TI_LAYER_PTRS(TI_NAME)},
                  *const ti_names_global[] = {TI_GLOBAL_PTRS(TI_NAME)},
                  *const ti_names_meta[] = {TI_LIN_META(TI_NAME)}, *const ti_names_fparams[] = {TI_FPARAMS(TI_NAME)};
static char ti_interface_text[4096];
static pthread_once_t ti_interface_once = PTHREAD_ONCE_INIT;

static char *put_line(char *p, const char *end, const char *key, const char *const *names, int n) {
    p += snprintf(p, end - p, "%s ", key);
    for (int i = 0; i < n && p < end; i++) {
        for (const char *c = names[i]; *c && p < end; c++) *p++ = (char)(*c >= 'A' && *c <= 'Z' ? *c + 32 : *c);
        if (p < end) *p++ = i + 1 < n ? ',' : '\n';
    }
    return p;
}

static void build_interface(void) {
    char *p = ti_interface_text, *const end = ti_interface_text + sizeof ti_interface_text - 1;
    p += snprintf(p, end - p, "abi %d\n", TI_ABI_VERSION);
#define TI_LINE(key, names) p = put_line(p, end, key, names, (int)(sizeof names / sizeof names[0]))
    TI_LINE("dims", ti_names_dims);
    TI_LINE("logits", ti_names_logits);
    TI_LINE("kv_kinds", ti_names_kv);
    TI_LINE("lin_formats", ti_names_lin);
    TI_LINE("layer_ptrs", ti_names_layer);
    TI_LINE("global_ptrs", ti_names_global);
    TI_LINE("lin_meta", ti_names_meta);
    TI_LINE("fparams", ti_names_fparams);
#undef TI_LINE
    *p = '\0';
}

const char *ti_interface(void) {
    pthread_once(&ti_interface_once, build_interface);
    return ti_interface_text;
}
