// CPU kernel of costeer_ext::steer (closed form and iterative).
//
// Rows are streamed in chunks of CHUNK elements that stay in L1: half/bfloat16 chunks are widened
// to float32 into stack buffers (fp32 inputs are used in place), so the math below exists once, as
// float-only loops that gcc vectorizes at -O3 (`omp simd` reductions, no -ffast-math needed).
// Closed form, per chunk: x = z_L + c_T (z_c - z_n) is written to `out` with the chunk max and the
// status bits, then sum exp(x - max) re-reads the chunk from L1 and is merged into the running
// (max, sum-exp). A second sweep subtracts the log-sum-exp in place: each input is read once.
// Small batches split each row into segments (one task each); the segments' partial statistics
// are merged by every segment task of the second sweep, in segment order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "steer_math.h"
#include "steer_cpu.h"

namespace costeer {
namespace cpu {

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (ifunc):
// a prebuilt extension cannot use -march=native.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(COSTEER_NO_CLONES)
#define STEER_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define STEER_HOT __attribute__((noinline))
#endif


STEER_HOT void widen_f16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
}

STEER_HOT void widen_bf16(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
}

// Exact status bits of a chunk whose quick test fired (x already in out).
STEER_HOT int exact_flags(const float* __restrict zl, const float* __restrict zc,
                          const float* __restrict zn, const float* __restrict out, int64_t n) {
  int f = 0;
  if (zn != nullptr) {
#pragma omp simd reduction(| : f)
    for (int64_t i = 0; i < n; ++i) f |= element_flags(zl[i], zc[i], zn[i], true, out[i]);
  } else {
#pragma omp simd reduction(| : f)
    for (int64_t i = 0; i < n; ++i) f |= element_flags(zl[i], zc[i], 0.0f, false, out[i]);
  }
  return f;
}

// x into out; returns the chunk max, ORs the status bits into *flags and sets *sum to
// sum exp(x - offset). The offset is the running max of the previous chunks: the exponentials then
// overlap the loads instead of costing a second loop (see closed_form_segment for when it is redone).
STEER_HOT float steer_chunk(const float* __restrict zl, const float* __restrict zc,
                            const float* __restrict zn, float* __restrict out, int64_t n, float c,
                            float offset, float* sum, int* flags) {
  float m = -STEER_INF, s = 0.0f;
  int bad = 0;
  if (zn != nullptr) {
#pragma omp simd reduction(max : m) reduction(| : bad) reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) {
      const float l = zl[i], a = zc[i], b = zn[i];
      const float x = steered(l, masked_delta(a, b), c);
      out[i] = x;
      bad |= suspicious((l + a) + (b + x));
      m = max_keep(m, x);
      s += steer_exp(x - offset);
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : bad) reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) {
      const float l = zl[i], a = zc[i];
      const float x = steered(l, a, c);
      out[i] = x;
      bad |= suspicious((l + a) + x);
      m = max_keep(m, x);
      s += steer_exp(x - offset);
    }
  }
  if (bad) *flags |= exact_flags(zl, zc, zn, out, n);
  *sum = s;
  return m;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(COSTEER_NO_CLONES)
