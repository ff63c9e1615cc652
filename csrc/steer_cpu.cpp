// CPU kernel of costeer_ext::steer (closed form and iterative) and of steer_hidden.
//
// Rows are streamed in chunks of CHUNK elements that stay in L1: half/bfloat16 chunks are widened
// to float32 into stack buffers (fp32 inputs are used in place), so the math exists once per
// instruction-set path, as float-only loops (cpu_isa.cpp: the table `kernels()` picks).
// Closed form, per chunk: x = z_L + c_T (z_c - z_n) is written to `out` with the chunk max and the
// status bits, and sum exp(x - running max) is merged into the running (max, sum-exp). A second
// sweep subtracts the log-sum-exp in place: each input is read once.
// Small batches split each row into segments (one task each); the segments' partial statistics
// are merged by every segment task of the second sweep, in segment order.
// steer_hidden computes z_c = W (h_c - h_n) chunk by chunk: one task per vocabulary segment covers
// every row, so W is streamed from memory once per call whatever B is.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "steer_math.h"
#include "steer_cpu.h"

namespace costeer {
namespace cpu {

static int64_t first_index_of(const float* x, int64_t n, float v) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == v) return i;
  return -1;
}

// Merges a chunk's (max mc, sum sc of exp(x - offset)) into p; x is the chunk, still in L1.
static void chunk_merge(const Kernels& K, int64_t off, int64_t n, const float* x, float offset, float mc, float sc,
                        Part& p, bool track_argmax) {
  // Chunks come in index order: only a strictly larger max moves the first argmax.
  if (track_argmax && mc > p.m) p.argmax = off + first_index_of(x, n, mc);
  if (offset == -STEER_INF || !(mc <= offset + 64.0f)) {
    // First live chunk, or exp(x - offset) may have overflowed (or lost the chunk's largest
    // terms' precision): redo the chunk's sum around its own max, from L1.
    online_merge(p.m, p.s, mc, K.exp_sum(x, n, mc));
  } else {
    p.s += sc;
    online_merge(p.m, p.s, mc, 0.0f);
  }
}

// One chunk of the first sweep from float32 rows: x into `x`, its statistics merged into p (and
// z_L's into *llm).
static void chunk_step(const Kernels& K, int64_t off, int64_t n, const float* l, const float* cc, const float* nn,
                       float c, float* x, Part& p, bool track_argmax, Part* llm) {
  const float offset = p.m;
  float sc;
  const float mc = K.steer_chunk(l, cc, nn, x, n, c, offset, &sc, &p.flags);
  if (llm != nullptr) {
    // z_L's own softmax statistics (confidence gating), from the chunk already in cache.
    const float ml = K.chunk_max(l, n);
    online_merge(llm->m, llm->s, ml, K.exp_sum(l, n, ml));
  }
  chunk_merge(K, off, n, x, offset, mc, sc, p, track_argmax);
}

static const uint16_t* row16(const Operand& o, int64_t r, int64_t off) {
  return reinterpret_cast<const uint16_t*>(o.base) + r * o.row_stride + off;
}

// Asks for [off, off + n) of row r of o ahead of use. Half-precision rows widened into float32
// chunks are read one row (one page) at a time: the hardware prefetchers, which stop at page
// boundaries, would leave each new page to a demand miss with nothing else in flight. (Rows read
// in place stream together and need no help.)
static void prefetch_chunk(const Operand& o, int64_t r, int64_t off, int64_t n) {
  const char* p = o.base + (r * o.row_stride + off) * o.esize;
  for (int64_t b = 0; b < n * o.esize; b += 64) __builtin_prefetch(p + b, 0, 2);
}

