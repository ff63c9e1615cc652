// torch.ops.costeer_ext.decode_attention: one query token per row against its KV cache, grouped
// query heads (GQA) read against their key/value head without repeating it.
//
// A decode step of a small model on a CPU calls attention once per layer with a handful of rows
// and a few hundred keys: torch's SDPA spends most of such a call on dispatch, on the mask of
// left-padded rows and on the repeated KV heads (measured on a 2-core Zen 4, 2 rows x 9 heads x
// 130 keys: 60 us a call; 16 rows: 313 us). Here each (row, KV head) is one task: the scores of
// its G query heads come from Kernels::project (each key row read once for all G, as a weight row
// is for the hidden rows), the exponentials from Kernels::tempered, the weighted values from
// Kernels::weighted_rows (each value row read once, masked keys skipped): the keys and values
// are streamed once per step, in float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "steer_cpu.h"
#include "steer_math.h"

namespace costeer {

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, double scale, at::Tensor& out) {
  constexpr const char* op = "costeer_ext::decode_attention";
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, op, ": q [B, Hq, D], k and v [B, Hkv, L, D] expected, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, op, ": k must be [", B, ", Hkv, L, ", D, "], got ", k.sizes());
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": the query heads (", Hq, ") must be a multiple of the KV heads (", Hkv, ")");
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && (t->stride(-1) == 1 || D <= 1), op,
                ": q, k and v must be float32 with unit stride in the last dimension");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.sizes() == q.sizes() && out.is_contiguous(), op,
              ": out must be a contiguous float32 tensor of q's shape");
  const bool has_mask = mask.has_value() && mask->defined();
  const bool bool_mask = has_mask && mask->scalar_type() == at::kBool;
  if (has_mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == L, op, ": mask must be [B, L] = [", B, ", ",
                L, "], got ", mask->sizes());
    TORCH_CHECK(bool_mask || mask->scalar_type() == at::kFloat, op,
                ": mask must be bool (True: attend) or float32 (added to the scores)");
  }
  if (B == 0 || Hq == 0) return out;
  if (L == 0 || D == 0) return out.zero_();
  const int64_t G = Hq / Hkv;
  const cpu::Kernels& kern = cpu::kernels();
  const float* qp = q.data_ptr<float>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const float* vp = v.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int64_t mb = has_mask ? mask->stride(0) : 0, ml = has_mask ? mask->stride(1) : 0;
  const bool* mbool = bool_mask ? mask->data_ptr<bool>() : nullptr;
  const float* mfloat = has_mask && !bool_mask ? mask->data_ptr<float>() : nullptr;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // Scores and weights of one task; per thread and kept between calls (30 calls a decode step).
    thread_local std::vector<float> buf;
    if (buf.size() < static_cast<size_t>(2 * G * L)) buf.resize(2 * G * L);
    float* s = buf.data();
    float* p = s + G * L;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      cpu::Operand keys;
      keys.base = kp + (b * k.stride(0) + h * k.stride(1)) * 4;
      keys.row_stride = k.stride(2);
      keys.dtype = cpu::F32;
      keys.esize = 4;
      // s[g * L + l] = q_g . k_l for the G query heads h * G + g of KV head h.
      kern.project(keys, 0, L, qp + b * q.stride(0) + h * G * q.stride(1), q.stride(1), G, D, s, L);
      float* o = op_ + (b * Hq + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s + g * L;
        bool nan = false;
        for (int64_t l = 0; l < L; ++l) {
          float x = sg[l] * sc;
          if (mbool != nullptr) x = mbool[b * mb + l * ml] ? x : -STEER_INF;
          else if (mfloat != nullptr) x += mfloat[b * mb + l * ml];
          nan |= x != x;
          sg[l] = x;
        }
        float* pg = p + g * L;
        if (nan) {  // a NaN score makes the softmax NaN (as SDPA's): the max and the clamped exp would hide it
          std::fill(pg, pg + L, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const float m = kern.chunk_max(sg, L);
        if (m == -STEER_INF) {  // every key masked: nothing to attend to (zeros, as a softmax over no keys sums none)
          std::fill(pg, pg + L, 0.0f);
          continue;
        }
        kern.tempered(sg, pg, L, m, 1.0f);
        float sum = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
          if (sg[l] == -STEER_INF) pg[l] = 0.0f;  // exactly out (the exponential clamps at exp(-87))
          sum += pg[l];
        }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; ++l) pg[l] *= inv;
      }
      kern.weighted_rows(p, G, L, vp + b * v.stride(0) + h * v.stride(1), v.stride(2), L, D, o, D);
    }
  });
  return out;
}

}  // namespace costeer
