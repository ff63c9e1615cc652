// Per-element math of the CoSteer steering op, shared by the CPU and CUDA kernels so the CPU tests
// exercise the arithmetic the GPU runs. No torch headers: steer_cuda.cu compiles without them.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define STEER_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define STEER_HD inline __attribute__((always_inline))
#else
#define STEER_HD inline
#endif

namespace costeer {

// Status bits: must equal costeer_kernels/status.py.
enum : int {
  NAN_LLM = 1,
  NAN_CTX = 2,
  NAN_NOCTX = 4,
  POSINF_LLM = 8,
  POSINF_CTX = 16,
  POSINF_NOCTX = 32,
  EMPTY_ROW = 64,
  NOCTX_MASK = 128,
  BAD_HPARAMS = 256,
  // Internal: some steered logit is +inf/NaN. Becomes NOCTX_MASK only when no input bit is set.
  X_BAD = 512,
};

#define STEER_INF (__builtin_huge_valf())

STEER_HD uint32_t f2u(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, 4);
  return u;
#endif
}

STEER_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, 4);
  return x;
#endif
}

STEER_HD float bf16_bits_to_float(uint16_t h) { return u2f((uint32_t)h << 16); }

STEER_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  // Branch-free (so conversion loops vectorize without F16C); exact, incl. subnormals, inf, NaN.
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized);
  return u2f(sign | bits);
#endif
}

// exp(x) for x <= 88, ~1 ulp. Below -87.34 (and for -inf) it returns ~1.2e-38 instead of 0: a
// clamp is one instruction, a select two more, and such a term is negligible in every sum it
// enters. Branch-free so loops calling it vectorize at -O3 without -ffast-math; used on the device
// too so both kernels round alike. NaN comes out finite: NaN inputs are caught by the status bits.
STEER_HD float steer_exp(float x) {
  const float xc = x > -87.3365478515625f ? x : -87.3365478515625f;
  // Round x*log2(e) to an integer with the 1.5*2^23 trick: n ends up in the low mantissa bits of t.
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  // Cody-Waite reduction: n * 0.693359375 is exact (9 + 8 significant bits).
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  // Unsigned arithmetic: no UB whatever t holds.
  return y * u2f((f2u(t) - 0x4B400000u + 127u) << 23);
}

STEER_HD float steer_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return ::logf(x);
#endif
}

// A mask shared by both small-model rows (both -inf) carries no delta (avoids -inf - -inf = NaN).
STEER_HD float masked_delta(float zc, float zn) { return zc == zn ? 0.0f : zc - zn; }

// c == 0 switches steering off entirely (0 * +-inf must not become NaN).
STEER_HD float steered(float zl, float delta, float c) { return c == 0.0f ? zl : zl + c * delta; }

STEER_HD int value_flags(float v, int nan_bit, int inf_bit) {
  return (v != v ? nan_bit : 0) | (v == STEER_INF ? inf_bit : 0);
}

STEER_HD int x_flags(float x) { return (x != x || x == STEER_INF) ? X_BAD : 0; }

// 1 when some of the summed values is NaN or +inf, else 0: -inf (a mask) plus anything but +inf
// stays -inf, so one test on the sum of an element's inputs and x replaces the eight exact tests
// of value_flags/x_flags, which only run on the rare chunks where this fires.
STEER_HD int suspicious(float sum) { return sum < STEER_INF ? 0 : 1; }

STEER_HD int element_flags(float l, float a, float b, bool has_noctx, float x) {
  return value_flags(l, NAN_LLM, POSINF_LLM) | value_flags(a, NAN_CTX, POSINF_CTX) |
         (has_noctx ? value_flags(b, NAN_NOCTX, POSINF_NOCTX) : 0) | x_flags(x);
}

// NaN-dropping max: a NaN logit is reported through the flags, and must not hide EMPTY_ROW.
STEER_HD float max_keep(float m, float x) { return x > m ? x : m; }

// Merge (m2, s2) into the running (max, sum exp(x - max)); an all -inf part has s ~ 0.
STEER_HD void online_merge(float& m, float& s, float m2, float s2) {
  const float mn = max_keep(m, m2);
  const float ms = mn == -STEER_INF ? 0.0f : mn;
  s = s * steer_exp(m - ms) + s2 * steer_exp(m2 - ms);
  m = mn;
}

// The offset sum-exp terms are taken from: 0 when the max is -inf (every term is then exp(-inf) = 0).
STEER_HD float safe_max(float m) { return m == -STEER_INF ? 0.0f : m; }