// First sweep over [start, end) of row r from the steer inputs. Three fp16 or three bf16 rows are
// read as they are where the path can (steer_chunk16), unless z_L's own statistics are asked for.
// xrow: where x goes in place of row r of a.out (indexed like the row), if not nullptr.
static Part closed_form_segment(const Kernels& K, const Args& a, int64_t r, int64_t start, int64_t end,
                                float c, bool keep_x, bool track_argmax, Part* llm, float* xrow = nullptr) {
  alignas(64) float buf[3][CHUNK];
  alignas(64) float xbuf[CHUNK];
  Part p;
  float* out = xrow != nullptr ? xrow : a.out != nullptr && keep_x ? a.out + r * a.out_stride : nullptr;
  const bool raw16 = K.steer_chunk16 != nullptr && llm == nullptr && a.zl.dtype != F32 && a.zc.dtype == a.zl.dtype &&
                     (!a.has_noctx || a.zn.dtype == a.zl.dtype);
  for (int64_t off = start; off < end; off += CHUNK) {
    const int64_t n = std::min(CHUNK, end - off);
    if (!raw16 && a.zl.dtype != F32 && off + n < end) {
      const int64_t n2 = std::min(CHUNK, end - off - n);
      prefetch_chunk(a.zl, r, off + n, n2);
      prefetch_chunk(a.zc, r, off + n, n2);
      if (a.has_noctx) prefetch_chunk(a.zn, r, off + n, n2);
    }
    float* x = out != nullptr ? out + off : xbuf;
    if (raw16) {
      const float offset = p.m;
      float sc;
      const float mc = K.steer_chunk16(row16(a.zl, r, off), row16(a.zc, r, off),
                                       a.has_noctx ? row16(a.zn, r, off) : nullptr, a.zl.dtype, x, n, c, offset,
                                       &sc, &p.flags);
      chunk_merge(K, off, n, x, offset, mc, sc, p, track_argmax);
      continue;
    }
    const float* l = load_f32(K, a.zl, r, off, n, buf[0]);
    const float* cc = load_f32(K, a.zc, r, off, n, buf[1]);
    const float* nn = a.has_noctx ? load_f32(K, a.zn, r, off, n, buf[2]) : nullptr;
    chunk_step(K, off, n, l, cc, nn, c, x, p, track_argmax, llm);
  }
  return p;
}

// First sweep over [start, end) of every row with z_c = W h: each chunk of W rows is read once
// and projected onto all B hidden differences (d, B x chunk floats), then each row steps.
static void projection_segment(const Kernels& K, const Args& a, const RowParams* hp, int64_t chunk,
                               int64_t start, int64_t end, bool track_argmax, Part* parts, Part* llm,
                               int64_t stride, const bool* keep_x) {
  const Projection& pr = *a.proj;
  const int64_t B = a.B;
  std::vector<float> d(B * chunk);
  alignas(64) float lbuf[CHUNK];
  alignas(64) float xbuf[CHUNK];
  for (int64_t off = start; off < end; off += chunk) {
    const int64_t n = std::min(chunk, end - off);
    K.project(pr.w, off, n, pr.h, pr.h_stride, B, pr.H, d.data(), chunk);
    for (int64_t r = 0; r < B; ++r) {
      const float* l = load_f32(K, a.zl, r, off, n, lbuf);
      const bool keep = a.out != nullptr && (keep_x == nullptr || keep_x[r]);
      float* x = keep ? a.out + r * a.out_stride + off : xbuf;
      chunk_step(K, off, n, l, d.data() + r * chunk, nullptr, hp[r].cf, x, parts[r * stride], track_argmax,
                 llm != nullptr ? &llm[r * stride] : nullptr);
    }
  }
}

int64_t auto_splits(int64_t B, int64_t V) {
  const int64_t nthreads = at::get_num_threads();
  int64_t splits = B >= nthreads ? 1 : (nthreads + B - 1) / B;
  return std::max<int64_t>(1, std::min<int64_t>(splits, V / (8 * CHUNK)));
}

// Projection chunks shrink with B so that d (B x chunk floats) stays within 64 KiB (L2).
static int64_t projection_chunk(int64_t B) {
  const int64_t c = (16384 / std::max<int64_t>(B, 1)) / 64 * 64;
  return std::max<int64_t>(64, std::min<int64_t>(CHUNK, c));
}

Layout layout(const Args& a, int64_t num_splits) {
  Layout L;
  L.chunk = a.proj != nullptr ? projection_chunk(a.B) : CHUNK;
  const int64_t nchunks = std::max<int64_t>(1, (a.V + L.chunk - 1) / L.chunk);
  int64_t splits = num_splits;
  if (splits <= 0) splits = a.proj != nullptr ? at::get_num_threads() : auto_splits(a.B, a.V);
  L.splits = std::max<int64_t>(1, std::min<int64_t>(splits, nchunks));
  // Segments are whole chunks, so chunk boundaries (and chunk maxima) do not depend on splits.
  L.seg = (nchunks + L.splits - 1) / L.splits * L.chunk;
  return L;
}

std::vector<RowParams> all_row_params(const Args& a) {
  std::vector<RowParams> hp(a.B);
  if (a.hp_stride == 0) {
    std::fill(hp.begin(), hp.end(), row_params(a.hp));
  } else {
    at::parallel_for(0, a.B, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) hp[r] = row_params(a.hp + r * a.hp_stride);
    });
  }
  return hp;
}

