/* One normalization of Sinkhorn-Knopp (mHC, Xie et al. 2025, arXiv 2512.24880) over a block
 * of tokens, shared by sinkhorn.c (the linear rounds alone, bit for bit PyTorch's loop) and
 * mhc_mappings.c (all of mHC's mappings). Part of each library's cache key. */
#ifndef VARIANTS_NATIVE_SINKHORN_ROUNDS_H
#define VARIANTS_NATIVE_SINKHORN_ROUNDS_H

#include <stdint.h>

/* Entry (a, b) of a normalization's view of the n x n matrix: for columns (round 0, 2, ...) a
 * is the column and b the row, for rows (round 1, 3, ...) a is the row and b the column;
 * `stride` is the distance between entries (tokens). */
#define ENTRY(base, rows, a, b, n, stride) \
    ((base) + ((rows) ? (a) * (n) + (b) : (b) * (n) + (a)) * (stride))

#define DEFINE_NORMALIZE(T, SUFFIX)                                                            \
    /* One normalization of a block: every column (rows = 0) or row (rows = 1) divided by its  \
     * sum, added to zero from the first entry to the last (as Tensor.sum adds) and kept in    \
     * total[a * len + t]. */                                                                  \
    static inline void normalize_##SUFFIX(T *matrix, T *total, int rows, int64_t n,            \
                                          int64_t stride, int64_t len) {                       \
        for (int64_t a = 0; a < n; a++) {                                                      \
            T *sum = total + a * len;                                                          \
            for (int64_t t = 0; t < len; t++) sum[t] = 0;                                      \
            for (int64_t b = 0; b < n; b++) {                                                  \
                const T *m = ENTRY(matrix, rows, a, b, n, stride);                             \
                for (int64_t t = 0; t < len; t++) sum[t] += m[t];                              \
            }                                                                                  \
            for (int64_t b = 0; b < n; b++) {                                                  \
                T *m = ENTRY(matrix, rows, a, b, n, stride);                                   \
                for (int64_t t = 0; t < len; t++) m[t] /= sum[t];                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* grad, the gradient of the normalizations' result `matrix` (both with entries `stride`   \
     * apart), becomes that of their input, in place, from the sums each kept (`count`         \
     * normalizations, columns first): back through m' = m / s, last first, dm = (dm' - sum(dm' *\
     * m')) / s, with m rebuilt as m' * s. dot: len scratch values. */                         \
    static inline void normalize_backward_##SUFFIX(T *grad, int64_t grad_stride, T *matrix,    \
                                                   const T *sums, T *dot, int64_t count,       \
                                                   int64_t n, int64_t stride, int64_t len) {   \
        for (int64_t r = count - 1; r >= 0; r--) {                                             \
            int rows = r % 2;                                                                  \
            for (int64_t a = 0; a < n; a++) {                                                  \
                const T *total = sums + (r * n + a) * len;                                     \
                for (int64_t b = 0; b < n; b++) {                                              \
                    const T *g = ENTRY(grad, rows, a, b, n, grad_stride);                      \
                    const T *m = ENTRY(matrix, rows, a, b, n, stride);                         \
                    for (int64_t t = 0; t < len; t++) {                                        \
                        T product = g[t] * m[t];                                               \
                        dot[t] = (b == 0 ? 0 : dot[t]) + product;                              \
                    }                                                                          \
                }                                                                              \
                for (int64_t b = 0; b < n; b++) {                                              \
                    T *g = ENTRY(grad, rows, a, b, n, grad_stride);                            \
                    T *m = ENTRY(matrix, rows, a, b, n, stride);                               \
                    for (int64_t t = 0; t < len; t++) {                                        \
                        T difference = g[t] - dot[t];                                          \
                        g[t] = difference / total[t];                                          \
                        m[t] *= total[t];                                                      \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }

DEFINE_NORMALIZE(float, f32)
DEFINE_NORMALIZE(double, f64)

#endif
