/* The CPU decode library's interface: what Python passes in (dims, pointers, formats) and how the step's scratch
 * is laid out. decode.c includes this and the parts as one translation unit; runner/cpu_decode.py declares the
 * same names, and kernels/cpu/__init__.py refuses a library whose ti_interface() disagrees with that declaration.
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
 *   rotary             : cos, sin [D_ROPE_ROWS, head_dim / 2] float32, rotate-half (HF) layout.
 *   rows and positions : the token a step adds goes to cache row seq_lens[m] - 1 (its sequence's last row); its
 *                        position (RoPE only) is positions[m]. They are separate arrays: with KV eviction or
 *                        token subsampling a token's position is not its row.
 */
#ifndef TI_DECODE_H
#define TI_DECODE_H

#include <stddef.h>
#include <stdint.h>

/* Bump when an entry point's arguments change (kernels/cpu/__init__.py declares the same number with the
 * ctypes signatures). */
#define TI_ABI_VERSION 1

/* Each list below makes one enum (prefix_NAME = its position) and one line of ti_interface() (the names in
 * lower case), so the C names, their values and what Python is told cannot drift apart. */

/* dims: int64 [D_NUM_DIMS], one model's shapes and modes */
#define TI_DIMS(X) X(LAYERS) X(HIDDEN) X(HEADS) X(KV_HEADS) X(HEAD_DIM) X(INTER) X(VOCAB) X(BLOCK_SIZE) \
    X(WINDOW) X(BF16) X(HAS_BIAS) X(LOGITS) X(MAX_SEQ) X(KV_KIND) X(LOGITS_GROUP) X(ROPE_ROWS)
/* D_LOGITS: LOGITS_NONE the step ends with the final norm; LOGITS_Q8 the tied Q8_0 table; LOGITS_INT8 an int8
 * weight [vocab, hidden] with group scales (a Q6_K / Q5_K / Q8_0 output projection or tied table), group
 * D_LOGITS_GROUP */
#define TI_LOGITS(X) X(NONE) X(Q8) X(INT8)
#define TI_KV_KINDS(X) X(FLOAT32) X(BFLOAT16) X(INT8)  /* D_KV_KIND: the cache's dtype */
#define TI_LIN_FORMATS(X) X(INT4) X(INT8)  /* a linear layer's weight format (see Layouts) */

/* ptrs: P_PER_LAYER pointers per layer, then G_NUM globals. P_*_IS: AWQ input scales [K] float32 of that layer,
 * or NULL: the layer computes (x * s) W^T (int4 only). P_*_Z: an int8 layer's zeros, or NULL. P_LIN_META: int32
 * [META_NUM] (below). P_QKV2_*, P_GU2_*: the second part's weight, scales and zeros, when q|k|v or gate|up
 * comes in two formats. */
#define TI_LAYER_PTRS(X) X(IN_NORM) X(QKV_W) X(QKV_S) X(QKV_B) X(O_W) X(O_S) X(POST_NORM) X(GU_W) X(GU_S) \
    X(DOWN_W) X(DOWN_S) X(K_CACHE) X(V_CACHE) X(K_SCALE) X(V_SCALE) X(QKV_IS) X(O_IS) X(GU_IS) X(DOWN_IS) \
    X(QKV_Z) X(O_Z) X(GU_Z) X(DOWN_Z) X(LIN_META) X(QKV2_W) X(QKV2_S) X(QKV2_Z) X(GU2_W) X(GU2_S) X(GU2_Z)
#define TI_GLOBAL_PTRS(X) X(FINAL_NORM) X(COS) X(SIN) X(EMB_CODES) X(EMB_SCALES) X(EMB_ZEROS)
/* A layer's P_LIN_META: (format, group) of qkv, o, gate_up, down, then for q|k|v and gate|up the rows of the
 * first part and the format and group of the second (rows 0 when there is one part). */
#define TI_LIN_META(X) X(QKV_FORMAT) X(QKV_GROUP) X(O_FORMAT) X(O_GROUP) X(GU_FORMAT) X(GU_GROUP) \
    X(DOWN_FORMAT) X(DOWN_GROUP) X(QKV2_ROWS) X(QKV2_FORMAT) X(QKV2_GROUP) X(GU2_ROWS) X(GU2_FORMAT) X(GU2_GROUP)
/* fparams: float32 */
#define TI_FPARAMS(X) X(EPS) X(ATTN_SCALE)

#define TI_ENUM_D(E) D_##E,
#define TI_ENUM_LOGITS(E) LOGITS_##E,
#define TI_ENUM_KV(E) KV_##E,
#define TI_ENUM_LIN(E) LIN_##E,
#define TI_ENUM_P(E) P_##E,
#define TI_ENUM_G(E) G_##E,
#define TI_ENUM_META(E) META_##E,
#define TI_ENUM_F(E) F_##E,
enum { TI_DIMS(TI_ENUM_D) D_NUM_DIMS };
enum { TI_LOGITS(TI_ENUM_LOGITS) LOGITS_NUM };
enum { TI_KV_KINDS(TI_ENUM_KV) KV_NUM };
enum { TI_LIN_FORMATS(TI_ENUM_LIN) LIN_NUM };
enum { TI_LAYER_PTRS(TI_ENUM_P) P_PER_LAYER };
enum { TI_GLOBAL_PTRS(TI_ENUM_G) G_NUM };
enum { TI_LIN_META(TI_ENUM_META) META_NUM };
enum { TI_FPARAMS(TI_ENUM_F) F_NUM };