#define STEER_HAVE_AVX512_PATH 1
// steer_chunk for AVX-512 machines, with the same arithmetic (FMA as in the clones above) but
// exponentials only for x > offset - 30: the x of a chunk are compacted (vcompressps) before the
// exp loop. For logits most tokens lie far below the running max, so this skips most of the
// exponentials, the cost of this kernel once its inputs are in cache. A skipped term is below
// e^-30 of the max (<= V e^-30 < 2e-8 of the sum at V = 152k: under float32 resolution).
__attribute__((target("avx512f,fma,popcnt"), noinline))
float steer_chunk_avx512(const float* __restrict zl, const float* __restrict zc,
                         const float* __restrict zn, float* __restrict out, int64_t n, float c,
                         float offset, float* sum, int* flags) {
  alignas(64) float kept[CHUNK + 16];
  const __m512 vc = _mm512_set1_ps(c), voff = _mm512_set1_ps(offset);
  const __m512 vcut = _mm512_set1_ps(offset - 30.0f), vinf = _mm512_set1_ps(STEER_INF);
  const bool steer_on = c != 0.0f;
  __m512 vm = _mm512_set1_ps(-STEER_INF);
  __mmask16 bad = 0;
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lm = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
    const __m512 l = _mm512_maskz_loadu_ps(lm, zl + i);
    const __m512 a = _mm512_maskz_loadu_ps(lm, zc + i);
    __m512 x, t;
    if (zn != nullptr) {
      const __m512 b = _mm512_maskz_loadu_ps(lm, zn + i);
      // masked_delta: a == b -> 0 (NaN compares unequal, as in C).
      const __m512 d = _mm512_maskz_sub_ps(_mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ), a, b);
      x = steer_on ? _mm512_fmadd_ps(vc, d, l) : l;
      t = _mm512_add_ps(_mm512_add_ps(l, a), _mm512_add_ps(b, x));
    } else {
      x = steer_on ? _mm512_fmadd_ps(vc, a, l) : l;
      t = _mm512_add_ps(_mm512_add_ps(l, a), x);
    }
    _mm512_mask_storeu_ps(out + i, lm, x);
    vm = _mm512_mask_max_ps(vm, lm, x, vm);  // x > m ? x : m, NaN-dropping like max_keep
    bad |= _mm512_mask_cmp_ps_mask(lm, t, vinf, _CMP_NLT_UQ);  // suspicious()
    const __mmask16 k = _mm512_mask_cmp_ps_mask(lm, x, vcut, _CMP_GT_OQ);
    _mm512_storeu_ps(kept + cnt, _mm512_maskz_compress_ps(k, _mm512_sub_ps(x, voff)));
    cnt += __builtin_popcount((unsigned)k);
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < cnt; ++i) s += steer_exp(kept[i]);
  if (bad) *flags |= exact_flags(zl, zc, zn, out, n);
  *sum = s;
  return _mm512_reduce_max_ps(vm);
}

// __builtin_cpu_init: this initializer may run before libgcc's own CPU detection constructor.
static const bool kAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
}();
static std::atomic<bool> use_avx512{kAvx512};
#else
#define STEER_HAVE_AVX512_PATH 0
#endif

STEER_HOT float chunk_max(const float* __restrict x, int64_t n) {
  float m = -STEER_INF;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = max_keep(m, x[i]);
  return m;
}

STEER_HOT float exp_sum(const float* __restrict x, int64_t n, float m) {
  const float ms = safe_max(m);
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += steer_exp(x[i] - ms);
  return s;
}

STEER_HOT void subtract(float* __restrict x, int64_t n, float v) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] - v;
}

STEER_HOT void store_shifted(const float* __restrict x, float* __restrict out, int64_t n, float v) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] - v;
}

// One iterative step over a chunk: reads p (unnormalized, lse_p) from out, updates u, writes the
// pre-softmax values back to out; returns their max.
STEER_HOT float iterate_chunk(const float* __restrict zl, const float* __restrict d,
                              float* __restrict out, float* __restrict u, int64_t n, float lse_b,
                              float lse_p, float alpha, float beta, float tlam, float inv_eta,
                              float denom) {
  float m = -STEER_INF;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const float b = zl[i] - lse_b;
    const float p = out[i] - lse_p;
    float ui = u[i];
    const float pre = iterate_element(b, d[i], p, ui, alpha, beta, tlam, inv_eta, denom);
    u[i] = ui;
    out[i] = pre;
    m = max_keep(m, pre);
  }
  return m;
}

STEER_HOT void delta_chunk(const float* __restrict zc, const float* __restrict zn,
                           float* __restrict d, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = shifted_delta(zc[i], zn[i], shift);
}

