/* exp and log in float, in forms the compiler vectorizes (glibc's are a call per value),
 * shared by mhc_mappings.c and depth_attention.c. Part of the cache key of each library that
 * includes it. */
#ifndef VARIANTS_NATIVE_VECTOR_MATH_H
#define VARIANTS_NATIVE_VECTOR_MATH_H

#include <math.h>
#include <stdint.h>

#include "lanes.h" /* INLINE */

/* exp over float's whole range: x = k ln 2 + r, |r| <= ln 2 / 2 (ln 2 split in two so that
 * k ln 2 is exact), e^r from its Taylor series to r^8 (relative error < 3e-10), times 2^k as
 * two powers of two (each a normal float, so that only the last product rounds, into the
 * subnormals where e^x lies there). NaN stays NaN. */
INLINE float exp_f32(float x) {
    float clamped = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
    clamped = x == x ? clamped : 0.0f;
    float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded */
    float r = (clamped - k * 0.693145751953125f) - k * 1.42860682030941723212e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
              + r * (1.0f / 720 + r * (1.0f / 5040 + r * (1.0f / 40320))))))));
    int32_t whole = (int32_t)k, half = whole / 2;
    union { float f; int32_t i; } low = {.i = (half + 127) << 23},
                                  high = {.i = (whole - half + 127) << 23};
    float y = (p * low.f) * high.f;
    return x == x ? y : x;
}

/* log of a positive normal float (a softmax's sum, in [1, n]): x = m 2^e with m in
 * [1/sqrt 2, sqrt 2), log m = 2 atanh((m - 1) / (m + 1)) from its series to the 13th power
 * (relative error < 2e-11). NaN stays NaN; zero, subnormals and infinity are not handled. */
INLINE float log_f32(float x) {
    union { float f; int32_t i; } bits = {.f = x};
    int32_t exponent = ((bits.i >> 23) & 0xff) - 127;
    bits.i = (bits.i & 0x007fffff) | 0x3f800000;
    float m = bits.f;
    int over = m > 1.41421356237f;
    m = over ? 0.5f * m : m;
    exponent += over;
    float f = (m - 1.0f) / (m + 1.0f), f2 = f * f;
    float series = 2.0f * f * (1.0f + f2 * (1.0f / 3 + f2 * (1.0f / 5 + f2 * (1.0f / 7
                   + f2 * (1.0f / 9 + f2 * (1.0f / 11 + f2 * (1.0f / 13)))))));
    float y = (float)exponent * 0.693145751953125f
              + (series + (float)exponent * 1.42860682030941723212e-6f);
    return x == x ? y : x;
}

INLINE double exp_f64(double x) { return exp(x); }
INLINE double log_f64(double x) { return log(x); }

#endif
