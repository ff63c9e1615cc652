// CPU kernel of costeer_ext::sample: steer and pick the next token without writing [B, V].
//
// Sweep 1 is the steer kernel's closed-form sweep (steer_cpu.cpp) with the first argmax tracked;
// x stays in an L1 chunk. Greedy rows end there: the token is the argmax and its log-prob is
// max - lse = -log(sum exp(x - max)). Sampling rows keep x in a row buffer, find the top-k / top-p
// thresholds by bisection over order-preserving int keys (counting passes over x, no sort), and
// draw by Gumbel-max with the Philox stream of costeer_kernels/sampling.py, computing noise only
// for tokens that could still win: G < 17, so x_v + tau * 17 below the best key so far rules v out.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "steer_cpu.h"
#include "steer_math.h"

namespace costeer {
namespace cpu {

// The largest Gumbel value the noise can take: u <= 1 - 2^-24 gives G = 16.6355...
constexpr float GUMBEL_MAX = 17.0f;

struct Philox {
  uint32_t c[4];
};

// Philox4x32-10 with Triton's constants (tl.philox), bit-identical to sampling.philox4x32.
static inline Philox philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    const uint64_t pb = (uint64_t)c2 * 0xCD9E8D57u;
    const uint64_t pa = (uint64_t)c0 * 0xD2511F53u;
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    const uint32_t n1 = (uint32_t)pb;
    const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    const uint32_t n3 = (uint32_t)pa;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox{{c0, c1, c2, c3}};
}

static inline float gumbel_of_bits(uint32_t bits) {
  const float u = (float)(2 * (int32_t)(bits >> 9) + 1) * 5.9604644775390625e-08f;
  return -::logf(-::logf(u));
}

// int keys with the float order of x (-0.0 == +0.0); as sampling.ordered_key.
static inline int32_t ordered_key(float x) {
  const int32_t b = (int32_t)f2u(x + 0.0f);
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}

static inline float key_to_float(int32_t k) {
  const int32_t b = k ^ ((k >> 31) & 0x7FFFFFFF);
  return u2f((uint32_t)b);
}

struct SampleArgs {
  Args steer;
  const float* temperature; int64_t temperature_stride;
  const int32_t* top_k; int64_t top_k_stride;
  const float* top_p; int64_t top_p_stride;
  const float* min_p; int64_t min_p_stride;
  const int64_t* seed; int64_t seed_stride;
  const int64_t* offset; int64_t offset_stride;
  bool row_keyed;
  int64_t n;  // draws per row
  int64_t* token;
  float* logprob;
  float* maxp;  // nullptr: not asked
};

// The threshold key of one sampling row (exact, as sampling.sample_torch's bisection): tokens
// with key >= the result are allowed.
static int32_t allowed_threshold(const Kernels& K, const float* x, int64_t V, float m, float tau, int64_t k,
                                 float top_p, float min_p) {
  const int32_t neg = ordered_key(-STEER_INF);
  const int32_t top = ordered_key(m) + 1;
  const float inv_tau = 1.0f / tau;
  // The tempered weights once, so each top-p bisection pass is a masked sum.
  std::vector<float> w((top_p > 0.0f && top_p < 1.0f) ? V : 0);
  if (!w.empty()) K.tempered(x, w.data(), V, m, inv_tau);
  int32_t lo = neg;
  if (k > 0 && k < V) {
    // Largest t in [lo, top) with count(key >= t) >= k.
    int64_t l = lo, h = top;
    while (h - l > 1) {
      const int64_t mid = l + (h - l) / 2;
      if (K.count_ge(x, V, key_to_float((int32_t)mid)) >= k) l = mid;
      else h = mid;
    }
    lo = (int32_t)l;
  }
  if (top_p > 0.0f && top_p < 1.0f) {
    const float target = top_p * K.mass_ge(x, w.data(), V, key_to_float(lo));
    int64_t l = lo, h = top;
    while (h - l > 1) {
      const int64_t mid = l + (h - l) / 2;
      if (K.mass_ge(x, w.data(), V, key_to_float((int32_t)mid)) >= target) l = mid;
      else h = mid;
    }
    lo = (int32_t)l;
  }
  if (min_p > 0.0f) lo = std::max(lo, ordered_key(m + tau * ::logf(min_p)));
  return lo;
}

// Gumbel-max over [start, end) of one row's x among keys >= thr; returns (best key, token).
struct Best {
  float key = -STEER_INF;
  int64_t tok = -1;
};

static Best gumbel_max(const float* x, int64_t start, int64_t end, float tau, int32_t thr, uint32_t rk,
                       uint64_t off, uint64_t seed, float bound) {
  Best b;
  b.key = bound;  // a key some token is known to reach (the argmax's), so most need no noise
  const uint32_t c2 = (uint32_t)off, c3 = (uint32_t)(off >> 32);
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  const float reach = tau * GUMBEL_MAX;
  int64_t cached = -1;
  Philox r{};
  for (int64_t v = start; v < end; ++v) {
    const float xv = x[v];
    if (!(xv + reach >= b.key) || ordered_key(xv) < thr) continue;
    if ((v >> 2) != cached) {
      cached = v >> 2;
      r = philox((uint32_t)cached, rk, c2, c3, k0, k1);
    }
    const float kv = xv + tau * gumbel_of_bits(r.c[v & 3]);
    if (kv > b.key || (kv == b.key && b.tok < 0)) {
      b.key = kv;
      b.tok = v;
    }
  }
  return b;
}

static void sample_rows(const SampleArgs& a) {
  const Kernels& K = kernels();
  const Args& st = a.steer;
  const int64_t B = st.B, V = st.V, n = a.n;
  std::vector<float> tau(B);
  // Sampling rows keep x (one row buffer each); greedy rows never write it.
  std::unique_ptr<bool[]> keep_x(new bool[B]);
  bool any_sampling = false;
  for (int64_t r = 0; r < B; ++r) {
    const float t = a.temperature[r * a.temperature_stride];
    tau[r] = t > 0.0f ? t : 0.0f;  // NaN / <= 0: greedy
    keep_x[r] = tau[r] > 0.0f;
    any_sampling = any_sampling || keep_x[r];
  }
  std::vector<float> xs(any_sampling ? B * V : 0);
  Args sw = st;
  sw.out = any_sampling ? xs.data() : nullptr;
  sw.out_stride = V;
  const Layout L = layout(sw, 0);
  const int64_t splits = L.splits;
  const std::vector<RowParams> hps = all_row_params(sw);
  std::vector<Part> parts(B * splits), llm(a.maxp != nullptr ? B * splits : 0);
  first_sweep(sw, hps.data(), L, true, parts.data(), llm.empty() ? nullptr : llm.data(), keep_x.get());
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const RowParams& hp = hps[r];
      Part p = parts[r * splits];
      for (int64_t j = 1; j < splits; ++j) merge_part(p, parts[r * splits + j]);
      float lse;
      const int status = finish_row(p.m, p.s, p.flags, hp.ok, &lse);
      st.status[r] = status;
      if (a.maxp != nullptr) {
        Part q = llm[r * splits];
        for (int64_t j = 1; j < splits; ++j) merge_part(q, llm[r * splits + j]);
        // max softmax(z_L) = 1 / sum exp(z_L - max z_L)
        a.maxp[r] = status != 0 || !(q.m > -STEER_INF && q.m < STEER_INF) ? __builtin_nanf("") : 1.0f / q.s;
      }
      int64_t* tok = a.token + r * n;
      float* lp = a.logprob + r * n;
      if (status != 0) {
        for (int64_t d = 0; d < n; ++d) { tok[d] = -1; lp[d] = __builtin_nanf(""); }
        continue;
      }
      if (tau[r] == 0.0f) {
        for (int64_t d = 0; d < n; ++d) { tok[d] = p.argmax; lp[d] = p.m - lse; }
        continue;
      }
      const float* x = xs.data() + r * V;
      const int64_t k = a.top_k[r * a.top_k_stride];
      const float tp = a.top_p[r * a.top_p_stride], mp = a.min_p[r * a.min_p_stride];
      const bool filtered = (k > 0 && k < V) || (tp > 0.0f && tp < 1.0f) || mp > 0.0f;
      const int32_t thr = filtered ? allowed_threshold(K, x, V, p.m, tau[r], k, tp, mp) : ordered_key(-STEER_INF);
      const uint64_t seed = (uint64_t)a.seed[r * a.seed_stride];
      const uint64_t off = (uint64_t)a.offset[r * a.offset_stride];
      for (int64_t d = 0; d < n; ++d) {
        const uint32_t rk = (uint32_t)(a.row_keyed ? r * n + d : d);
        // The argmax is always allowed: its key bounds the winner's from below.
        const int64_t am = p.argmax;
        const Philox ph = philox((uint32_t)(am >> 2), rk, (uint32_t)off, (uint32_t)(off >> 32),
                                 (uint32_t)seed, (uint32_t)(seed >> 32));
        const float bound = x[am] + tau[r] * gumbel_of_bits(ph.c[am & 3]);
        Best b = gumbel_max(x, 0, V, tau[r], thr, rk, off, seed, bound);
        if (b.tok < 0 || (b.key == bound && b.tok > am)) b.tok = am;
        tok[d] = b.tok;
        lp[d] = x[b.tok] - lse;
      }
    }
  });
}

}  // namespace cpu

