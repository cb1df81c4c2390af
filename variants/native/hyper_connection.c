/* Hyper-Connections' dynamic connection weights (Zhu et al. 2025, "Hyper-Connections", ICLR;
 * arXiv 2409.19606, eq. 11-13) and their backward, for variants/native/hyper_connection.py.
 * Each of the n streams of every token is a row x of width d:
 *
 *     t = tanh(LayerNorm(x) W^T)                  W: (m, d), m = n + 2 (W_m, W_r's n, W_beta)
 *     out[j] = offset[s, j] + scale[j] * t[j]     s = the row's stream (row mod n)
 *
 * out's first m - 1 columns ([A_m | A_r], the read-out's weights) and its last (B, the
 * write-back's) are written to, and their gradients read from, two arrays.
 * where offset holds the static [A_m | A_r | B] of stream s and scale is (s_alpha x (n + 1),
 * s_beta). LayerNorm is PyTorch's (gain and bias, biased variance, eps inside the square root).
 * The formula is PyTorch's; the order of its additions is this file's own, so results agree
 * with PyTorch's ops to float rounding, not bit for bit. What it saves is the ~16 separate
 * PyTorch ops forward and ~30 backward that each pass over the rows once (each a dispatch), and
 * a (rows x d) by (d x m) product far too narrow for a GEMM library to run well.
 *
 * Sums over a row run in LANES interleaved partial sums (so that the compiler may vectorize
 * them without -ffast-math), added up in a fixed order at the end; the parameters' gradients
 * are summed over a block of BLOCK rows in T and the blocks' sums in double: the result does
 * not depend on the machine's vector width, and its error grows with the block, not all rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

#include "lanes.h"
#include "native.h"
#include "parallel.h"

#define BLOCK 64

/* tanh in float over a block, in a form the compiler vectorizes (glibc's tanhf is a call per
 * value: ~26 ns each here, measured, 2/3 of the forward). Below |z| = 0.55 its odd Taylor series
 * to z^19 (an alternating series: the first term left out is under 1e-9 relative); above,
 * 1 - 2 / (exp(2|z|) + 1), exp from its Taylor series to r^8 after a reduction by k ln 2
 * (|r| <= ln 2 / 2; ln 2 split in two so that k ln 2 is exact): within 2 units in the last place
 * of tanh (tests/variants/test_native_hyper_connection.py); NaN stays NaN. */
static inline float exp_reduced(float x) { /* x in [-20, 20] */
    /* round to the nearest integer by adding and taking away 1.5 * 2^23 (rintf is a call) */
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = (x - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040 + r * (1.0f / 40320))))))));
    union { float f; int32_t i; } scale = {.i = ((int32_t)k + 127) << 23};
    return p * scale.f;
}

static inline void tanh_block_f32(float *z, int64_t count) {
    for (int64_t i = 0; i < count; i++) {
        float x = z[i], a = __builtin_fabsf(x), a2 = a * a;
        float series = a * (1.0f + a2 * (-0.333333333f + a2 * (0.133333333f + a2 * (-0.0539682540f
                       + a2 * (0.0218694885f + a2 * (-0.00886323553f + a2 * (0.00359212804f
                       + a2 * (-0.00145583439f + a2 * (0.000590027441f
                       + a2 * -0.000239129114f)))))))));
        float exponential = 1.0f - 2.0f / (exp_reduced(2.0f * (a < 10.0f ? a : 10.0f)) + 1.0f);
        float t = __builtin_copysignf(a < 0.55f ? series : exponential, x);
        z[i] = x == x ? t : x; /* NaN stays NaN, as divergence must show */
    }
}

static inline void tanh_block_f64(double *z, int64_t count) {
    for (int64_t i = 0; i < count; i++) z[i] = tanh(z[i]);
}

