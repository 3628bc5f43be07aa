#pragma once
// CPU-only helpers for the vectorized loops of csrc/cpu.

// Compile a function for AVX-512, AVX2 and baseline x86-64; the dynamic loader picks one (ifunc), so
// the extension runs on any x86-64 and uses AVX-512 where it exists. Helpers called from such a
// function must be always_inline so they are compiled for the caller's target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQFAST_CPU_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SEQFAST_CPU_MULTIVERSION
#endif

#define SEQFAST_CPU_INLINE inline __attribute__((always_inline))