#define MAX_SPLITS 16  /* most slices of one sequence's context in split-KV attention */

/* The step's float32 workspace: where each buffer starts, in floats from `work`. ti_workspace_floats sizes it
 * (for the largest batch) and ti_decode_step carves it (for this one), both from this function. kmax is the
 * widest input of a linear layer. */
typedef struct {
    size_t res, xn;   /* [M, hidden] the residual stream; its norm, the input of q|k|v and gate|up */
    size_t buf;       /* [M, max(q|k|v, 2 inter)] q|k|v, then gate|up */
    size_t ao, act;   /* [M, heads * head_dim] attention output; [M, inter] SiLU(gate) * up */
    size_t xsum, dx;  /* linear layers: [M, kmax / 16 + 1] sums of x per group (16 inputs or more); [M + 1]
                       * the int16 scale of each row of x */
    size_t xs, xq;    /* [M, kmax] x times a layer's AWQ input scales; [M, kmax] x as int16 (half the floats) */
    size_t parts;     /* [M, kv_heads, nsplit <= MAX_SPLITS, heads / kv_heads, head_dim + 2] attention partials */
    size_t scores;    /* [nthreads, heads / kv_heads, max_seq] each thread's attention scores */
    size_t total;     /* floats in all, 64 of them slack */
} WorkLayout;

static inline WorkLayout work_layout(const int64_t *dims, int64_t M, int64_t nthreads) {
    const int64_t H = dims[D_HIDDEN], nh = dims[D_HEADS], nkv = dims[D_KV_HEADS], hd = dims[D_HEAD_DIM];
    const int64_t I = dims[D_INTER], qkv = (nh + 2 * nkv) * hd, big = qkv > 2 * I ? qkv : 2 * I;
    int64_t kmax = H > I ? H : I;
    kmax = kmax > nh * hd ? kmax : nh * hd;
    WorkLayout w;
    w.res = 0;
    w.xn = w.res + M * H;
    w.buf = w.xn + M * H;
    w.ao = w.buf + M * big;
    w.act = w.ao + M * nh * hd;
    w.xsum = w.act + M * I;
    w.dx = w.xsum + M * (kmax / 16 + 1);
    w.xs = w.dx + M + 1;
    w.xq = w.xs + M * kmax;
    w.parts = w.xq + M * kmax / 2 + 1;
    w.scores = w.parts + M * nh * MAX_SPLITS * (hd + 2);
    w.total = w.scores + nthreads * (nh / nkv) * dims[D_MAX_SEQ] + 64;
    return w;
}

/* ti_int8_matmul's float32 workspace, the same way: xsum [M, K / 16], dx [M + 1], xq [M, K] int16. */
typedef struct {
    size_t xsum, dx, xq, total;
} Int8WorkLayout;

static inline Int8WorkLayout int8_work_layout(int64_t M, int64_t K) {
    Int8WorkLayout w;
    w.xsum = 0;
    w.dx = w.xsum + M * (K / 16);
    w.xq = w.dx + M + 1;
    w.total = w.xq + M * K / 2 + 1;
    return w;
}

/* ---------------------------------------------------------------- entry points (step.c) */
/* "key names" lines, one per list above, plus "abi N": what kernels/cpu/__init__.py checks at load. */
const char *ti_interface(void);
size_t ti_workspace_floats(const int64_t *dims, int M, int nthreads);
/* One decode step of M sequences, every layer: x [M, hidden] float32 embeddings in, final normed hidden out;
 * positions, seq_lens [M]; block_tables [M, bt_stride]; logits [M, vocab] (when dims[D_LOGITS]); work: float32
 * scratch of ti_workspace_floats(dims, >= M, nthreads). The new token's K/V go to row seq_lens[m] - 1; positions
 * only rotate. Returns -1 (nothing done) for a seq_len outside 1 .. max_seq or a position outside the rotary
 * table. */
int ti_decode_step(const int64_t *dims, const float *fparams, void *const *ptrs, int M, float *x,
                   const int64_t *positions, const int64_t *seq_lens, const int64_t *block_tables, int bt_stride,
                   float *logits, float *work, int nthreads);
/* Rows-blocks nb0 .. nb1 - 1 of an int4 weight as its transpose in bf16 (prefill's dense matmul). */
int ti_int4_to_bf16(const uint8_t *w, const uint16_t *sz, int N, int K, int group, int nb0, int nb1, uint16_t *out,
                    int ldo, int nthreads);
/* y [M, N] = x [M, K] W^T for an int8 weight outside the step; work: ti_int8_workspace_floats(M, K) floats. */
size_t ti_int8_workspace_floats(int M, int K);
int ti_int8_matmul(const float *x, int M, int K, int N, int group, const int8_t *q, const float *scale,
                   const float *zero, float *y, float *work, int nthreads);

#endif
