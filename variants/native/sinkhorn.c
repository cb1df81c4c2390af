/* The linear rounds of Sinkhorn-Knopp (mHC, Xie et al. 2025, arXiv 2512.24880) and their exact
 * backward, on (n, n, tokens) matrices with tokens last, for variants/native/sinkhorn.py.
 *
 * Every operation is the one that module's PyTorch loop performs, in the same order and
 * precision: a sum of n entries added from the first to the last, one division per entry, the
 * backward's products rounded before they are added (built with -ffp-contract=off, so no fused
 * multiply-add): the results are bit for bit the loop's. What it saves is the ~270 separate
 * PyTorch ops a call costs (each a dispatch and a pass over the matrix), by running all rounds
 * over one block of tokens while it sits in L1 cache.
 */
#include <stdint.h>

#define BLOCK 256 /* tokens a pass works on: 16 entries x 256 x 8 bytes stay in L1 */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Entry (row, column) of the n x n matrix at token 0 of this block: columns normalize over rows
 * (round 0, 2, ...), rows over columns (round 1, 3, ...). */
#define ENTRY(base, rows, a, b, n, tokens, start) \
    ((base) + ((rows) ? (a) * (n) + (b) : (b) * (n) + (a)) * (tokens) + (start))

#define DEFINE_ROUNDS(T, SUFFIX)                                                                 \
    /* rounds x (columns, rows) normalizations of matrix, in place; sums[r] (n, tokens) gets   \
     * round r's n sums. */                                                                    \
    VECTOR_CLONES void sinkhorn_rounds_##SUFFIX(T *matrix, T *sums, int64_t n, int64_t tokens, \
                                                int64_t rounds) {                              \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t r = 0; r < 2 * rounds; r++) {                                         \
                int rows = r % 2;                                                              \
                for (int64_t a = 0; a < n; a++) {                                              \
                    T *total = sums + (r * n + a) * tokens + start;                            \
                    const T *first = ENTRY(matrix, rows, a, 0, n, tokens, start);              \
                    for (int64_t t = 0; t < len; t++) total[t] = first[t];                     \
                    for (int64_t b = 1; b < n; b++) {                                          \
                        const T *m = ENTRY(matrix, rows, a, b, n, tokens, start);              \
                        for (int64_t t = 0; t < len; t++) total[t] += m[t];                    \
                    }                                                                          \
                    for (int64_t b = 0; b < n; b++) {                                          \
                        T *m = ENTRY(matrix, rows, a, b, n, tokens, start);                    \
                        for (int64_t t = 0; t < len; t++) m[t] /= total[t];                    \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* Back through every normalization m' = m / s, last first: dm = (dm' - sum(dm' * m')) / s, \
     * with m rebuilt as m' * s; grad and matrix (the result) in place. */                     \
    VECTOR_CLONES void sinkhorn_rounds_backward_##SUFFIX(T *grad, T *matrix, const T *sums,    \
                                                         int64_t n, int64_t tokens,            \
                                                         int64_t rounds) {                     \
        T dot[BLOCK];                                                                          \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t r = 2 * rounds - 1; r >= 0; r--) {                                    \
                int rows = r % 2;                                                              \
                for (int64_t a = 0; a < n; a++) {                                              \
                    const T *total = sums + (r * n + a) * tokens + start;                      \
                    for (int64_t b = 0; b < n; b++) {                                          \
                        const T *g = ENTRY(grad, rows, a, b, n, tokens, start);                \
                        const T *m = ENTRY(matrix, rows, a, b, n, tokens, start);              \
                        for (int64_t t = 0; t < len; t++) {                                    \
                            T product = g[t] * m[t];                                           \
                            dot[t] = b == 0 ? product : dot[t] + product;                      \
                        }                                                                      \
                    }                                                                          \
                    for (int64_t b = 0; b < n; b++) {                                          \
                        T *g = ENTRY(grad, rows, a, b, n, tokens, start);                      \
                        T *m = ENTRY(matrix, rows, a, b, n, tokens, start);                    \
                        for (int64_t t = 0; t < len; t++) {                                    \
                            T difference = g[t] - dot[t];                                      \
                            g[t] = difference / total[t];                                      \
                            m[t] *= total[t];                                                  \
                        }                                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_ROUNDS(float, f32)
DEFINE_ROUNDS(double, f64)
