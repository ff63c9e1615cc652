// torch.ops.costeer_ext.linear_rows: out[M, N] = x[M, K] W[N, K]^T (+ bias) for a few rows M.
//
// A decode step multiplies 1-8 rows by every weight matrix of the model (the LLM row and the
// small model's two passes, co-batched), so the step is bound by streaming the weights from
// memory. MKL's sgemm for 2-3 rows on this kind of CPU runs 2-3x slower than its 1-row gemv, and
// its gemv reads the big vocabulary head at a third of the memory bandwidth; the projection loop
// of the steering kernels (Kernels::project: each block of four weight rows loaded once, in
// registers, for all M rows) reads W once at any M. Weight rows are split across threads in
// blocks, so each thread streams its own contiguous part of W. A uint8 weight is GGML's Q8_0 (a
// GGUF model's vocabulary head as stored: a quarter of the float32 bytes), Q5_0, Q4_1, Q4_K or Q6_K
// (its layers: 22, 20, 18 or 26.25 bytes per 32 weights), with the float32 weight's result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "steer_cpu.h"

namespace costeer {

at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::Tensor& out) {
  constexpr const char* op = "costeer_ext::linear_rows";
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x [M, K] and weight [N, K] expected, got x ",
              x.sizes(), " and weight ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  // uint8 weight: GGML Q8_0, Q5_0 or Q4_1 rows of K / 32 blocks, or Q4_K or Q6_K rows of K / 256
  // super-blocks (steer_cpu.h), told apart by their bytes per row (34, 22, 20 per 32; 144, 210 per
  // 256); the float32 path's result exactly.
  const bool blocks = weight.scalar_type() == at::kByte;
  int block_dtype = cpu::F32;
  if (blocks && K > 0 && K % 32 == 0) {  // every format: blocks of 32 weights
    const std::pair<int, int64_t> formats[] = {{cpu::Q8_0, cpu::Q8_0_BYTES}, {cpu::Q4_1, cpu::Q4_1_BYTES},
                                               {cpu::Q5_0, cpu::Q5_0_BYTES}};
    for (const auto& [dtype, bytes] : formats)
      if (weight.size(1) == K / 32 * bytes) block_dtype = dtype;
  }
  if (blocks && K > 0 && K % 256 == 0) {  // the K-quants: super-blocks of 256 (no row size shared with the above)
    const std::pair<int, int64_t> formats[] = {{cpu::Q4_K, cpu::Q4_K_BYTES}, {cpu::Q6_K, cpu::Q6_K_BYTES}};
    for (const auto& [dtype, bytes] : formats)
      if (weight.size(1) == K / 256 * bytes) block_dtype = dtype;
  }
  if (blocks) {
    TORCH_CHECK(block_dtype != cpu::F32, op,
                ": a uint8 weight holds Q8_0, Q5_0 or Q4_1 rows (K / 32 blocks of 34, 22 or 20 bytes) or Q4_K or Q6_K "
                "rows (K / 256 super-blocks of 144 or 210 bytes); x has K = ",
                K, " but weight has ", weight.size(1), " bytes per row");
  } else {
    TORCH_CHECK(weight.size(1) == K, op, ": x has K = ", K, " columns but weight has ", weight.size(1));
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1, op, ": x must be float32 with unit column stride");
  TORCH_CHECK(weight.stride(1) == 1 || K <= 1, op, ": weight must have unit column stride");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == M && out.size(1) == N &&
                  out.is_contiguous(),
              op, ": out must be a contiguous float32 [", M, ", ", N, "] tensor");
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    out.zero_();
  } else {
    const cpu::Kernels& kern = cpu::kernels();
    cpu::Operand w;
    if (blocks) {
      w.base = static_cast<const char*>(weight.data_ptr());
      w.dtype = block_dtype;
      w.esize = 1;
    } else {
      w = cpu::operand(weight, op);
    }
    w.row_stride = weight.stride(0);
    const float* h = x.data_ptr<float>();
    const int64_t hs = x.stride(0);
    float* d = out.data_ptr<float>();
    // ~64 KB of weights per task: big enough to amortize the fork, small enough to balance
    // two to sixteen threads over the model's smallest matrices (N = 192 here).
    const int64_t grain = std::max<int64_t>(4, ((16384 + K - 1) / K + 3) / 4 * 4);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      kern.project(w, begin, end - begin, h, hs, M, K, d + begin, N);
    });
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [", N, "], got ", bias->sizes());
    out.add_(bias->to(at::kFloat).unsqueeze(0));
  }
  return out;
}

}  // namespace costeer