void first_sweep(const Args& a, const RowParams* hp, const Layout& L, bool track_argmax, Part* parts, Part* llm,
                 const bool* keep_x) {
  const Kernels& K = kernels();
  const int64_t B = a.B, V = a.V, S = L.splits;
  if (a.proj != nullptr) {
    at::parallel_for(0, S, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t start = std::min(V, k * L.seg), end = std::min(V, start + L.seg);
        projection_segment(K, a, hp, L.chunk, start, end, track_argmax, parts + k, llm != nullptr ? llm + k : nullptr,
                           S, keep_x);
      }
    });
    return;
  }
  at::parallel_for(0, B * S, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / S, k = i % S;
      const int64_t start = std::min(V, k * L.seg), end = std::min(V, start + L.seg);
      const bool keep = keep_x == nullptr || keep_x[r];
      parts[i] = start < end ? closed_form_segment(K, a, r, start, end, hp[r].cf, keep, track_argmax,
                                                   llm != nullptr ? &llm[i] : nullptr)
                             : Part{};
    }
  });
}

// phase1(i) for every task i < n, then, once all of them are done, phase2(i): one parallel region
// with a barrier in place of two (at::parallel_for forks and joins once per call, which costs
// microseconds against a B=1 row's tens). Both phases give a thread the same tasks, as
// at::parallel_for's static split would, so phase 2 finds its segments in that core's cache.
// The closed form's second sweep over segment i (row i / S, segment i % S): the row's parts merged
// in segment order, then out minus the log-sum-exp in place.
static void finish_segment(const Kernels& K, const Args& a, const RowParams* hp, const Layout& L, const Part* parts,
                           int64_t i) {
  const int64_t S = L.splits, V = a.V;
  const int64_t r = i / S, k = i % S;
  const int64_t start = std::min(V, k * L.seg), end = std::min(V, start + L.seg);
  Part p = parts[r * S];
  for (int64_t j = 1; j < S; ++j) merge_part(p, parts[r * S + j]);
  float lse;
  const int st = finish_row(p.m, p.s, p.flags, hp[r].ok, &lse);
  if (k == 0) a.status[r] = st;
  if (start < end) K.subtract(a.out + r * a.out_stride + start, end - start, lse);
}

template <class F1, class F2>
static void two_phase_for(int64_t n, const F1& phase1, const F2& phase2) {
#ifdef _OPENMP
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt > 1 && !at::in_parallel_region()) {
#pragma omp parallel num_threads((int)nt)
    {
      const int64_t tid = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t per = (n + team - 1) / team;
      const int64_t b = std::min(n, tid * per), e = std::min(n, b + per);
      for (int64_t i = b; i < e; ++i) phase1(i);
#pragma omp barrier
      for (int64_t i = b; i < e; ++i) phase2(i);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) phase1(i);
  for (int64_t i = 0; i < n; ++i) phase2(i);
}

static void closed_form(const Args& a, int64_t num_splits) {
  const Kernels& K = kernels();
  const int64_t B = a.B, V = a.V;
  const Layout L = layout(a, num_splits);
  const std::vector<RowParams> hp = all_row_params(a);
  if (L.splits == 1 && a.proj == nullptr) {
    // One task per row: the second sweep follows while the row is still in cache. An output too
    // large to stay in cache (kStreamOut) is written once, by the second sweep, with streaming
    // stores, from x kept in a per-thread row of scratch (reused row after row, so it stays in
    // L2): writing x into out first would read each line of out for ownership and write it back
    // dirty, 8 bytes of memory traffic per element on top of the inputs' 6 (bfloat16) or 12 (fp32),
    // where the streaming stores move 4.
    constexpr int64_t kStreamOut = int64_t(16) << 20;
    const bool stream = B * V * int64_t(sizeof(float)) >= kStreamOut;
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      thread_local std::vector<float> scratch;
      if (stream && (int64_t)scratch.size() < V) scratch.resize(V);
      for (int64_t r = r0; r < r1; ++r) {
        float* xrow = stream ? scratch.data() : nullptr;
        const Part p = closed_form_segment(K, a, r, 0, V, hp[r].cf, true, false, nullptr, xrow);
        float lse;
        a.status[r] = finish_row(p.m, p.s, p.flags, hp[r].ok, &lse);
        if (stream) K.store_shifted_stream(xrow, a.out + r * a.out_stride, V, lse);
        else K.subtract(a.out + r * a.out_stride, V, lse);
      }
    });
    return;
  }
  const int64_t S = L.splits;
  std::vector<Part> parts(B * S);
  if (a.proj != nullptr) {
    first_sweep(a, hp.data(), L, false, parts.data(), nullptr, nullptr);
    at::parallel_for(0, B * S, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) finish_segment(K, a, hp.data(), L, parts.data(), i);
    });
    return;
  }
  // Row segments: sweep, barrier, then each task merges its row's parts and subtracts.
  two_phase_for(
      B * S,
      [&](int64_t i) {
        const int64_t r = i / S, k = i % S;
        const int64_t start = std::min(V, k * L.seg), end = std::min(V, start + L.seg);
        parts[i] = start < end ? closed_form_segment(K, a, r, start, end, hp[r].cf, true, false, nullptr) : Part{};
      },
      [&](int64_t i) { finish_segment(K, a, hp.data(), L, parts.data(), i); });
}

