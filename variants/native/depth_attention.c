/* Attention Residuals' depth attention (Kimi Team 2026, "Attention Residuals", arXiv
 * 2603.15031) over S slots v_i (each (tokens, d), a pointer each), and its backward, for
 * variants/native/depth_attention.py. Per token:
 *
 *     s_i = (|v_i|^2 / d + eps)^(-1/2),  p_i = v_i . u,  alpha = softmax_i(s_i p_i)
 *     h = sum_i alpha_i v_i
 *
 * u = g * w (the key norm's gain times the pseudo-query). Backward, from dh:
 *
 *     da_i = v_i . dh,  dl_i = alpha_i (da_i - sum_j alpha_j da_j)
 *     dv_i = (dl_i s_i) u + alpha_i dh - (dl_i p_i s_i^3 / d) v_i,  du = sum dl_i s_i v_i
 *
 * The formula of variants/attnres.py's _AttendOverDepth, whose PyTorch ops visit every slot
 * three to four times in each direction (each a dispatch: ~50 per read at 12 slots): here a
 * block of 64 tokens is read for its norms and products, then again for the weighted sum (and
 * in the backward for the products with dh, then for the gradients), while its rows sit in
 * cache. Results agree with PyTorch's ops to float rounding, not bit for bit: sums over a row
 * run in LANES interleaved partial sums, exp is vector_math.h's, and du's sums over tokens are
 * kept per block and added in block order in double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"
#include "native.h"
#include "parallel.h"
#include "vector_math.h"

#define BLOCK 64
#define DEFINE_DEPTH_ATTENTION(T, SUFFIX, SQRT)                                                \
    /* read (tokens, d) = h, and for the backward weights, scale and projected (slots, tokens):\
     * alpha_i, s_i and p_i. Returns 0, or -1 where memory for a block ran out. */             \
    VECTOR_CLONES int depth_attention_##SUFFIX(const T *const *values, int64_t slots,          \
                                               int64_t tokens, int64_t d, const T *u, double eps,\
                                               T *read, T *weights, T *scale, T *projected) {  \
        if (tokens <= 0 || slots <= 0 || d <= 0) return 0;                                     \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(slots * tokens * d, reduction(| : failed))                       \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            T *top = workspace(sizeof(T) * 2 * BLOCK);                                         \
            if (!top) {                                                                        \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            T *total = top + BLOCK;                                                            \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t i = 0; i < slots; i++) {                                              \
                T *s = scale + i * tokens + start, *p = projected + i * tokens + start;        \
                T *logit = weights + i * tokens + start;                                       \
                for (int64_t t = 0; t < len; t++) {                                            \
                    const T *v = values[i] + (start + t) * d;                                  \
                    s[t] = (T)1 / SQRT(dot_##SUFFIX(v, v, d) / (T)d + (T)eps);                 \
                    p[t] = dot_##SUFFIX(v, u, d);                                              \
                    logit[t] = p[t] * s[t];                                                    \
                }                                                                              \
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) top[t] = weights[start + t];                     \
            for (int64_t i = 1; i < slots; i++) {                                              \
                const T *logit = weights + i * tokens + start;                                 \
                for (int64_t t = 0; t < len; t++) top[t] = logit[t] > top[t] ? logit[t] : top[t];\
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) total[t] = 0;                                    \
            for (int64_t i = 0; i < slots; i++) {                                              \
                T *alpha = weights + i * tokens + start;                                       \
                for (int64_t t = 0; t < len; t++) {                                            \
                    alpha[t] = exp_##SUFFIX(alpha[t] - top[t]);                                \
                    total[t] += alpha[t];                                                      \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = 0; i < slots; i++) {                                              \
                T *alpha = weights + i * tokens + start;                                       \
                for (int64_t t = 0; t < len; t++) alpha[t] /= total[t];                        \
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) {                                                \
                T *h = read + (start + t) * d;                                                 \
                const T *v = values[0] + (start + t) * d;                                      \
                T alpha = weights[start + t];                                                  \
                for (int64_t k = 0; k < d; k++) h[k] = v[k] * alpha;                           \
                for (int64_t i = 1; i < slots; i++) {                                          \
                    v = values[i] + (start + t) * d;                                           \
                    alpha = weights[i * tokens + start + t];                                   \
                    for (int64_t k = 0; k < d; k++) {                                          \
                        T product = v[k] * alpha;                                              \
                        h[k] += product;                                                       \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        return failed ? -1 : 0;                                                                \
    }                                                                                          \
                                                                                               \
    /* The gradients of the slots (grads[i], (tokens, d) each) and, where grad_u is not NULL, of u\
     * (d, in double), from dh (tokens, d) and what the forward kept. Returns 0, or -1 where memory\
     * ran out. */                                                                             \
    VECTOR_CLONES int depth_attention_backward_##SUFFIX(                                       \
        const T *grad_read, const T *const *values, int64_t slots, int64_t tokens, int64_t d,  \
        const T *u, const T *weights, const T *scale, const T *projected, T *const *grads,     \
        double *grad_u) {                                                                      \
        if (tokens <= 0 || slots <= 0 || d <= 0) return 0;                                     \
        int64_t blocks = (tokens + BLOCK - 1) / BLOCK;                                         \
        T *block_sums = NULL; /* each block's sum for du, added in block order */              \
        if (grad_u && !(block_sums = gather_space(sizeof(T) * (size_t)(blocks * d)))) return -1; \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(slots * tokens * d, reduction(| : failed))                       \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            T *along_u = workspace(sizeof(T) * 2 * slots * BLOCK + sizeof(T) * BLOCK);         \
            if (!along_u) {                                                                    \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            T *along_v = along_u + slots * BLOCK, *mean = along_v + slots * BLOCK;             \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t i = 0; i < slots; i++) /* da_i, kept in along_u until dl_i is known */\
                for (int64_t t = 0; t < len; t++)                                              \
                    along_u[i * BLOCK + t] =                                                   \
                        dot_##SUFFIX(values[i] + (start + t) * d, grad_read + (start + t) * d, d);\
            for (int64_t t = 0; t < len; t++) mean[t] = 0;                                     \
            for (int64_t i = 0; i < slots; i++)                                                \
                for (int64_t t = 0; t < len; t++) {                                            \
                    T product = weights[i * tokens + start + t] * along_u[i * BLOCK + t];      \
                    mean[t] += product;                                                        \
                }                                                                              \
            for (int64_t i = 0; i < slots; i++)                                                \
                for (int64_t t = 0; t < len; t++) {                                            \
                    int64_t at = i * tokens + start + t;                                       \
                    T dl = weights[at] * (along_u[i * BLOCK + t] - mean[t]);                   \
                    T s = scale[at];                                                           \
                    along_u[i * BLOCK + t] = dl * s;                                           \
                    along_v[i * BLOCK + t] = -(dl * projected[at] * (s * s * s)) / (T)d;       \
                }                                                                              \
            for (int64_t i = 0; i < slots; i++)                                                \
                for (int64_t t = 0; t < len; t++) {                                            \
                    const T *v = values[i] + (start + t) * d, *dh = grad_read + (start + t) * d;\
                    T *dv = grads[i] + (start + t) * d;                                        \
                    T q = along_u[i * BLOCK + t], alpha = weights[i * tokens + start + t];     \
                    T a = along_v[i * BLOCK + t];                                              \
                    for (int64_t k = 0; k < d; k++) {                                          \
                        T first = q * u[k], second = dh[k] * alpha, third = a * v[k];          \
                        dv[k] = (first + second) + third;                                      \
                    }                                                                          \
                }                                                                              \
            if (grad_u) {                                                                      \
                T *block_u = block_sums + start / BLOCK * d;                                   \
                for (int64_t k = 0; k < d; k++) block_u[k] = 0;                                \
                for (int64_t i = 0; i < slots; i++)                                            \
                    for (int64_t t = 0; t < len; t++) {                                        \
                        const T *v = values[i] + (start + t) * d;                              \
                        T q = along_u[i * BLOCK + t];                                          \
                        for (int64_t k = 0; k < d; k++) {                                      \
                            T product = q * v[k];                                              \
                            block_u[k] += product;                                             \
                        }                                                                      \
                    }                                                                          \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        if (failed) return -1;                                                                 \
        if (grad_u) add_blocks_##SUFFIX(grad_u, block_sums, blocks, d, d);                     \
        return 0;                                                                              \
    }

DEFINE_DEPTH_ATTENTION(float, f32, sqrtf)
DEFINE_DEPTH_ATTENTION(double, f64, sqrt)