// The row's status from its merged statistics, and its log-sum-exp (NaN for an invalid row, so the
// final subtraction writes the row all-NaN). Same order as torch_backend.row_status / _finish_row.
STEER_HD int finish_row(float m, float s, int flags, bool hp_ok, float* lse) {
  const bool xbad = (flags & X_BAD) != 0;
  int st = (flags & ~X_BAD) | (hp_ok ? 0 : BAD_HPARAMS);
  if (st == 0 && m == -STEER_INF) st |= EMPTY_ROW;
  if (st == 0 && (xbad || m == STEER_INF || s != s || s == STEER_INF)) st |= NOCTX_MASK;
  *lse = st != 0 ? __builtin_nanf("") : m + steer_log(s);
  return st;
}

STEER_HD bool finite64(double x) { return (x - x) == 0.0; }

// The largest step count a row may ask for (SteerConfig checks the same bound in
// costeer_kernels/config.py): the c_T recurrence costs O(T) per row and call (and the iterative
// form O(T) sweeps), so an unbounded T could stall a kernel for hours. Rows with a larger T are
// invalid (BAD_HPARAMS).
#define STEER_MAX_T 100000

struct RowParams {
  double c;      // c_T of the closed form (0 for an invalid row)
  float cf;      // c_T in float32 for the kernels' x = z_L + c_T d
  long long T;   // steps of the iterative form (0 for an invalid row)
  float alpha, beta, lam, inv_eta;  // float32 copies for the iterative update
  bool ok;
};

// Validates one packed (T, alpha, beta, lam, eta) row and runs the c_T recurrence in float64:
// c_0 = 0, c_t = (alpha * sum_{s<t} c_s + t*beta + c_{t-1}/eta) / (t*lam + 1/eta).
STEER_HD RowParams row_params(const double* hp) {
  const double T = hp[0], alpha = hp[1], beta = hp[2], lam = hp[3], eta = hp[4];
  RowParams r;
  r.ok = finite64(T) && finite64(alpha) && finite64(beta) && finite64(lam) && finite64(eta) &&
         T >= 0.0 && T <= (double)STEER_MAX_T && T == floor(T) && lam > 0.0 && eta > 0.0;
  r.T = r.ok ? (long long)T : 0;
  const double inv_eta = 1.0 / (r.ok ? eta : 1.0);
  const double lam_ok = r.ok ? lam : 1.0;
  double c_prev = 0.0, c_sum = 0.0;
  for (long long t = 1; t <= r.T; ++t) {
    const double tf = (double)t;
    const double c = (alpha * c_sum + tf * beta + c_prev * inv_eta) / (tf * lam_ok + inv_eta);
    c_sum += c;
    c_prev = c;
  }
  r.c = c_prev;
  // A nonzero c_T that rounds to 0 in float32 still steers +-inf deltas (bans, lone noctx -inf):
  // keep it nonzero. Any finite delta then adds ~1e-38 * delta, i.e. nothing.
  r.cf = (float)c_prev;
  if (r.cf == 0.0f && c_prev != 0.0) r.cf = c_prev > 0.0 ? 1.17549435e-38f : -1.17549435e-38f;
  r.alpha = (float)alpha;
  r.beta = (float)beta;
  r.lam = (float)lam_ok;
  r.inv_eta = (float)inv_eta;
  return r;
}

// The iterative form's delta in log-prob terms, as the reference loop has it: the logit delta
// minus the row constant shift = lse(z_c) - lse(z_n) (also on shared masks, where the logit delta
// is 0). Exact arithmetic would not care (each step's log_softmax removes a row constant), but in
// float32 the unshifted delta makes the stored values larger and roughly doubles the error against
// the float64 loop. The shift is 0 when it is not finite (an all -inf row).
STEER_HD float delta_shift(float lse_c, float lse_n) {
  const float k = lse_c - lse_n;
  return k - k == 0.0f ? k : 0.0f;
}

STEER_HD float shifted_delta(float zc, float zn, float shift) { return masked_delta(zc, zn) - shift; }

// One step of the literal update on one element: p = p_{t-1} (normalized), b = log_softmax(z_L),
// d = shifted_delta(...) (or the given delta). Updates u, returns the pre-softmax p_t.
STEER_HD float iterate_element(float b, float d, float p, float& u, float alpha, float beta,
                               float tlam, float inv_eta, float denom) {
  const float pb = p == b ? 0.0f : p - b;
  u = u + (alpha == 0.0f ? 0.0f : alpha * pb) + (beta == 0.0f ? 0.0f : beta * d);
  return (tlam * b + u + p * inv_eta) / denom;
}

}  // namespace costeer
