/* The linear rounds of Sinkhorn-Knopp (mHC, Xie et al. 2025, arXiv 2512.24880) and their exact
 * backward, on (n, n, tokens) matrices with tokens last, for variants/native/sinkhorn.py.
 *
 * Every operation is the one that module's PyTorch loop performs, in the same order and
 * precision: a sum of n entries added to zero from the first to the last (as Tensor.sum adds,
 * so that a sum of negative zeros is +0 in both), one division per entry, the
 * backward's products rounded before they are added (built with -ffp-contract=off, so no fused
 * multiply-add): the results are bit for bit the loop's. What it saves is the ~270 separate
 * PyTorch ops a call costs (each a dispatch and a pass over the matrix), by running all rounds
 * over one block of tokens while it sits in cache; the backward recomputes the rounds' sums for
 * its block instead of reading ones saved by the forward (2 x rounds x n a token).
 */
#include <stdint.h>
#include <stdlib.h>

#include "native.h"
#include "sinkhorn_rounds.h"

#define BLOCK 64 /* tokens a pass works on: the block's matrix and sums stay in L1/L2 cache */

#define DEFINE_ROUNDS(T, SUFFIX)                                                               \
    /* rounds x (columns, rows) normalizations of matrix, in place. Returns 0, or -1 where     \
     * memory for a block's sums ran out. */                                                   \
    VECTOR_CLONES int sinkhorn_rounds_##SUFFIX(T *matrix, int64_t n, int64_t tokens,           \
                                               int64_t rounds) {                               \
        if (rounds <= 0 || tokens <= 0 || n <= 0) return 0;                                    \
        T *sums = workspace(sizeof(T) * 2 * rounds * n * BLOCK);                               \
        if (!sums) return -1;                                                                  \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t r = 0; r < 2 * rounds; r++)                                           \
                normalize_##SUFFIX(matrix + start, sums + r * n * len, r % 2, n, tokens, len); \
        }                                                                                      \
        return 0;                                                                              \
    }                                                                                          \
                                                                                               \
    /* grad, the gradient of the rounds' result, becomes that of their input `initial`: per    \
     * block, the rounds run again on a copy of `initial` keeping their sums, then back through\
     * every normalization (normalize_backward). Returns 0, or -1 where memory for a block ran \
     * out. */                                                                                 \
    VECTOR_CLONES int sinkhorn_rounds_backward_##SUFFIX(T *grad, const T *initial, int64_t n,  \
                                                        int64_t tokens, int64_t rounds) {      \
        if (rounds <= 0 || tokens <= 0 || n <= 0) return 0;                                    \
        T *matrix = workspace(sizeof(T) * (n * n + 2 * rounds * n + 1) * BLOCK);               \
        if (!matrix) return -1;                                                                \
        T *dot = matrix + n * n * BLOCK, *sums = dot + BLOCK;                                  \
        for (int64_t start = 0; start < tokens; start += BLOCK) {                              \
            int64_t len = tokens - start < BLOCK ? tokens - start : BLOCK;                     \
            for (int64_t entry = 0; entry < n * n; entry++)                                    \
                for (int64_t t = 0; t < len; t++)                                              \
                    matrix[entry * BLOCK + t] = initial[entry * tokens + start + t];           \
            for (int64_t r = 0; r < 2 * rounds; r++)                                           \
                normalize_##SUFFIX(matrix, sums + r * n * len, r % 2, n, BLOCK, len);          \
            normalize_backward_##SUFFIX(grad + start, tokens, matrix, sums, dot, 2 * rounds, n,\
                                        BLOCK, len);                                           \
        }                                                                                      \
        return 0;                                                                              \
    }

DEFINE_ROUNDS(float, f32)
DEFINE_ROUNDS(double, f64)
