// torch.ops.costeer_ext.steer: the C++ kernels behind the Python op costeer::steer.
// The CPU build registers the CPU kernel; a build with COSTEER_WITH_CUDA also the CUDA launcher.
#include <ATen/ATen.h>
#include <cstdlib>
#include <string>
#include <vector>
#include <torch/library.h>

#ifdef COSTEER_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <unordered_map>

#include "steer_cuda.h"
#endif

namespace costeer {

at::Tensor steer_cpu(const at::Tensor& llm, const at::Tensor& ctx,
                     const c10::optional<at::Tensor>& noctx, const at::Tensor& hparams,
                     at::Tensor& out, c10::string_view mode, int64_t num_splits);
std::string cpu_isa(c10::string_view request);
at::Tensor linear_rows_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::Tensor& out);
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& mask, double scale, at::Tensor& out);
std::vector<std::string> cpu_isas();
std::string cpu_q4_1_form(c10::string_view request);
at::Tensor steer_hidden_cpu(const at::Tensor& llm, const at::Tensor& hdiff, const at::Tensor& weight,
                            const at::Tensor& hparams, at::Tensor& out, int64_t num_splits);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& llm, const at::Tensor& ctx, const c10::optional<at::Tensor>& noctx,
    const at::Tensor& hparams, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset,
    bool row_keyed, bool want_maxp, int64_t num_samples);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_hidden_cpu(
    const at::Tensor& llm, const at::Tensor& hdiff, const at::Tensor& weight, const at::Tensor& hparams,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& offset, bool row_keyed,
    bool want_maxp, int64_t num_samples);

#ifdef COSTEER_WITH_CUDA
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DT_F32;
    case at::kHalf: return cuda::DT_F16;
    case at::kBFloat16: return cuda::DT_BF16;
    default: TORCH_CHECK(false, "costeer_ext::steer: unsupported dtype ", t.scalar_type());
  }
  return 0;
}

// Per-device counters, zeroed once: the kernel leaves them zero, so no memset per call and the
// same buffer is reused by CUDA-graph replays.
at::Tensor counter_buffer(const at::Device& device, int64_t n) {
  static std::mutex mu;
  static std::unordered_map<int, at::Tensor> buffers;
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& buf = buffers[device.index()];
  if (!buf.defined() || buf.numel() < n) {
    buf = at::zeros({std::max<int64_t>(n, 1024)}, at::TensorOptions().device(device).dtype(at::kInt));
  }
  return buf;
}

at::Tensor steer_cuda(const at::Tensor& llm, const at::Tensor& ctx,
                      const c10::optional<at::Tensor>& noctx, const at::Tensor& hparams,
                      at::Tensor& out, c10::string_view mode, int64_t num_splits) {
  TORCH_CHECK(llm.dim() == 2 && ctx.sizes() == llm.sizes() && out.sizes() == llm.sizes(),
              "costeer_ext::steer: expected [B, V] inputs and out of one shape");
  TORCH_CHECK(out.scalar_type() == at::kFloat, "costeer_ext::steer: out must be float32");
  const bool iter = mode == "iterative";
  TORCH_CHECK(iter || mode == "closed_form", "costeer_ext::steer: unknown mode ", mode);
  const c10::cuda::CUDAGuard guard(llm.device());
  const int64_t B = llm.size(0), V = llm.size(1);
  auto hp = hparams.to(llm.device(), at::kDouble).contiguous();
  TORCH_CHECK(hp.dim() == 2 && hp.size(1) == 5 && (hp.size(0) == 1 || hp.size(0) == B),
              "costeer_ext::steer: hparams must be float64 [1 or B, 5]");
  const bool has_noctx = noctx.has_value() && noctx->defined();
  auto status = at::empty({B}, llm.options().dtype(at::kInt));
  if (B == 0) return status;

  cuda::SteerLaunch a{};
  a.zl = llm.data_ptr();
  a.zc = ctx.data_ptr();
  a.zn = has_noctx ? noctx->data_ptr() : nullptr;
  a.zl_stride = llm.stride(0);
  a.zc_stride = ctx.stride(0);
  a.zn_stride = has_noctx ? noctx->stride(0) : 0;
  a.zl_dtype = dtype_code(llm);
  a.zc_dtype = dtype_code(ctx);
  a.zn_dtype = has_noctx ? dtype_code(*noctx) : a.zc_dtype;
  a.hp = hp.data_ptr<double>();
  a.hp_stride = hp.size(0) == 1 ? 0 : 5;
  a.out = out.data_ptr<float>();
  a.out_stride = out.stride(0);
  a.status = status.data_ptr<int32_t>();
  a.B = B;
  a.V = V;
  a.iterative = iter ? 1 : 0;
  // COSTEER_CUDA_MERGE=last: the split row's last-block merge even where the barrier applies
  // (read per call so that benchmarks and tests can compare the two in one process).
  const char* merge = std::getenv("COSTEER_CUDA_MERGE");
  a.force_last = merge != nullptr && std::string(merge) == "last" ? 1 : 0;
  at::Tensor u, part, flags, counters;
  if (iter) {
    u = at::empty({B, V}, out.options());
    a.u = u.data_ptr<float>();
    a.splits = 1;
  } else {
    a.splits = num_splits > 0 ? static_cast<int>(std::min<int64_t>(num_splits, 1024))
                              : cuda::steer_cuda_splits(B, V, llm.device().index());
    if (a.splits > 1) {
      part = at::empty({B * a.splits * 2}, out.options());
      flags = at::empty({B * a.splits}, status.options());
      counters = counter_buffer(llm.device(), 2 * B);
      a.part = part.data_ptr<float>();
      a.part_flags = flags.data_ptr<int32_t>();
      a.counters = reinterpret_cast<unsigned*>(counters.data_ptr<int32_t>());
    }
  }
  const cudaError_t err = cuda::steer_cuda_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "costeer_ext::steer: CUDA launch failed: ", cudaGetErrorString(err));
  return status;
}

}  // namespace
#endif

}  // namespace costeer