// H-long dot products of n weight rows with h (float32 accumulation): the projection's z_c chunk.
STEER_HOT void gemv_rows_f32(const float* __restrict w, int64_t ws, const float* __restrict h,
                             int64_t H, float* __restrict dst, int64_t n) {
  int64_t i = 0;
  // Four rows at a time: each load of h serves four rows, four independent FMA chains.
  for (; i + 4 <= n; i += 4) {
    const float* w0 = w + i * ws;
    const float* w1 = w0 + ws;
    const float* w2 = w1 + ws;
    const float* w3 = w2 + ws;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t k = 0; k < H; ++k) {
      const float hk = h[k];
      s0 += w0[k] * hk;
      s1 += w1[k] * hk;
      s2 += w2[k] * hk;
      s3 += w3[k] * hk;
    }
    dst[i] = s0;
    dst[i + 1] = s1;
    dst[i + 2] = s2;
    dst[i + 3] = s3;
  }
  for (; i < n; ++i) {
    const float* w0 = w + i * ws;
    float s0 = 0.0f;
#pragma omp simd reduction(+ : s0)
    for (int64_t k = 0; k < H; ++k) s0 += w0[k] * h[k];
    dst[i] = s0;
  }
}

template <typename Widen>
STEER_HD void gemv_rows_half(const uint16_t* __restrict w, int64_t ws, const float* __restrict h,
                             int64_t H, float* __restrict dst, int64_t n, Widen widen) {
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t* wi = w + i * ws;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < H; ++k) acc += widen(wi[k]) * h[k];
    dst[i] = acc;
  }
}

STEER_HOT void gemv_rows_f16(const uint16_t* w, int64_t ws, const float* h, int64_t H, float* dst, int64_t n) {
  gemv_rows_half(w, ws, h, H, dst, n, [](uint16_t v) { return half_bits_to_float(v); });
}

STEER_HOT void gemv_rows_bf16(const uint16_t* w, int64_t ws, const float* h, int64_t H, float* dst, int64_t n) {
  gemv_rows_half(w, ws, h, H, dst, n, [](uint16_t v) { return bf16_bits_to_float(v); });
}

static const float* projected_chunk(const Projection& p, int64_t r, int64_t off, int64_t n, float* dst) {
  const float* h = p.h + r * p.h_stride;
  const char* w = p.w.base + off * p.w.row_stride * p.w.esize;
  if (p.w.dtype == F32) gemv_rows_f32(reinterpret_cast<const float*>(w), p.w.row_stride, h, p.H, dst, n);
  else if (p.w.dtype == F16) gemv_rows_f16(reinterpret_cast<const uint16_t*>(w), p.w.row_stride, h, p.H, dst, n);
  else gemv_rows_bf16(reinterpret_cast<const uint16_t*>(w), p.w.row_stride, h, p.H, dst, n);
  return dst;
}

static int64_t first_index_of(const float* x, int64_t n, float v) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == v) return i;
  return -1;
}

Part closed_form_segment(const Args& a, int64_t r, int64_t start, int64_t end, float c, bool track_argmax,
                         Part* llm) {
  alignas(64) float buf[3][CHUNK];
  alignas(64) float xbuf[CHUNK];
  Part p;
  float* out = a.out != nullptr ? a.out + r * a.out_stride : nullptr;
  for (int64_t off = start; off < end; off += CHUNK) {
    const int64_t n = std::min(CHUNK, end - off);
    const float* l = load_f32(a.zl, r, off, n, buf[0]);
    const float* cc = a.proj != nullptr ? projected_chunk(*a.proj, r, off, n, buf[1])
                                        : load_f32(a.zc, r, off, n, buf[1]);
    const float* nn = a.has_noctx ? load_f32(a.zn, r, off, n, buf[2]) : nullptr;
    float* x = out != nullptr ? out + off : xbuf;
    const float offset = p.m;
    float sc;
#if STEER_HAVE_AVX512_PATH
    const float mc = use_avx512.load(std::memory_order_relaxed) && offset != -STEER_INF
                         ? steer_chunk_avx512(l, cc, nn, x, n, c, offset, &sc, &p.flags)
                         : steer_chunk(l, cc, nn, x, n, c, offset, &sc, &p.flags);
#else
    const float mc = steer_chunk(l, cc, nn, x, n, c, offset, &sc, &p.flags);
#endif
    // Chunks come in index order: only a strictly larger max moves the first argmax.
    if (track_argmax && mc > p.m) p.argmax = off + first_index_of(x, n, mc);
    if (llm != nullptr) {
      // z_L's own softmax statistics (confidence gating), from the chunk already in cache.
      const float ml = chunk_max(l, n);
      online_merge(llm->m, llm->s, ml, exp_sum(l, n, ml));
    }
    if (offset == -STEER_INF || !(mc <= offset + 64.0f)) {
      // First live chunk, or exp(x - offset) may have overflowed (or lost the chunk's largest
      // terms' precision): redo the chunk's sum around its own max, from L1.
      online_merge(p.m, p.s, mc, exp_sum(x, n, mc));
    } else {
      p.s += sc;
      online_merge(p.m, p.s, mc, 0.0f);
    }
  }
  return p;
}

