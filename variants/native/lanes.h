/* Sums over a row in LANES interleaved partial sums, added pairwise in a fixed order at the
 * end: the compiler may vectorize them without -ffast-math, and the result does not depend on
 * the machine's vector width. Shared by hyper_connection.c and depth_attention.c; part of the
 * cache key of each library that includes it. */
#ifndef VARIANTS_NATIVE_LANES_H
#define VARIANTS_NATIVE_LANES_H

#include <stdint.h>

/* Inlined into each of the kernels' clones, so that it is compiled for the clone's vector
 * instructions: called out of line it ran the baseline's (2x slower, measured). */
#define INLINE static inline __attribute__((always_inline))

#define LANES 8
/* Three dependent additions where one after another took eight, which bounded HC's forward
 * (the 8 sums of a row: 404 against 360 us for 4,096 rows of 64, measured). */
#define ADD_LANES(lane)                                                                        \
    ((((lane)[0] + (lane)[4]) + ((lane)[2] + (lane)[6]))                                       \
     + (((lane)[1] + (lane)[5]) + ((lane)[3] + (lane)[7])))

/* sum_SUFFIX(a, d): the sum of a[i] over i < d; dot_SUFFIX(a, b, d): of a[i] * b[i]. */
#define DEFINE_LANE_SUMS(T, SUFFIX)                                                            \
    INLINE T sum_##SUFFIX(const T *a, int64_t d) {                                             \
        T lane[LANES] = {0};                                                                   \
        int64_t whole = d / LANES * LANES;                                                     \
        for (int64_t i = 0; i < whole; i += LANES)                                             \
            for (int l = 0; l < LANES; l++) lane[l] += a[i + l];                               \
        for (int64_t i = whole; i < d; i++) lane[i - whole] += a[i];                           \
        return ADD_LANES(lane);                                                                \
    }                                                                                          \
                                                                                               \
    INLINE T dot_##SUFFIX(const T *a, const T *b, int64_t d) {                                 \
        T lane[LANES] = {0};                                                                   \
        int64_t whole = d / LANES * LANES;                                                     \
        for (int64_t i = 0; i < whole; i += LANES)                                             \
            for (int l = 0; l < LANES; l++) lane[l] += a[i + l] * b[i + l];                    \
        for (int64_t i = whole; i < d; i++) lane[i - whole] += a[i] * b[i];                    \
        return ADD_LANES(lane);                                                                \
    }

DEFINE_LANE_SUMS(float, f32)
DEFINE_LANE_SUMS(double, f64)

#endif