TORCH_LIBRARY(costeer_ext, m) {
  m.def(
      "steer(Tensor llm, Tensor ctx, Tensor? noctx, Tensor hparams, Tensor(a!) out, "
      "str mode='closed_form', int num_splits=0) -> Tensor");
  // The projection fused in: z_c = W hdiff chunk by chunk (hdiff = h_c - h_n, float32 [B, H]).
  m.def("steer_hidden(Tensor llm, Tensor hdiff, Tensor weight, Tensor hparams, Tensor(a!) out, int num_splits=0) -> Tensor");
  // Steer + pick the next token (greedy / Gumbel-max with top-k, top-p, min-p); nothing [B, V] written.
  m.def(
      "sample(Tensor llm, Tensor ctx, Tensor? noctx, Tensor hparams, Tensor temperature, Tensor top_k, "
      "Tensor top_p, Tensor min_p, Tensor seed, Tensor offset, bool row_keyed, bool want_maxp, "
      "int num_samples) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "sample_hidden(Tensor llm, Tensor hdiff, Tensor weight, Tensor hparams, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, Tensor offset, bool row_keyed, "
      "bool want_maxp, int num_samples) -> (Tensor, Tensor, Tensor, Tensor)");
  // out[M, N] = x W^T (+ bias) for a few float32 rows x [M, K], the weight rows [N, K] (fp32/fp16/bf16)
  // streamed once for all M rows (csrc/linear_cpu.cpp).
  m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> Tensor(a!)");
  // One query token per row: q [B, Hq, D] against k, v [B, Hkv, L, D] (float32, Hq a multiple of
  // Hkv), mask [B, L] bool (True: attend) or float32 (added), out [B, Hq, D] (csrc/attention_cpu.cpp).
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor(a!) out) -> Tensor(a!)");
  // The CPU kernels' instruction-set path: request "" queries, "portable" | "avx2" | "avx512" |
  // "auto" selects (ValueError for a path this CPU lacks); returns the path in use.
  m.def("cpu_isa(str request='') -> str", &costeer::cpu_isa);
  // The paths this CPU and build can run, slowest first.
  m.def("cpu_isas() -> str[]", &costeer::cpu_isas);
  // How the avx512 path forms Q4_1 weights: request "" queries, "permute" | "nibbles" | "auto"
  // selects (the same result bit for bit; "auto": permutes on Intel, nibbles elsewhere).
  m.def("cpu_q4_1_form(str request='') -> str", &costeer::cpu_q4_1_form);
}

TORCH_LIBRARY_IMPL(costeer_ext, CPU, m) {
  m.impl("steer", &costeer::steer_cpu);
  m.impl("steer_hidden", &costeer::steer_hidden_cpu);
  m.impl("sample", &costeer::sample_cpu);
  m.impl("sample_hidden", &costeer::sample_hidden_cpu);
  m.impl("linear_rows", &costeer::linear_rows_cpu);
  m.impl("decode_attention", &costeer::decode_attention_cpu);
}

#ifdef COSTEER_WITH_CUDA
TORCH_LIBRARY_IMPL(costeer_ext, CUDA, m) { m.impl("steer", &costeer::steer_cuda); }
#endif