// The literal T-step loop for one row (T + 3 sweeps); u is scratch of V floats.
static void iterative_row(const Kernels& K, const Args& a, const RowParams& hp, int64_t r, float* u) {
  alignas(64) float buf[3][CHUNK];
  alignas(64) float d[CHUNK];
  const int64_t V = a.V;
  float* out = a.out + r * a.out_stride;
  // Sweep 0: the closed form's statistics (status bits identical to closed_form) and the
  // log-sum-exp of each input row.
  Part x;
  float mb = -STEER_INF, sb = 0.0f, mc_ = -STEER_INF, sc_ = 0.0f, mn_ = -STEER_INF, sn_ = 0.0f;
  for (int64_t off = 0; off < V; off += CHUNK) {
    const int64_t n = std::min(CHUNK, V - off);
    const float* l = load_f32(K, a.zl, r, off, n, buf[0]);
    const float* cc = load_f32(K, a.zc, r, off, n, buf[1]);
    const float* nn = a.has_noctx ? load_f32(K, a.zn, r, off, n, buf[2]) : nullptr;
    float unused;  // offset -inf: no running sum wanted, it is taken around the chunk max below
    const float mc = K.steer_chunk(l, cc, nn, out + off, n, hp.cf, -STEER_INF, &unused, &x.flags);
    online_merge(x.m, x.s, mc, K.exp_sum(out + off, n, mc));
    const float ml = K.chunk_max(l, n);
    online_merge(mb, sb, ml, K.exp_sum(l, n, ml));
    if (a.has_noctx) {
      const float m1 = K.chunk_max(cc, n), m2 = K.chunk_max(nn, n);
      online_merge(mc_, sc_, m1, K.exp_sum(cc, n, m1));
      online_merge(mn_, sn_, m2, K.exp_sum(nn, n, m2));
    }
  }
  const float lse_b = mb + steer_log(sb);
  const float shift = delta_shift(mc_ + steer_log(sc_), mn_ + steer_log(sn_));
  // p_0 = b, stored with normalizer lse_p = 0; U_0 = 0.
  for (int64_t off = 0; off < V; off += CHUNK) {
    const int64_t n = std::min(CHUNK, V - off);
    K.store_shifted(load_f32(K, a.zl, r, off, n, buf[0]), out + off, n, lse_b);
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
      const float* l = load_f32(K, a.zl, r, off, n, buf[0]);
      const float* cc = load_f32(K, a.zc, r, off, n, buf[1]);
      const float* dd = cc;
      if (a.has_noctx) {
        K.delta_chunk(cc, load_f32(K, a.zn, r, off, n, buf[2]), d, n, shift);
        dd = d;
      }
      const float mc = K.iterate_chunk(l, dd, out + off, u + off, n, lse_b, lse_p, hp.alpha, hp.beta,
                                       tlam, hp.inv_eta, denom);
      online_merge(m, s, mc, K.exp_sum(out + off, n, mc));
    }
    lse_p = m + steer_log(s);
  }
  float lse_x;
  const int st = finish_row(x.m, x.s, x.flags, hp.ok, &lse_x);
  a.status[r] = st;
  K.subtract(out, V, st != 0 ? __builtin_nanf("") : lse_p);
}

static void iterative(const Args& a) {
  const Kernels& K = kernels();
  const std::vector<RowParams> hp = all_row_params(a);
  at::parallel_for(0, a.B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> u(a.V);
    for (int64_t r = r0; r < r1; ++r) iterative_row(K, a, hp[r], r, u.data());
  });
}

}  // namespace cpu

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
