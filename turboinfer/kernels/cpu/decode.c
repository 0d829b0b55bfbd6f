/* One decode step of a Llama-family model on the CPU, every layer in one call.
 *
 * Why it exists: at batch 1 a small model's decode step is ~1,600 tiny PyTorch ops, and their dispatch costs
 * more than the matmuls. Here the whole step is one call on a team of threads: the int4 matmuls read torch's own packed
 * layout (the same tensors the PyTorch path uses, so no second copy of the weights), the Q8_0 tied output
 * projection reads the embedding's int8 codes, and norms, RoPE, the KV store and paged attention are plain loops.
 * Activations stay float32 from start to end.
 *
 * The library is this one translation unit: the parts are #included, not compiled apart, so the compiler still
 * inlines the kernels into the step (as it did when they were one file). The interface — dims, pointers, formats,
 * the workspace layout — is ti_decode.h; each part uses only what the parts before it define.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
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

#include "ti_decode.h"

#include "pool.c"         /* the thread pool: teams, barriers, run_team */
#include "ops.c"          /* bf16 / f16 conversions, exp, RMSNorm, SiLU, RoPE */
#include "matmul_int4.c"  /* int4 matmul over torch's packing; int4 -> bf16 for prefill */
#include "matmul_int8.c"  /* int8 matmul with group scales; the Q8_0 output projection */
#include "attention.c"    /* split-KV paged attention, the KV store */
#include "step.c"         /* the layer step and the entry points */