int64_t auto_splits(int64_t B, int64_t V) {
  const int64_t nthreads = at::get_num_threads();
  int64_t splits = B >= nthreads ? 1 : (nthreads + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(splits, V / (8 * CHUNK)));
}

static void closed_form(const Args& a, int64_t splits) {
  const int64_t B = a.B, V = a.V;
  if (splits <= 0) splits = auto_splits(B, V);
  const int64_t nchunks = (V + CHUNK - 1) / CHUNK;
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, nchunks));
  if (splits == 1) {
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const RowParams hp = row_params(a.hp + r * a.hp_stride);
        const Part p = closed_form_segment(a, r, 0, V, hp.cf);
        float lse;
        a.status[r] = finish_row(p.m, p.s, p.flags, hp.ok, &lse);
        subtract(a.out + r * a.out_stride, V, lse);
      }
    });
    return;
  }
  // Segments are whole chunks, so chunk boundaries (and chunk maxima) do not depend on splits.
  const int64_t seg = (nchunks + splits - 1) / splits * CHUNK;
  std::vector<Part> parts(B * splits);
  at::parallel_for(0, B * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / splits, k = i % splits;
      const int64_t start = std::min(V, k * seg), end = std::min(V, start + seg);
      const RowParams hp = row_params(a.hp + r * a.hp_stride);
      parts[i] = start < end ? closed_form_segment(a, r, start, end, hp.cf) : Part{};
    }
  });
  at::parallel_for(0, B * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / splits, k = i % splits;
      const int64_t start = std::min(V, k * seg), end = std::min(V, start + seg);
      const RowParams hp = row_params(a.hp + r * a.hp_stride);
      Part p = parts[r * splits];
      for (int64_t j = 1; j < splits; ++j) merge_part(p, parts[r * splits + j]);
      float lse;
      const int st = finish_row(p.m, p.s, p.flags, hp.ok, &lse);
      if (k == 0) a.status[r] = st;
      if (start < end) subtract(a.out + r * a.out_stride + start, end - start, lse);
    }
  });
}

