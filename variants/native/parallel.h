/* Blocks of rows split among threads, for the kernels that include it (the build adds
 * -fopenmp to those; variants/native/__init__.py). Part of their libraries' cache keys. */
#ifndef VARIANTS_NATIVE_PARALLEL_H
#define VARIANTS_NATIVE_PARALLEL_H

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

/* A loop over blocks of rows split among OpenMP's threads where the library is built with
 * OpenMP: the runtime PyTorch's CPU ops use (PyTorch loaded libgomp.so.1, and the loader
 * gives this library the same one by name), so no second pool of threads competes for the
 * cores, and as many threads as torch.get_num_threads() in the calling thread. Each block's
 * results are its own and parameter sums are added in block order after the loop, so results
 * do not depend on the number of threads. */
#define NATIVE_PRAGMA(text) _Pragma(#text)
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_BLOCKS(...)                                                                   \
    NATIVE_PRAGMA(omp parallel for schedule(static) if (omp_get_max_threads() > 1) __VA_ARGS__)
#else
#define PARALLEL_BLOCKS(...)
#endif

#endif
