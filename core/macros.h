#pragma once
// Portability macros shared by host code and CUDA kernels.

#if defined(__CUDACC__)
#define MINIDL_HD __host__ __device__
#define MINIDL_FORCEINLINE __forceinline__
#else
#define MINIDL_HD
#define MINIDL_FORCEINLINE inline __attribute__((always_inline))
#endif
