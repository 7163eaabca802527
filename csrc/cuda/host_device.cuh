// FASTAT_HD marks the functions shared by the kernels and the host tests: __host__ __device__ under nvcc,
// plain inline under g++ (tests/test_cuda_build.py compiles the ATen-free headers for the host).
#pragma once

#if defined(__CUDACC__)
#define FASTAT_HD __host__ __device__ __forceinline__
#else
#define FASTAT_HD inline
#endif
