// What the CPU kernels share: operands of any input dtype read as float32 chunks, and the closed
// form's first sweep over a row segment (steer_cpu.cpp), which the fused sampler (sample_cpu.cpp)
// and the fused projection (W h rows computed chunk by chunk in place of z_c) reuse.
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

#include <vector>

#include "steer_math.h"

namespace costeer {
namespace cpu {

// Elements per chunk: three float32 input chunks plus x stay in L1.
constexpr int64_t CHUNK = 2048;
enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_1 = 4, Q5_0 = 5, Q4_K = 6, Q6_K = 7 };

// GGML's Q8_0 weight rows (Kernels::project only): per 32 elements, the fp16 scale d then 32 int8
// q, element d * q. The product is exact in float32 (11 + 8 significant bits), so a weight
// vector formed in registers IS the de-quantized float32 weight, and the same FMAs in the same
// order give the float32 path's result bit for bit, from 34 bytes per 32 weights instead of 128.
constexpr int64_t Q8_0_BLOCK = 32;
constexpr int64_t Q8_0_BYTES = 34;

// GGML's Q4_1 weight rows (Kernels::project only): per 32 elements, fp16 d, fp16 m, then 16 bytes
// whose low nibbles are elements 0-15 and high nibbles 16-31; element (d * q) + m in float32 (as
// gguf-py de-quantizes it). d * q is exact (11 + 4 bits), so fma(q, d, m) rounds once, like the
// add: the weight formed in registers is the de-quantized float32 weight, from 20 bytes per 32.
constexpr int64_t Q4_1_BLOCK = 32;
constexpr int64_t Q4_1_BYTES = 20;

// GGML's Q5_0 weight rows (Kernels::project only): per 32 elements, fp16 d, a little-endian uint32
// whose bit j is element j's fifth bit, then 16 bytes of nibbles ordered as Q4_1's; element
// d * (q - 16), exact in float32 (11 + 5 bits).
constexpr int64_t Q5_0_BLOCK = 32;
constexpr int64_t Q5_0_BYTES = 22;

// GGML's K-quant weight rows (Kernels::project only), super-blocks of 256 elements, de-quantized as
// gguf-py does. Q4_K: fp16 d, fp16 dmin, 12 bytes packing eight 6-bit scales sc and mins m, then
// 128 bytes: per 64 elements, 32 bytes whose low nibbles are the first 32 and high nibbles the
// next 32 (sub-blocks s = 2g, 2g + 1); element (d * sc_s) * q - dmin * m_s. d * sc_s and dmin * m_s
// are exact in float32 (11 + 6 bits), so is their product with q (+ 4 bits): one rounding, in the
// subtraction, which fma(q, d * sc_s, -(dmin * m_s)) makes too.
constexpr int64_t Q4_K_BLOCK = 256;
constexpr int64_t Q4_K_BYTES = 144;

// Q6_K: 128 bytes of low nibbles ql, 64 bytes of 2-bit high parts qh, 16 int8 scales sc, fp16 d;
// element i = (d * sc[i / 16]) * (q - 32), q = low | high << 4. d * sc is exact (11 + 8 bits), its
// product with q - 32 one rounding, the same in registers.
constexpr int64_t Q6_K_BLOCK = 256;
constexpr int64_t Q6_K_BYTES = 210;

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

// The loops of one instruction-set path (cpu_isa.cpp): "portable" (baseline x86-64 or whatever
// the compiler targets, auto-vectorized), "avx2" (AVX2 + FMA + F16C) and "avx512" (AVX-512F).
// All paths compute the same quantities; only rounding and the skipped exponentials differ.
struct Kernels {
  const char* name;
  void (*widen_f16)(const uint16_t* src, float* dst, int64_t n);
  void (*widen_bf16)(const uint16_t* src, float* dst, int64_t n);
  // x = z_L + c (z_c - z_n) into out (zn nullptr: z_c is the delta); returns the chunk max, ORs
  // the status bits into *flags and sets *sum to sum exp(x - offset) (unused when offset is -inf;
  // the SIMD paths leave out the terms below offset - 30).
  float (*steer_chunk)(const float* zl, const float* zc, const float* zn, float* out, int64_t n, float c,
                       float offset, float* sum, int* flags);
  // The same for three fp16 or three bf16 rows (dtype F16 / BF16) read as they are; nullptr where
  // a path widens them into float32 chunks first.
  float (*steer_chunk16)(const uint16_t* zl, const uint16_t* zc, const uint16_t* zn, int dtype, float* out,
                         int64_t n, float c, float offset, float* sum, int* flags);
  float (*chunk_max)(const float* x, int64_t n);
  // sum exp(x - m) for m the max of x (SIMD paths: terms below m - 30 left out).
  float (*exp_sum)(const float* x, int64_t n, float m);
  void (*subtract)(float* x, int64_t n, float v);
  void (*store_shifted)(const float* x, float* out, int64_t n, float v);
  float (*iterate_chunk)(const float* zl, const float* d, float* out, float* u, int64_t n, float lse_b,
                         float lse_p, float alpha, float beta, float tlam, float inv_eta, float denom);
  void (*delta_chunk)(const float* zc, const float* zn, float* d, int64_t n, float shift);
  // d[r * ds + i] = sum_k W[row0 + i][k] h[r * hs + k] for i < n, r < B, in float32: weight rows
  // are read once for all B rows.
  void (*project)(const Operand& w, int64_t row0, int64_t n, const float* h, int64_t hs, int64_t B,
                  int64_t H, float* d, int64_t ds);
  int64_t (*count_ge)(const float* x, int64_t n, float t);
  float (*mass_ge)(const float* x, const float* w, int64_t n, float t);
  // w = exp((x - m) * inv_tau): the tempered weights of top-p.
  void (*tempered)(const float* x, float* w, int64_t n, float m, float inv_tau);
  // out = x - v with non-temporal stores where the path has them (out is not read back soon).
  void (*store_shifted_stream)(const float* x, float* out, int64_t n, float v);
  // out[g * os + j] = sum_l p[g * ps + l] v[l * vs + j] for g < G, j < D, in float32, l in order:
  // attention's weighted values, each value row read once for the G query rows of its head.
  void (*weighted_rows)(const float* p, int64_t G, int64_t ps, const float* v, int64_t vs, int64_t L, int64_t D,
                        float* out, int64_t os);
};

// The path in use: the best this CPU runs, COSTEER_CPU_ISA at first use, or cpu_isa(request).
const Kernels& kernels();

// Elements [off, off + n) of row r as float32: in place for fp32, widened into buf otherwise.
inline const float* load_f32(const Kernels& K, const Operand& o, int64_t r, int64_t off, int64_t n, float* buf) {
  const char* p = o.base + (r * o.row_stride + off) * o.esize;
  if (o.dtype == F32) return reinterpret_cast<const float*>(p);
  if (o.dtype == F16) K.widen_f16(reinterpret_cast<const uint16_t*>(p), buf, n);
  else K.widen_bf16(reinterpret_cast<const uint16_t*>(p), buf, n);
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

// How rows are cut into segments (one task each, whole chunks of `chunk` elements): the steer
// inputs split only when there are fewer rows than threads, never below 8 chunks a segment; the
// projection (every task covers all rows, so W is read once) always splits over the threads.
struct Layout {
  int64_t chunk, splits, seg;
};
Layout layout(const Args& a, int64_t num_splits);

// Each row's parameters, once per call (the c_T recurrence is O(T)).
std::vector<RowParams> all_row_params(const Args& a);

// The closed form's first sweep: x = z_L + c_T (z_c - z_n) into a.out (rows with keep_x[r], or
// all rows when keep_x is nullptr; nothing when a.out is nullptr) and the statistics of segment k
// of row r into parts[r * L.splits + k]; with track_argmax the first index of the max; with llm,
// z_L's own (max, sum-exp) into llm[r * L.splits + k].
void first_sweep(const Args& a, const RowParams* hp, const Layout& L, bool track_argmax, Part* parts,
                 Part* llm, const bool* keep_x);

}  // namespace cpu
}  // namespace costeer