namespace {

struct SampleInputs {
  const at::Tensor* llm;
  const at::Tensor* ctx;    // small-model logits, or nullptr with a projection
  const at::Tensor* noctx;  // nullptr: none
  const at::Tensor* hdiff;  // projection: h_c - h_n, float32 [B, H]
  const at::Tensor* weight; // projection: W [>= V, H]
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_impl(
    const SampleInputs& in, const at::Tensor& hparams, const at::Tensor& temperature,
    const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed,
    const at::Tensor& offset, bool row_keyed, bool want_maxp, int64_t num_samples, const char* op) {
  const at::Tensor& llm = *in.llm;
  TORCH_CHECK(llm.dim() == 2, op, ": expected [B, V] llm logits");
  TORCH_CHECK(in.ctx == nullptr || in.ctx->sizes() == llm.sizes(), op, ": ctx must match llm's shape");
  TORCH_CHECK(in.noctx == nullptr || in.noctx->sizes() == llm.sizes(), op, ": noctx must match llm's shape");
  TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1");
  const int64_t B = llm.size(0), V = llm.size(1);
  auto hp = hparams.to(at::kDouble).contiguous();
  TORCH_CHECK(hp.dim() == 2 && hp.size(1) == 5 && (hp.size(0) == 1 || hp.size(0) == B), op,
              ": hparams must be float64 [1 or B, 5]");
  auto param = [&](const at::Tensor& t, at::ScalarType dt, const char* name) {
    TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == B), op, ": ", name, " must be [1] or [B]");
    return t.to(dt).contiguous();
  };
  auto tau = param(temperature, at::kFloat, "temperature");
  auto tk = param(top_k, at::kInt, "top_k");
  auto tp = param(top_p, at::kFloat, "top_p");
  auto mp = param(min_p, at::kFloat, "min_p");
  auto sd = param(seed, at::kLong, "seed");
  auto of = param(offset, at::kLong, "offset");
  auto token = at::empty({B, num_samples}, llm.options().dtype(at::kLong));
  auto logprob = at::empty({B, num_samples}, llm.options().dtype(at::kFloat));
  auto maxp = at::empty({want_maxp ? B : 0}, llm.options().dtype(at::kFloat));
  auto status = at::empty({B}, llm.options().dtype(at::kInt));
  if (B == 0) return {token, logprob, maxp, status};
  for (const at::Tensor* t : {in.llm, in.ctx, in.noctx}) {
    TORCH_CHECK(t == nullptr || V <= 1 || t->stride(1) == 1, op, ": tensors need unit stride along V");
  }
  cpu::Projection proj;
  cpu::SampleArgs a;
  a.steer.zl = cpu::operand(llm, op);
  if (in.weight != nullptr) {
    const at::Tensor& w = *in.weight;
    const at::Tensor& h = *in.hdiff;
    TORCH_CHECK(h.dim() == 2 && h.size(0) == B && h.scalar_type() == at::kFloat, op, ": hdiff must be float32 [B, H]");
    TORCH_CHECK(w.dim() == 2 && w.size(0) >= V && w.size(1) == h.size(1), op, ": weight must be [>= V, H]");
    TORCH_CHECK(h.size(1) <= 1 || (w.stride(1) == 1 && h.stride(1) == 1), op, ": weight and hdiff need unit stride along H");
    proj.w = cpu::operand(w, op);
    proj.w.row_stride = w.stride(0);
    proj.h = h.data_ptr<float>();
    proj.h_stride = h.stride(0);
    proj.H = h.size(1);
    a.steer.proj = &proj;
  } else {
    a.steer.zc = cpu::operand(*in.ctx, op);
    a.steer.has_noctx = in.noctx != nullptr;
    a.steer.zn = in.noctx != nullptr ? cpu::operand(*in.noctx, op) : a.steer.zc;
  }
  a.steer.hp = hp.data_ptr<double>();
  a.steer.hp_stride = hp.size(0) == 1 ? 0 : 5;
  a.steer.status = status.data_ptr<int32_t>();
  a.steer.B = B;
  a.steer.V = V;
  auto stride = [](const at::Tensor& t) { return t.size(0) == 1 ? (int64_t)0 : (int64_t)1; };
  a.temperature = tau.data_ptr<float>(); a.temperature_stride = stride(tau);
  a.top_k = tk.data_ptr<int32_t>(); a.top_k_stride = stride(tk);
  a.top_p = tp.data_ptr<float>(); a.top_p_stride = stride(tp);
  a.min_p = mp.data_ptr<float>(); a.min_p_stride = stride(mp);
  a.seed = sd.data_ptr<int64_t>(); a.seed_stride = stride(sd);
  a.offset = of.data_ptr<int64_t>(); a.offset_stride = stride(of);
  a.row_keyed = row_keyed;
  a.n = num_samples;
  a.token = token.data_ptr<int64_t>();
  a.logprob = logprob.data_ptr<float>();
  a.maxp = want_maxp ? maxp.data_ptr<float>() : nullptr;
  cpu::sample_rows(a);
  return {token, logprob, maxp, status};
}

}  // namespace