#define DEFINE_DYNAMIC_WEIGHTS(T, SUFFIX, SQRT)                                          \
    /* x_hat = (x - mean) * rstd and y = x_hat * gain + bias for one row. */                   \
    static inline void normalize_##SUFFIX(const T *x, T mean, T rstd, const T *gain,           \
                                          const T *bias, T *x_hat, T *y, int64_t d) {          \
        for (int64_t i = 0; i < d; i++) {                                                      \
            x_hat[i] = (x[i] - mean) * rstd;                                                   \
            y[i] = x_hat[i] * gain[i] + bias[i];                                               \
        }                                                                                      \
    }                                                                                          \
                                                                                               \
    /* out (rows, m) as in the header, as first (rows, m - 1) and last (rows); keeps t         \
     * (rows, m), each row's mean and 1/sqrt(var + eps) for the backward. rows is a multiple  \
     * of n. Returns -1 where it has no memory. */                                            \
    VECTOR_CLONES int dynamic_weights_##SUFFIX(                                                \
        const T *x, const T *gain, const T *bias, const T *w, const T *offset, const T *scale, \
        int64_t rows, int64_t n, int64_t d, int64_t m, double eps, T *first, T *last, T *t,    \
        T *mean, T *rstd) {                                                                    \
        if (rows <= 0 || d <= 0) return 0;                                                     \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(rows * d, reduction(| : failed))                                 \
        for (int64_t start = 0; start < rows; start += BLOCK) {                                \
            int64_t end = start + BLOCK < rows ? start + BLOCK : rows;                         \
            T *x_hat = workspace(2 * (size_t)d * sizeof(T)), *y = x_hat + d;                   \
            if (!x_hat) {                                                                      \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            for (int64_t r = start; r < end; r++) {                                            \
                const T *row = x + r * d;                                                      \
                T mu = sum_##SUFFIX(row, d) / (T)d;                                            \
                for (int64_t i = 0; i < d; i++) x_hat[i] = row[i] - mu;                        \
                T var = dot_##SUFFIX(x_hat, x_hat, d) / (T)d;                                  \
                T inv = (T)1 / SQRT(var + (T)eps);                                             \
                mean[r] = mu;                                                                  \
                rstd[r] = inv;                                                                 \
                normalize_##SUFFIX(row, mu, inv, gain, bias, x_hat, y, d);                     \
                for (int64_t j = 0; j < m; j++) t[r * m + j] = dot_##SUFFIX(y, w + j * d, d);  \
            }                                                                                  \
            tanh_block_##SUFFIX(t + start * m, (end - start) * m);                             \
            for (int64_t r = start; r < end; r++) {                                            \
                const T *base = offset + r % n * m, *tanh_z = t + r * m;                       \
                for (int64_t j = 0; j < m - 1; j++)                                            \
                    first[r * (m - 1) + j] = base[j] + scale[j] * tanh_z[j];                   \
                last[r] = base[m - 1] + scale[m - 1] * tanh_z[m - 1];                          \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        return failed ? -1 : 0;                                                                \
    }                                                                                          \
                                                                                               \
    /* Given out's gradient (as grad_first, grad_last) and the forward's t, mean and rstd:      \
     * grad_x (rows, d) is written (added to it where accumulate is set); the gradients        \
     * of gain (d), bias (d), w (m, d), offset (n, m) and scale (m) are                        \
     * summed over the rows into `sums` (double, in that order, zeroed by the caller). */      \
    VECTOR_CLONES int dynamic_weights_backward_##SUFFIX(                                       \
        const T *x, const T *gain, const T *bias, const T *w, const T *scale, int64_t rows,    \
        int64_t n, int64_t d, int64_t m, const T *t, const T *mean, const T *rstd,             \
        const T *grad_first, const T *grad_last, T *grad_x, double *sums, int accumulate) {    \
        if (rows <= 0 || d <= 0) return 0;                                                     \
        /* Each block's parameter sums, (2 + m) d + n m + m of them: gain, bias, w, offset and \
         * scale, as in `sums`. */                                                             \
        size_t per_block = (2 + (size_t)m) * (size_t)d + (size_t)(n * m + m);                  \
        int64_t blocks = (rows + BLOCK - 1) / BLOCK;                                           \
        T *block_sums = gather_space((size_t)blocks * per_block * sizeof(T));                  \
        if (!block_sums) return -1;                                                            \
        int failed = 0;                                                                        \
        PARALLEL_BLOCKS_BEGIN(rows * d, reduction(| : failed))                                 \
        for (int64_t start = 0; start < rows; start += BLOCK) {                                \
            int64_t end = start + BLOCK < rows ? start + BLOCK : rows;                         \
            T *x_hat = workspace((3 * (size_t)d + (size_t)m) * sizeof(T));                     \
            if (!x_hat) {                                                                      \
                failed = 1;                                                                    \
                continue;                                                                      \
            }                                                                                  \
            T *y = x_hat + d, *grad_y = y + d, *grad_z = grad_y + d;                           \
            T *block_gain = block_sums + start / BLOCK * per_block;                            \
            T *block_bias = block_gain + d, *block_w = block_bias + d;                         \
            T *block_offset = block_w + m * d, *block_scale = block_offset + n * m;            \
            for (size_t i = 0; i < per_block; i++) block_gain[i] = 0;                          \
            for (int64_t r = start; r < end; r++) {                                            \
                const T *row = x + r * d;                                                      \
                T inv = rstd[r];                                                               \
                normalize_##SUFFIX(row, mean[r], inv, gain, bias, x_hat, y, d);                \
                for (int64_t j = 0; j < m; j++) {                                              \
                    T g = j < m - 1 ? grad_first[r * (m - 1) + j] : grad_last[r];              \
                    T tanh_z = t[r * m + j];                                                   \
                    block_offset[r % n * m + j] += g;                                          \
                    block_scale[j] += g * tanh_z;                                              \
                    grad_z[j] = g * scale[j] * ((T)1 - tanh_z * tanh_z);                       \
                }                                                                              \
                for (int64_t i = 0; i < d; i++) grad_y[i] = 0;                                 \
                for (int64_t j = 0; j < m; j++) {                                              \
                    T g = grad_z[j];                                                           \
                    const T *wj = w + j * d;                                                   \
                    T *bw = block_w + j * d;                                                   \
                    for (int64_t i = 0; i < d; i++) {                                          \
                        grad_y[i] += g * wj[i];                                                \
                        bw[i] += g * y[i];                                                     \
                    }                                                                          \
                }                                                                              \
                for (int64_t i = 0; i < d; i++) {                                              \
                    block_gain[i] += grad_y[i] * x_hat[i];                                     \
                    block_bias[i] += grad_y[i];                                                \
                    grad_y[i] *= gain[i]; /* now the gradient of x_hat */                      \
                }                                                                              \
                T mean_grad = sum_##SUFFIX(grad_y, d) / (T)d;                                  \
                T mean_grad_x_hat = dot_##SUFFIX(grad_y, x_hat, d) / (T)d;                     \
                T *gx = grad_x + r * d;                                                        \
                if (accumulate) /* onto the read-out's gradient of the same streams */         \
                    for (int64_t i = 0; i < d; i++)                                            \
                        gx[i] += inv * (grad_y[i] - mean_grad - x_hat[i] * mean_grad_x_hat);   \
                else                                                                           \
                    for (int64_t i = 0; i < d; i++)                                            \
                        gx[i] = inv * (grad_y[i] - mean_grad - x_hat[i] * mean_grad_x_hat);    \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
        if (failed) return -1;                                                                 \
        add_blocks_##SUFFIX(sums, block_sums, blocks, (int64_t)per_block, (int64_t)per_block); \
        return 0;                                                                              \
    }

DEFINE_DYNAMIC_WEIGHTS(float, f32, sqrtf)
DEFINE_DYNAMIC_WEIGHTS(double, f64, sqrt)

/* The read-out of a Hyper-Connection (and of mHC, which reuses it), per token:
 *
 *     out[t] = sum_s weights[s, t] * streams[s]      t = 0 .. n (t = 0: the sublayer's input)
 *
 * for (tokens, n, n + 1) weights and (tokens, n, d) streams, out[0] to `read` (tokens, d) and
 * out[1..n] to `mixed` (tokens, n, d); and its backward from the gradients of both: the streams'
 * sum_t weights[s, t] * grad[t] and the weights' dot(streams[s], grad[t]). CPU bmm runs these
 * as one tiny GEMM per token; here a token's streams and gradients are read once. */
#define DEFINE_READ_OUT(T, SUFFIX)                                                             \
    VECTOR_CLONES void read_out_##SUFFIX(const T *weights, const T *streams, int64_t tokens,   \
                                         int64_t n, int64_t d, T *read, T *mixed) {            \
        PARALLEL_BLOCKS_BEGIN(tokens * n * d, default(shared))                                 \
        for (int64_t start = 0; start < tokens; start += BLOCK)                                \
        for (int64_t b = start; b < (start + BLOCK < tokens ? start + BLOCK : tokens); b++) {  \
            const T *w = weights + b * n * (n + 1), *h = streams + b * n * d;                  \
            for (int64_t t = 0; t <= n; t++) {                                                 \
                T *out = t == 0 ? read + b * d : mixed + (b * n + t - 1) * d;                  \
                T first = w[t];                                                                \
                for (int64_t i = 0; i < d; i++) out[i] = first * h[i];                         \
                for (int64_t s = 1; s < n; s++) {                                              \
                    T ws = w[s * (n + 1) + t];                                                 \
                    const T *hs = h + s * d;                                                   \
                    for (int64_t i = 0; i < d; i++) out[i] += ws * hs[i];                      \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
    }                                                                                          \
                                                                                               \
    VECTOR_CLONES void read_out_backward_##SUFFIX(                                             \
        const T *weights, const T *streams, const T *grad_read, const T *grad_mixed,           \
        int64_t tokens, int64_t n, int64_t d, T *grad_weights, T *grad_streams) {              \
        PARALLEL_BLOCKS_BEGIN(tokens * n * d, default(shared))                                 \
        for (int64_t start = 0; start < tokens; start += BLOCK)                                \
        for (int64_t b = start; b < (start + BLOCK < tokens ? start + BLOCK : tokens); b++) {  \
            const T *w = weights + b * n * (n + 1), *h = streams + b * n * d;                  \
            T *gw = grad_weights + b * n * (n + 1);                                            \
            for (int64_t s = 0; s < n; s++) {                                                  \
                T *gh = grad_streams + (b * n + s) * d;                                        \
                for (int64_t t = 0; t <= n; t++) {                                             \
                    const T *g = t == 0 ? grad_read + b * d : grad_mixed + (b * n + t - 1) * d; \
                    T wst = w[s * (n + 1) + t];                                                \
                    if (t == 0)                                                                \
                        for (int64_t i = 0; i < d; i++) gh[i] = wst * g[i];                    \
                    else                                                                       \
                        for (int64_t i = 0; i < d; i++) gh[i] += wst * g[i];                   \
                    gw[s * (n + 1) + t] = dot_##SUFFIX(h + s * d, g, d);                       \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
    }

DEFINE_READ_OUT(float, f32)
DEFINE_READ_OUT(double, f64)

/* The write-back's backward (Hyper-Connections' "+ B^T T(h)", mHC's "+ H_post^T F(...)"): for
 *
 *     out[s] = streams[s] + write[s] * output       per token, s = 0 .. n - 1
 *
 * and out's gradient g (tokens, n, d), the gradients of write (tokens, n) and output (tokens, d):
 *
 *     grad_write[s] = sum_i g[s, i] * output[i]      grad_output = sum_s write[s] * g[s]
 *
 * (the streams' is g itself). Autograd's addcmul backward multiplies the whole (tokens, n, d)
 * gradient twice into new tensors and sums each; here a token's gradient is read once. */
#define DEFINE_WRITE_BACK(T, SUFFIX)                                                           \
    VECTOR_CLONES void write_back_backward_##SUFFIX(                                           \
        const T *grad, const T *write, const T *output, int64_t tokens, int64_t n, int64_t d,  \
        T *grad_write, T *grad_output) {                                                       \
        PARALLEL_BLOCKS_BEGIN(tokens * n * d, default(shared))                                 \
        for (int64_t start = 0; start < tokens; start += BLOCK)                                \
        for (int64_t b = start; b < (start + BLOCK < tokens ? start + BLOCK : tokens); b++) {  \
            const T *g = grad + b * n * d, *w = write + b * n, *o = output + b * d;            \
            T *go = grad_output + b * d;                                                       \
            for (int64_t i = 0; i < d; i++) go[i] = w[0] * g[i];                               \
            for (int64_t s = 1; s < n; s++)                                                    \
                for (int64_t i = 0; i < d; i++) go[i] += w[s] * g[s * d + i];                  \
            for (int64_t s = 0; s < n; s++)                                                    \
                grad_write[b * n + s] = dot_##SUFFIX(g + s * d, o, d);                         \
        }                                                                                      \
        PARALLEL_BLOCKS_END                                                                    \
    }

DEFINE_WRITE_BACK(float, f32)
DEFINE_WRITE_BACK(double, f64)
