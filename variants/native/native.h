/* What every kernel file in variants/native shares. Part of each library's cache key
 * (variants/native/__init__.py hashes the headers beside the source). */
#ifndef VARIANTS_NATIVE_H
#define VARIANTS_NATIVE_H

#include <stddef.h>
#include <stdlib.h>

/* AVX2 clones picked at load time where GCC builds for x86-64 (the build targets the
 * architecture's baseline). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Memory kept per thread from call to call (one per library): with memory allocated afresh in
 * every call (malloc or aligned_alloc, a few to a few hundred KB) sinkhorn.c's forward ran ~2x
 * slower on the VM it was measured on, most likely from page faults on memory mapped afresh
 * (not proven). NULL where it cannot be had. */
static _Thread_local void *kept;
static _Thread_local size_t kept_bytes;

static void *workspace(size_t bytes) {
    if (bytes > kept_bytes) {
        free(kept);
        kept = aligned_alloc(64, (bytes + 63) / 64 * 64); /* a cache line apart from the rest */
        kept_bytes = kept ? bytes : 0;
    }
    return kept;
}

#endif
