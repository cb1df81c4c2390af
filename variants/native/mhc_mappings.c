/* mHC's mappings (Xie et al. 2025, "mHC: Manifold-Constrained Hyper-Connections", arXiv
 * 2512.24880, eq. 7-9) from the projected streams, and their backward, for
 * variants/native/mhc_mappings.py. Per token, with p = raw * inv (x' phi: the projection of
 * the streams by the norm's gain times phi, raw, scaled by the token's 1/rms, inv):
 *
 *     H_pre  = sigmoid(a_pre * p[0:n] + b_pre)
 *     H_post = 2 sigmoid(a_post * p[n:2n] + b_post)
 *     H_res  = Sinkhorn-Knopp(a_res * mat(p[2n:]) + b_res)
 *
 * Sinkhorn-Knopp as variants/mhc.py runs it: the first column normalization a log-softmax over
 * each column, the first row normalization a softmax over each row (so that no row of entries
 * ~90 below the others sums to a flushed subnormal), then `rounds` linear rounds of columns
 * and rows divided by their sums (sinkhorn_rounds.h, as sinkhorn.c runs them). Written out as
 * the read-out's weights [H_pre | H_res^T] (tokens, n, n + 1) and H_post (tokens, n).
 *
 * The formula is PyTorch's; exp and log are vector_math.h's (in float: a reduction and a
 * polynomial the compiler vectorizes, within a few units in the last place; glibc's are a call
 * per value), so results agree with PyTorch's ops to float rounding, not bit for bit. What it
 * saves is the ~20 PyTorch ops forward and ~40 backward of mHC's mappings per sublayer, each a
 * dispatch and a pass over (tokens, n, n) tensors. The backward recomputes the block's
 * mappings from raw and inv (cheaper than saving them); the parameters' gradients are summed
 * per token in double, in token order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "native.h"
#include "parallel.h"
#include "sinkhorn_rounds.h"
#include "vector_math.h"

#define BLOCK 64 /* tokens a pass works on: the block's matrices stay in cache */

