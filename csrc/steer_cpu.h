// What the CPU kernels share: operands of any input dtype read as float32 chunks, and the closed
// form's first sweep over a row segment (steer_cpu.cpp), which the fused sampler (sample_cpu.cpp)
// and the fused projection (W h rows computed chunk by chunk in place of z_c) reuse.
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

#include "steer_math.h"

namespace costeer {
namespace cpu {

// Elements per chunk: three float32 input chunks plus x stay in L1.
constexpr int64_t CHUNK = 2048;
enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2 };

void widen_f16(const uint16_t* __restrict src, float* __restrict dst, int64_t n);
void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t n);
float exp_sum(const float* __restrict x, int64_t n, float m);

struct Operand {
  const char* base = nullptr;
  int64_t row_stride = 0;  // elements
  int dtype = F32;
  int64_t esize = 4;
};

inline Operand operand(const at::Tensor& t, const char* op = "costeer_ext::steer") {
  Operand o;
  o.base = static_cast<const char*>(t.data_ptr());
  o.row_stride = t.size(0) > 1 ? t.stride(0) : 0;
  switch (t.scalar_type()) {
    case at::kFloat: o.dtype = F32; o.esize = 4; break;
    case at::kHalf: o.dtype = F16; o.esize = 2; break;
    case at::kBFloat16: o.dtype = BF16; o.esize = 2; break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type());
  }
  return o;
}

// Elements [off, off + n) of row r as float32: in place for fp32, widened into buf otherwise.
inline const float* load_f32(const Operand& o, int64_t r, int64_t off, int64_t n, float* buf) {
  const char* p = o.base + (r * o.row_stride + off) * o.esize;
  if (o.dtype == F32) return reinterpret_cast<const float*>(p);
  if (o.dtype == F16) widen_f16(reinterpret_cast<const uint16_t*>(p), buf, n);
  else widen_bf16(reinterpret_cast<const uint16_t*>(p), buf, n);
  return buf;
}

// z_c of a chunk computed as W[off:off+n] @ h (h float32 [H], row r of a [B, H] matrix): the
// projection's delta W (h_c - h_n), so the small model's logits never exist in memory.
struct Projection {
  Operand w;        // [V, H] weight rows (row_stride = H's stride)
  const float* h;   // [B, H] float32 hidden differences
  int64_t h_stride;
  int64_t H;
};

struct Args {
  Operand zl, zc, zn;
  bool has_noctx = false;
  const Projection* proj = nullptr;  // when set, z_c comes from the projection (and no z_n)
  const double* hp = nullptr;
  int64_t hp_stride = 0;
  float* out = nullptr;  // nullptr: x is not kept (statistics only)
  int64_t out_stride = 0;
  int32_t* status = nullptr;
  int64_t B = 0, V = 0;
};

// Running statistics of a row segment: max, sum exp(x - max), status bits, and the first index
// of the max (-1 when nothing beat -inf).
struct Part {
  float m = -STEER_INF, s = 0.0f;
  int flags = 0;
  int64_t argmax = -1;
};

// Merge a later segment q into p (p covers lower indices: ties keep p's argmax).
inline void merge_part(Part& p, const Part& q) {
  if (q.m > p.m) p.argmax = q.argmax;
  online_merge(p.m, p.s, q.m, q.s);
  p.flags |= q.flags;
}

// The closed form's first sweep over [start, end) of row r: x = z_L + c (z_c - z_n) into
// a.out (when set) and the segment's statistics; with track_argmax the first index of the max;
// with llm set, also z_L's own (max, sum-exp) merged into *llm.
Part closed_form_segment(const Args& a, int64_t r, int64_t start, int64_t end, float c,
                         bool track_argmax = false, Part* llm = nullptr);

// Row segments per row for B rows over V: split only when there are fewer rows than threads,
// and never below 8 chunks a segment.
int64_t auto_splits(int64_t B, int64_t V);

}  // namespace cpu
}  // namespace costeer
