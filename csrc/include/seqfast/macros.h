#pragma once
// Portability macros shared by the C++ (CPU) and CUDA translation units.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SEQFAST_HOST_DEVICE __host__ __device__
#else
#define SEQFAST_HOST_DEVICE
#endif

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define SEQFAST_DEVICE_CODE 1
#else
#define SEQFAST_DEVICE_CODE 0
#endif

#define SEQFAST_INLINE SEQFAST_HOST_DEVICE inline __attribute__((always_inline))
