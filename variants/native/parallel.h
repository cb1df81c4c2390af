/* Blocks of rows split among threads, for the kernels that include it (the build adds
 * -fopenmp to those; variants/native/__init__.py). Part of their libraries' cache keys. */
#ifndef VARIANTS_NATIVE_PARALLEL_H
#define VARIANTS_NATIVE_PARALLEL_H

#include <stdint.h>

#include "native.h"

/* A second buffer kept per thread, for what a call gathers from its threads (each block's
 * parameter sums): the calling thread takes part in the parallel loop, whose scratch is
 * workspace()'s. */
static _Thread_local void *gathered;
static _Thread_local size_t gathered_bytes;

static void *gather_space(size_t bytes) {
    if (bytes > gathered_bytes) {
        free(gathered);
        gathered = aligned_alloc(64, (bytes + 63) / 64 * 64);
        gathered_bytes = gathered ? bytes : 0;
    }
    return gathered;
}

/* The calling thread's floating-point mode (x86's MXCSR, AArch64's FPCR), which
 * torch.set_flush_denormal sets for that thread alone: the other threads take it on for the
 * loop and give it back after, so that every block flushes subnormals as the caller would. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned int float_mode_t;
static inline float_mode_t float_mode(void) { return _mm_getcsr(); }
static inline void set_float_mode(float_mode_t mode) { _mm_setcsr(mode); }
#elif defined(__aarch64__)
typedef uint64_t float_mode_t;
static inline float_mode_t float_mode(void) {
    float_mode_t mode;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(mode));
    return mode;
}
static inline void set_float_mode(float_mode_t mode) {
    __asm__ __volatile__("msr fpcr, %0" : : "r"(mode));
}
#else
typedef int float_mode_t;
static inline float_mode_t float_mode(void) { return 0; }
static inline void set_float_mode(float_mode_t mode) { (void)mode; }
#endif

/* A loop over blocks of rows split among OpenMP's threads where the library is built with
 * OpenMP, written as
 *
 *     PARALLEL_BLOCKS_BEGIN(elements, clauses of the parallel region: at least one)
 *     for (...) { one block }
 *     PARALLEL_BLOCKS_END
 *
 * OpenMP is the runtime PyTorch's CPU ops use (PyTorch loaded libgomp.so.1, and the loader
 * gives this library the same one by name), so no second pool of threads competes for the
 * cores, with as many threads as torch.get_num_threads() in the calling thread, each in the
 * caller's floating-point mode. Each block's results are its own and parameter sums are added
 * in block order after the loop, so results do not depend on the number of threads.
 *
 * The loop runs on the caller alone where its `elements` (roughly the values it passes
 * over) are fewer than GRAIN, PyTorch's own grain (a process whose ops are all smaller
 * never starts OpenMP's threads, here as in PyTorch), inside another parallel region, and in
 * a child fork()ed after this library loaded: libgomp's threads do not survive a fork, and a
 * parallel region in the child would wait for them forever (PyTorch's own ops above the grain
 * do the same; start workers by spawn). */
#define NATIVE_PRAGMA(text) _Pragma(#text)
#ifdef _OPENMP
#include <omp.h>
#include <pthread.h>

#define GRAIN 32768

static int forked_child; /* set in a child of fork(): OpenMP's threads stayed behind */
static void note_forked_child(void) { forked_child = 1; }
__attribute__((constructor)) static void watch_for_fork(void) {
    pthread_atfork(NULL, NULL, note_forked_child);
}

static inline int parallel_pays(int64_t elements) {
    return elements >= GRAIN && !forked_child && omp_get_max_threads() > 1 && !omp_in_parallel();
}

#define PARALLEL_BLOCKS_BEGIN(elements, ...)                                                   \
    {                                                                                          \
        float_mode_t caller_mode = float_mode();                                               \
        NATIVE_PRAGMA(omp parallel if (parallel_pays(elements)) __VA_ARGS__) {                 \
            float_mode_t own_mode = float_mode();                                              \
            set_float_mode(caller_mode);                                                       \
            NATIVE_PRAGMA(omp for schedule(static))
#define PARALLEL_BLOCKS_END                                                                    \
            set_float_mode(own_mode);                                                          \
        }                                                                                      \
    }
#else
#define PARALLEL_BLOCKS_BEGIN(elements, ...) {
#define PARALLEL_BLOCKS_END }
#endif

/* sums[i] += blocks[b * stride + i] for i < count, the blocks b < block_count in their order
 * whatever the threads: a loop's parameter sums, kept apart per block inside it, added up. */
#define DEFINE_ADD_BLOCKS(T, SUFFIX)                                                           \
    static inline void add_blocks_##SUFFIX(double *sums, const T *blocks, int64_t block_count, \
                                           int64_t count, int64_t stride) {                    \
        PARALLEL_BLOCKS_BEGIN(block_count * count, default(shared))                            \
        for (int64_t i = 0; i < count; i++)                                                    \
            for (int64_t b = 0; b < block_count; b++) sums[i] += blocks[b * stride + i];       \
        PARALLEL_BLOCKS_END                                                                    \
    }

DEFINE_ADD_BLOCKS(float, f32)
DEFINE_ADD_BLOCKS(double, f64)


#endif