// token int64 [B, n], logprob float32 [B, n], llm max prob float32 [B] (empty when not asked),
// status int32 [B]. Parameters are [1] or [B] tensors (sampling.SampleParams).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& llm, const at::Tensor& ctx, const c10::optional<at::Tensor>& noctx,
    const at::Tensor& hparams, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
    bool row_keyed, bool want_maxp, int64_t num_samples) {
  const bool has_noctx = noctx.has_value() && noctx->defined();
  const SampleInputs in{&llm, &ctx, has_noctx ? &*noctx : nullptr, nullptr, nullptr};
  return sample_impl(in, hparams, temperature, top_k, top_p, min_p, seed, offset, row_keyed, want_maxp,
                     num_samples, "costeer_ext::sample");
}

// The same from the small model's hidden states: z_c = W hdiff per chunk, no z_n.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_hidden_cpu(
    const at::Tensor& llm, const at::Tensor& hdiff, const at::Tensor& weight, const at::Tensor& hparams,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset, bool row_keyed,
    bool want_maxp, int64_t num_samples) {
  const SampleInputs in{&llm, nullptr, nullptr, &hdiff, &weight};
  return sample_impl(in, hparams, temperature, top_k, top_p, min_p, seed, offset, row_keyed, want_maxp,
                     num_samples, "costeer_ext::sample_hidden");
}

}  // namespace costeer