#define DEFINE_MAPPINGS(T, SUFFIX)                                                             \
    INLINE T sigmoid_##SUFFIX(T z) { return (T)1 / ((T)1 + exp_##SUFFIX(-z)); }                \
                                                                                               \
    /* A block's workspace, tokens last (entries `BLOCK` apart): p (k columns), logp, first and\
     * matrix (n^2 each), scratch (3 rows), sums (2 rounds n) and grad (k, the backward's). */ \
    typedef struct { T *p, *logp, *first, *matrix, *scratch, *sums, *grad; } block_##SUFFIX;   \
                                                                                               \
    /* Carves a block's workspace out of the kept memory: 0, or -1 where there is none. */     \
    INLINE int block_workspace_##SUFFIX(int64_t n, int64_t rounds, block_##SUFFIX *b) {        \
        int64_t k = 2 * n + n * n, nn = n * n;                                                 \
        T *base = workspace(sizeof(T) * BLOCK * (2 * k + 3 * nn + 3 + 2 * rounds * n));        \
        if (!base) return -1;                                                                  \
        b->p = base, b->logp = b->p + k * BLOCK, b->first = b->logp + nn * BLOCK;              \
        b->matrix = b->first + nn * BLOCK, b->scratch = b->matrix + nn * BLOCK;                \
        b->sums = b->scratch + 3 * BLOCK, b->grad = b->sums + 2 * rounds * n * BLOCK;          \
        return 0;                                                                              \
    }                                                                                          \
                                                                                               \
    /* A block's mappings: p, the logits' first round's log-softmax over columns `logp` and its\
     * softmax over rows `first`, and `matrix` after the linear rounds, whose sums are kept in \
     * `sums` (2 rounds n a token). */                                                         \
    INLINE void block_mappings_##SUFFIX(const T *raw, const T *inv, const T *alpha,            \
                                        const T *bias, int64_t n, int64_t len, int64_t rounds, \
                                        const block_##SUFFIX *b) {                             \
        int64_t k = 2 * n + n * n, nn = n * n;                                                 \
        T *p = b->p, *logp = b->logp, *first = b->first, *matrix = b->matrix, *sums = b->sums; \
        T *scratch = b->scratch;                                                               \
        for (int64_t j = 0; j < k; j++)                                                        \
            for (int64_t t = 0; t < len; t++) p[j * BLOCK + t] = raw[t * k + j] * inv[t];      \
        T *logits = logp, *top = scratch, *total = scratch + BLOCK;                            \
        for (int64_t e = 0; e < nn; e++)                                                       \
            for (int64_t t = 0; t < len; t++)                                                  \
                logits[e * BLOCK + t] = alpha[2] * p[(2 * n + e) * BLOCK + t] + bias[2 * n + e];\
        for (int64_t column = 0; column < n; column++) { /* log-softmax over the column */     \
            for (int64_t t = 0; t < len; t++) top[t] = logits[column * BLOCK + t];             \
            for (int64_t row = 1; row < n; row++) {                                            \
                const T *l = logits + (row * n + column) * BLOCK;                              \
                for (int64_t t = 0; t < len; t++) top[t] = l[t] > top[t] ? l[t] : top[t];      \
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) total[t] = 0;                                    \
            for (int64_t row = 0; row < n; row++) {                                            \
                const T *l = logits + (row * n + column) * BLOCK;                              \
                for (int64_t t = 0; t < len; t++) total[t] += exp_##SUFFIX(l[t] - top[t]);     \
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) total[t] = log_##SUFFIX(total[t]);               \
            for (int64_t row = 0; row < n; row++) {                                            \
                T *l = logits + (row * n + column) * BLOCK;                                    \
                for (int64_t t = 0; t < len; t++) l[t] = (l[t] - top[t]) - total[t];           \
            }                                                                                  \
        }                                                                                      \
        for (int64_t row = 0; row < n; row++) { /* softmax over the row */                     \
            const T *l = logp + row * n * BLOCK;                                               \
            T *y = first + row * n * BLOCK;                                                    \
            for (int64_t t = 0; t < len; t++) top[t] = l[t];                                   \
            for (int64_t column = 1; column < n; column++)                                     \
                for (int64_t t = 0; t < len; t++)                                              \
                    top[t] = l[column * BLOCK + t] > top[t] ? l[column * BLOCK + t] : top[t];  \
            for (int64_t t = 0; t < len; t++) total[t] = 0;                                    \
            for (int64_t column = 0; column < n; column++)                                     \
                for (int64_t t = 0; t < len; t++) {                                            \
                    y[column * BLOCK + t] = exp_##SUFFIX(l[column * BLOCK + t] - top[t]);      \
                    total[t] += y[column * BLOCK + t];                                         \
                }                                                                              \
            for (int64_t column = 0; column < n; column++)                                     \
                for (int64_t t = 0; t < len; t++) y[column * BLOCK + t] /= total[t];           \
        }                                                                                      \
        for (int64_t e = 0; e < nn; e++)                                                       \
            for (int64_t t = 0; t < len; t++) matrix[e * BLOCK + t] = first[e * BLOCK + t];    \
        for (int64_t r = 0; r < 2 * rounds; r++)                                               \
            normalize_##SUFFIX(matrix, sums + r * n * len, r % 2, n, BLOCK, len);              \
    }                                                                                          \
                                                                                               \
    /* weights (tokens, n, n + 1) = [H_pre | H_res^T] and post (tokens, n) = H_post from raw   \
     * (tokens, 2n + n^2), inv (tokens), alpha (a_pre, a_post, a_res) and bias (b_pre, b_post, \
     * b_res). Returns 0, or -1 where memory for a block ran out. */                           \
    VECTOR_CLONES int mhc_mappings_##SUFFIX(const T *raw, const T *inv, const T *alpha,        \
                                            const T *bias, int64_t n, int64_t tokens,          \
                                            int64_t rounds, T *weights, T *post) {             \
        if (tokens <= 0 || n <= 0) return 0;                                                   \
        int64_t k = 2 * n + n * n;                                                             \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(tokens * k * (rounds + 1), reduction(| : failed))                \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            block_##SUFFIX b;                                                                  \
            if (block_workspace_##SUFFIX(n, rounds, &b)) {                                     \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            const T *p = b.p, *matrix = b.matrix;                                              \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            block_mappings_##SUFFIX(raw + start * k, inv + start, alpha, bias, n, len, rounds, &b);\
            for (int64_t i = 0; i < n; i++)                                                    \
                for (int64_t t = 0; t < len; t++) {                                            \
                    T *w = weights + ((start + t) * n + i) * (n + 1);                          \
                    w[0] = sigmoid_##SUFFIX(alpha[0] * p[i * BLOCK + t] + bias[i]);            \
                    for (int64_t j = 0; j < n; j++) w[1 + j] = matrix[(j * n + i) * BLOCK + t];\
                    post[(start + t) * n + i] =                                                \
                        (T)2 * sigmoid_##SUFFIX(alpha[1] * p[(n + i) * BLOCK + t] + bias[n + i]);\
                }                                                                              \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        return failed ? -1 : 0;                                                                \
    }                                                                                          \
                                                                                               \
    /* The gradients of raw (tokens, 2n + n^2), inv (tokens), alpha (3, added to, in double) and\
     * bias (2n + n^2, added to, in double) from those of weights and post (either NULL: zero).\
     * Returns 0, or -1 where memory for a block ran out. */                                   \
    VECTOR_CLONES int mhc_mappings_backward_##SUFFIX(                                          \
        const T *grad_weights, const T *grad_post, const T *raw, const T *inv, const T *alpha, \
        const T *bias, int64_t n, int64_t tokens, int64_t rounds, T *grad_raw, T *grad_inv,    \
        double *grad_alpha, double *grad_bias) {                                               \
        if (tokens <= 0 || n <= 0) return 0;                                                   \
        int64_t k = 2 * n + n * n, blocks = (tokens + BLOCK - 1) / BLOCK;                      \
        /* each block's sums of alpha's and bias's gradients per logit, added in block order */ \
        double *block_sums = gather_space(sizeof(double) * 2 * k * blocks);                    \
        if (!block_sums) return -1;                                                            \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(tokens * k * (rounds + 1), reduction(| : failed))                \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            block_##SUFFIX b;                                                                  \
            if (block_workspace_##SUFFIX(n, rounds, &b)) {                                     \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            const T *p = b.p, *logp = b.logp, *first = b.first, *sums = b.sums;                \
            T *matrix = b.matrix, *grad = b.grad, *dot = b.scratch + 2 * BLOCK;                \
            double *alpha_sums = block_sums + 2 * k * (start / BLOCK), *bias_sums = alpha_sums + k; \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            block_mappings_##SUFFIX(raw + start * k, inv + start, alpha, bias, n, len, rounds, &b);\
            T *grad_matrix = grad + 2 * n * BLOCK; /* the logits' gradient, in the end */      \
            for (int64_t i = 0; i < n; i++)                                                    \
                for (int64_t j = 0; j < n; j++)                                                \
                    for (int64_t t = 0; t < len; t++)                                          \
                        grad_matrix[(j * n + i) * BLOCK + t] =                                 \
                            grad_weights ? grad_weights[((start + t) * n + i) * (n + 1) + 1 + j] : 0;\
            normalize_backward_##SUFFIX(grad_matrix, BLOCK, matrix, sums, dot, 2 * rounds, n,  \
                                        BLOCK, len);                                           \
            for (int64_t row = 0; row < n; row++) { /* back through the softmax over rows */   \
                const T *y = first + row * n * BLOCK;                                          \
                T *g = grad_matrix + row * n * BLOCK;                                          \
                for (int64_t t = 0; t < len; t++) dot[t] = 0;                                  \
                for (int64_t column = 0; column < n; column++)                                 \
                    for (int64_t t = 0; t < len; t++) {                                        \
                        T product = g[column * BLOCK + t] * y[column * BLOCK + t];             \
                        dot[t] += product;                                                     \
                    }                                                                          \
                for (int64_t column = 0; column < n; column++)                                 \
                    for (int64_t t = 0; t < len; t++)                                          \
                        g[column * BLOCK + t] =                                                \
                            y[column * BLOCK + t] * (g[column * BLOCK + t] - dot[t]);          \
            }                                                                                  \
            for (int64_t column = 0; column < n; column++) { /* and the log-softmax over columns */\
                for (int64_t t = 0; t < len; t++) dot[t] = 0;                                  \
                for (int64_t row = 0; row < n; row++)                                          \
                    for (int64_t t = 0; t < len; t++) dot[t] += grad_matrix[(row * n + column) * BLOCK + t];\
                for (int64_t row = 0; row < n; row++) {                                        \
                    T *g = grad_matrix + (row * n + column) * BLOCK;                           \
                    const T *l = logp + (row * n + column) * BLOCK;                            \
                    for (int64_t t = 0; t < len; t++) g[t] -= exp_##SUFFIX(l[t]) * dot[t];     \
                }                                                                              \
            }                                                                                  \
            for (int64_t i = 0; i < n; i++) /* back through the sigmoids: s' = s (1 - s) */    \
                for (int64_t t = 0; t < len; t++) {                                            \
                    T upstream = grad_weights ? grad_weights[((start + t) * n + i) * (n + 1)] : 0;\
                    T s = sigmoid_##SUFFIX(alpha[0] * p[i * BLOCK + t] + bias[i]);             \
                    grad[i * BLOCK + t] = upstream * (s * ((T)1 - s));                         \
                    upstream = grad_post ? grad_post[(start + t) * n + i] : 0;                 \
                    s = sigmoid_##SUFFIX(alpha[1] * p[(n + i) * BLOCK + t] + bias[n + i]);     \
                    grad[(n + i) * BLOCK + t] = upstream * ((T)2 * (s * ((T)1 - s)));          \
                }                                                                              \
            /* grad now holds each logit's gradient: those of alpha, bias and p follow. */     \
            for (int64_t j = 0; j < k; j++) {                                                  \
                int64_t which = j < n ? 0 : (j < 2 * n ? 1 : 2);                               \
                double alpha_sum = 0, bias_sum = 0;                                            \
                T *g = grad + j * BLOCK;                                                       \
                for (int64_t t = 0; t < len; t++) {                                            \
                    alpha_sum += (double)g[t] * (double)p[j * BLOCK + t];                      \
                    bias_sum += (double)g[t];                                                  \
                    g[t] *= alpha[which];                                                      \
                }                                                                              \
                alpha_sums[j] = alpha_sum;                                                     \
                bias_sums[j] = bias_sum;                                                       \
            }                                                                                  \
            for (int64_t t = 0; t < len; t++) {                                                \
                const T *x = raw + (start + t) * k;                                            \
                T *out = grad_raw + (start + t) * k, scale = inv[start + t], sum = 0;          \
                for (int64_t j = 0; j < k; j++) {                                              \
                    T g = grad[j * BLOCK + t];                                                 \
                    out[j] = g * scale;                                                        \
                    T product = g * x[j];                                                      \
                    sum += product;                                                            \
                }                                                                              \
                grad_inv[start + t] = sum;                                                     \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        if (failed) return -1;                                                                 \
        for (int64_t b = 0; b < blocks; b++)                                                   \
            for (int64_t j = 0; j < k; j++)                                                    \
                grad_alpha[j < n ? 0 : (j < 2 * n ? 1 : 2)] += block_sums[2 * k * b + j];      \
        add_blocks_f64(grad_bias, block_sums + k, blocks, k, 2 * k);                           \
        return 0;                                                                              \
    }

DEFINE_MAPPINGS(float, f32)
DEFINE_MAPPINGS(double, f64)
