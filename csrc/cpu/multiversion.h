#pragma once
// CPU-only helpers for the vectorized loops of csrc/cpu.

// Compile a function for AVX-512, AVX2 and baseline x86-64; the dynamic loader picks one (ifunc), so
// the extension runs on any x86-64 and uses AVX-512 where it exists. The AVX-512 clone is x86-64-v4
// (F, BW, DQ, VL), not AVX512F alone: without BW/VL GCC vectorized the bfloat16 gate passes (16-bit
// loads and stores) with 256-bit AVX2 code even in that clone, and spilled registers (perf: the bf16
// LSTM gate pass at 27% of a canonical inference). Helpers called from such a
// function must be always_inline so they are compiled for the caller's target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEQFAST_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SEQFAST_CPU_MULTIVERSION
#endif

#define SEQFAST_CPU_INLINE inline __attribute__((always_inline))