// The literal T-step loop for one row (T + 3 sweeps); u is scratch of V floats.
static void iterative_row(const Args& a, int64_t r, float* u) {
  alignas(64) float buf[3][CHUNK];
  alignas(64) float d[CHUNK];
  const int64_t V = a.V;
  const RowParams hp = row_params(a.hp + r * a.hp_stride);
  float* out = a.out + r * a.out_stride;
  // Sweep 0: the closed form's statistics (status bits identical to closed_form) and the
  // log-sum-exp of each input row.
  Part x;
  float mb = -STEER_INF, sb = 0.0f, mc_ = -STEER_INF, sc_ = 0.0f, mn_ = -STEER_INF, sn_ = 0.0f;
  for (int64_t off = 0; off < V; off += CHUNK) {
    const int64_t n = std::min(CHUNK, V - off);
    const float* l = load_f32(a.zl, r, off, n, buf[0]);
    const float* cc = load_f32(a.zc, r, off, n, buf[1]);
    const float* nn = a.has_noctx ? load_f32(a.zn, r, off, n, buf[2]) : nullptr;
    float unused;
    const float mc = steer_chunk(l, cc, nn, out + off, n, hp.cf, 0.0f, &unused, &x.flags);
    online_merge(x.m, x.s, mc, exp_sum(out + off, n, mc));
    const float ml = chunk_max(l, n);
    online_merge(mb, sb, ml, exp_sum(l, n, ml));
    if (a.has_noctx) {
      const float m1 = chunk_max(cc, n), m2 = chunk_max(nn, n);
      online_merge(mc_, sc_, m1, exp_sum(cc, n, m1));
      online_merge(mn_, sn_, m2, exp_sum(nn, n, m2));
    }
  }
  const float lse_b = mb + steer_log(sb);
  const float shift = delta_shift(mc_ + steer_log(sc_), mn_ + steer_log(sn_));
  // p_0 = b, stored with normalizer lse_p = 0; U_0 = 0.
  for (int64_t off = 0; off < V; off += CHUNK) {
    const int64_t n = std::min(CHUNK, V - off);
    store_shifted(load_f32(a.zl, r, off, n, buf[0]), out + off, n, lse_b);
  }
  std::fill(u, u + V, 0.0f);
  float lse_p = 0.0f;
  for (long long t = 1; t <= hp.T; ++t) {
    const float tf = (float)t;
    const float tlam = tf * hp.lam;
    const float denom = tlam + hp.inv_eta;
    float m = -STEER_INF, s = 0.0f;
    for (int64_t off = 0; off < V; off += CHUNK) {
      const int64_t n = std::min(CHUNK, V - off);
      const float* l = load_f32(a.zl, r, off, n, buf[0]);
      const float* cc = load_f32(a.zc, r, off, n, buf[1]);
      const float* dd = cc;
      if (a.has_noctx) {
        delta_chunk(cc, load_f32(a.zn, r, off, n, buf[2]), d, n, shift);
        dd = d;
      }
      const float mc = iterate_chunk(l, dd, out + off, u + off, n, lse_b, lse_p, hp.alpha, hp.beta,
                                     tlam, hp.inv_eta, denom);
      online_merge(m, s, mc, exp_sum(out + off, n, mc));
    }
    lse_p = m + steer_log(s);
  }
  float lse_x;
  const int st = finish_row(x.m, x.s, x.flags, hp.ok, &lse_x);
  a.status[r] = st;
  subtract(out, V, st != 0 ? __builtin_nanf("") : lse_p);
}

static void iterative(const Args& a) {
  at::parallel_for(0, a.B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> u(a.V);
    for (int64_t r = r0; r < r1; ++r) iterative_row(a, r, u.data());
  });
}

}  // namespace cpu

// Tests switch the AVX-512 path off to cover the portable one: enable < 0 queries, 0 disables,
// 1 enables (when the CPU has it). Returns whether the path was in use before the call.
int64_t cpu_avx512(int64_t enable) {
#if STEER_HAVE_AVX512_PATH
  const bool before = cpu::use_avx512.load();
  if (enable >= 0) cpu::use_avx512.store(enable > 0 && cpu::kAvx512);
  return before ? 1 : 0;
#else
  (void)enable;
  return 0;
#endif
}

// The per-row part of Args both entry points share: hparams, out and status, [B, V] rows.
static void set_rows(cpu::Args& a, const at::Tensor& hp, at::Tensor& out, at::Tensor& status) {
  a.B = out.size(0);
  a.V = out.size(1);
  a.hp = hp.data_ptr<double>();
  a.hp_stride = hp.size(0) == 1 ? 0 : 5;
  a.out = out.data_ptr<float>();
  a.out_stride = a.B > 1 ? out.stride(0) : 0;
  a.status = status.data_ptr<int32_t>();
}

