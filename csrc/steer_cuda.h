// Launch interface of steer_cuda.cu: plain types only, so the kernel translation unit compiles
// with nvcc without torch headers and the torch-facing side (bindings.cpp) without CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace costeer {
namespace cuda {

enum : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

struct SteerLaunch {
  const void* zl;
  const void* zc;
  const void* zn;  // nullptr: zc holds the delta
  long long zl_stride, zc_stride, zn_stride;  // row strides in elements
  int zl_dtype, zc_dtype, zn_dtype;
  const double* hp;  // [R, 5] contiguous
  long long hp_stride;  // 0 (broadcast) or 5
  float* out;
  long long out_stride;
  int* status;  // [B]
  long long B, V;
  int iterative;
  int splits;  // blocks per row (closed form); from steer_cuda_splits
  float* part;  // [B * splits * 2] when splits > 1
  int* part_flags;  // [B * splits] when splits > 1
  unsigned* counters;  // [2 B], zero before the launch; counts left zero after it
  int barrier;  // set by steer_cuda_launch: 1 when the whole grid is resident on the GPU at once
  int force_last;  // 1: always the last-block merge (benchmarks, tests)
  float* u;  // [B, V] scratch of the iterative form
};

// Blocks per row for a closed-form launch on `device` (cached SM count; no sync).
int steer_cuda_splits(long long B, long long V, int device);
cudaError_t steer_cuda_launch(const SteerLaunch& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace costeer