at::Tensor steer_cpu(const at::Tensor& llm, const at::Tensor& ctx,
                     const c10::optional<at::Tensor>& noctx, const at::Tensor& hparams,
                     at::Tensor& out, c10::string_view mode, int64_t num_splits) {
  TORCH_CHECK(llm.dim() == 2 && ctx.sizes() == llm.sizes() && out.sizes() == llm.sizes(),
              "costeer_ext::steer: expected [B, V] inputs and out of one shape");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "costeer_ext::steer: out must be float32");
  const bool iter = mode == "iterative";
  TORCH_CHECK(iter || mode == "closed_form", "costeer_ext::steer: unknown mode ", mode);
  const int64_t B = llm.size(0), V = llm.size(1);
  auto hp = hparams.to(at::kDouble).contiguous();
  TORCH_CHECK(hp.dim() == 2 && hp.size(1) == 5 && (hp.size(0) == 1 || hp.size(0) == B),
              "costeer_ext::steer: hparams must be float64 [1 or B, 5]");
  auto status = at::empty({B}, llm.options().dtype(at::kInt));
  if (B == 0) return status;
  const bool has_noctx = noctx.has_value() && noctx->defined();
  for (const at::Tensor* t : {&llm, &ctx, has_noctx ? &*noctx : &llm, static_cast<const at::Tensor*>(&out)}) {
    TORCH_CHECK(V <= 1 || t->stride(1) == 1, "costeer_ext::steer: tensors need unit stride along V");
  }
  cpu::Args a;
  a.zl = cpu::operand(llm);
  a.zc = cpu::operand(ctx);
  a.has_noctx = has_noctx;
  a.zn = has_noctx ? cpu::operand(*noctx) : a.zc;
  set_rows(a, hp, out, status);
  if (iter) cpu::iterative(a);
  else cpu::closed_form(a, num_splits);
  return status;
}

// The projection fused into the closed form: z_c = W h per chunk (h = h_c - h_n, float32 [B, H]),
// no z_n. W is read once per call for all rows of a chunk task; the logits never exist.
at::Tensor steer_hidden_cpu(const at::Tensor& llm, const at::Tensor& hdiff, const at::Tensor& weight,
                            const at::Tensor& hparams, at::Tensor& out, int64_t num_splits) {
  TORCH_CHECK(llm.dim() == 2 && out.sizes() == llm.sizes(), "costeer_ext::steer_hidden: expected [B, V] llm and out");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "costeer_ext::steer_hidden: out must be float32");
  TORCH_CHECK(hdiff.dim() == 2 && hdiff.size(0) == llm.size(0) && hdiff.scalar_type() == at::kFloat,
              "costeer_ext::steer_hidden: hdiff must be float32 [B, H]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= llm.size(1) && weight.size(1) == hdiff.size(1),
              "costeer_ext::steer_hidden: weight must be [>= V, H]");
  const int64_t B = llm.size(0), V = llm.size(1), H = hdiff.size(1);
  auto hp = hparams.to(at::kDouble).contiguous();
  TORCH_CHECK(hp.dim() == 2 && hp.size(1) == 5 && (hp.size(0) == 1 || hp.size(0) == B),
              "costeer_ext::steer_hidden: hparams must be float64 [1 or B, 5]");
  auto status = at::empty({B}, llm.options().dtype(at::kInt));
  if (B == 0) return status;
  TORCH_CHECK((V <= 1 || (llm.stride(1) == 1 && out.stride(1) == 1)) && (H <= 1 || (weight.stride(1) == 1 && hdiff.stride(1) == 1)),
              "costeer_ext::steer_hidden: tensors need unit stride along their last dimension");
  cpu::Projection proj;
  proj.w = cpu::operand(weight, "costeer_ext::steer_hidden");
  proj.w.row_stride = weight.stride(0);
  proj.h = hdiff.data_ptr<float>();
  proj.h_stride = hdiff.stride(0);
  proj.H = H;
  cpu::Args a;
  a.zl = cpu::operand(llm, "costeer_ext::steer_hidden");
  a.proj = &proj;
  set_rows(a, hp, out, status);
  cpu::closed_form(a, num_splits);
  return status;
}

}  // namespace costeer
