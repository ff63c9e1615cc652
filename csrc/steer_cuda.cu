// CUDA kernels of costeer_ext::steer. Self-contained apart from steer_math.h / steer_cuda.h, so it
// compiles (and is checked for register spills) with plain nvcc, without torch headers.
//
// Closed form: one launch, grid B * S (S blocks per row). Each block streams its segment once with
// 16-byte loads, writes x = z_L + c_T (z_c - z_n) to `out` and keeps a per-thread online
// (max, sum-exp). S = 1: the block normalizes its own row. S > 1: the blocks of a row publish
// their partials, then either
// - barrier (when the whole grid is resident at once, from the occupancy API): the row's blocks
//   meet at a sense-reversing counter, each merges the S partials and normalizes its own
//   segment, still in L2; or
// - last block: each bumps a per-row counter and the last to arrive merges and normalizes the
//   whole row alone (never waits on another block, so safe for any grid, but one block then
//   sweeps the whole row).
// The counters are left as found (counts 0): no memset per call, and CUDA-graph replays work.
// S fills every SM with as many blocks as fit: one block per SM cannot keep enough loads in
// flight (22% of copy bandwidth at B=64 bf16 on an H200).
// Iterative: one block per row runs the literal T-step update, T + 3 sweeps.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "steer_math.h"
#include "steer_cuda.h"

namespace costeer {
namespace cuda {

constexpr int THREADS = 512;
constexpr int VEC = 8;  // elements per thread per step: 2 x 16 B of fp32, 16 B of fp16/bf16

struct Stat {
  float m, s;
  int f;
};

__device__ __forceinline__ Stat stat_identity() { return Stat{-STEER_INF, 0.0f, 0}; }

__device__ __forceinline__ void stat_merge(Stat& a, const Stat& b) {
  online_merge(a.m, a.s, b.m, b.s);
  a.f |= b.f;
}

__device__ __forceinline__ Stat warp_reduce(Stat a) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stat b;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
    b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
    b.f = __shfl_xor_sync(0xffffffffu, a.f, off);
    stat_merge(a, b);
  }
  return a;
}

// Every thread gets the block's merged statistics.
__device__ Stat block_reduce(Stat a) {
  __shared__ Stat warps[THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_reduce(a);
  if (lane == 0) warps[warp] = a;
  __syncthreads();
  if (warp == 0) {
    a = lane < THREADS / 32 ? warps[lane] : stat_identity();
    a = warp_reduce(a);
    if (lane == 0) warps[0] = a;
  }
  __syncthreads();
  a = warps[0];
  __syncthreads();  // warps[] is reused by the next call
  return a;
}

__device__ __forceinline__ void unpack_bf16x2(uint32_t w, float* v) {
  v[0] = bf16_bits_to_float((uint16_t)(w & 0xffffu));
  v[1] = bf16_bits_to_float((uint16_t)(w >> 16));
}

__device__ __forceinline__ void unpack_f16x2(uint32_t w, float* v) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
  v[0] = f.x;
  v[1] = f.y;
}

// VEC elements from a 16-byte aligned address. The dtype switch is uniform across the grid.
__device__ __forceinline__ void load_vec(const char* row, int dtype, long long i, float* v) {
  if (dtype == DT_F32) {
    const float4* p = reinterpret_cast<const float4*>(row) + (i >> 2);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(row) + (i >> 3));
    if (dtype == DT_F16) {
      unpack_f16x2(q.x, v); unpack_f16x2(q.y, v + 2); unpack_f16x2(q.z, v + 4); unpack_f16x2(q.w, v + 6);
    } else {
      unpack_bf16x2(q.x, v); unpack_bf16x2(q.y, v + 2); unpack_bf16x2(q.z, v + 4); unpack_bf16x2(q.w, v + 6);
    }
  }
}

__device__ __forceinline__ float load_one(const char* row, int dtype, long long i) {
  if (dtype == DT_F32) return __ldg(reinterpret_cast<const float*>(row) + i);
  const unsigned short h = __ldg(reinterpret_cast<const unsigned short*>(row) + i);
  return dtype == DT_F16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
}

__device__ __forceinline__ long long esize(int dtype) { return dtype == DT_F32 ? 4 : 2; }

struct Rows {
  const char *zl, *zc, *zn;
  float* out;
};

__device__ __forceinline__ Rows row_pointers(const SteerLaunch& a, long long r) {
  Rows p;
  p.zl = static_cast<const char*>(a.zl) + r * a.zl_stride * esize(a.zl_dtype);
  p.zc = static_cast<const char*>(a.zc) + r * a.zc_stride * esize(a.zc_dtype);
  p.zn = a.zn ? static_cast<const char*>(a.zn) + r * a.zn_stride * esize(a.zn_dtype) : nullptr;
  p.out = a.out + r * a.out_stride;
  return p;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// x for one element; its status bits are computed exactly only when the quick test fires.
__device__ __forceinline__ float steer_one(float l, float c_in, float n_in, bool has_noctx, float c, int& f) {
  const float d = has_noctx ? masked_delta(c_in, n_in) : c_in;
  const float x = steered(l, d, c);
  if (suspicious((l + c_in) + ((has_noctx ? n_in : 0.0f) + x))) f |= element_flags(l, c_in, n_in, has_noctx, x);
  return x;
}

__device__ __forceinline__ void normalize(float* out, long long start, long long end, float lse, bool vec) {
  long long i = start + (long long)threadIdx.x * VEC;
  if (vec) {
    for (; i + VEC <= end; i += (long long)THREADS * VEC) {
      float4* p = reinterpret_cast<float4*>(out + i);
      float4 a = __ldcg(p), b = __ldcg(p + 1);
      a.x -= lse; a.y -= lse; a.z -= lse; a.w -= lse;
      b.x -= lse; b.y -= lse; b.z -= lse; b.w -= lse;
      p[0] = a;
      p[1] = b;
    }
    start = start + (end - start) / VEC * VEC;
  }
  for (long long j = start + threadIdx.x; j < end; j += THREADS) out[j] = __ldcg(out + j) - lse;
}

// The row's log-sum-exp from its S partials, written by other SMs: read through L2 (__ldcg), not
// L1. Every thread gets it (block_reduce broadcasts); thread 0 stores the status if asked.
__device__ float merged_lse(const SteerLaunch& a, long long r, long long base, bool ok, bool store_status) {
  Stat m = stat_identity();
  for (int j = threadIdx.x; j < a.splits; j += THREADS) {
    Stat q;
    q.m = __ldcg(a.part + 2 * (base + j));
    q.s = __ldcg(a.part + 2 * (base + j) + 1);
    q.f = __ldcg(a.part_flags + base + j);
    stat_merge(m, q);
  }
  m = block_reduce(m);
  float lse;
  const int f = finish_row(m.m, m.s, m.f, ok, &lse);
  if (store_status && threadIdx.x == 0) a.status[r] = f;
  return lse;
}

__global__ void __launch_bounds__(THREADS) steer_closed_form_kernel(const SteerLaunch a) {
  const long long r = blockIdx.x / a.splits;
  const int k = blockIdx.x % a.splits;
  const RowParams hp = row_params(a.hp + r * a.hp_stride);
  const float c = hp.cf;
  const Rows p = row_pointers(a, r);
  const bool has_noctx = p.zn != nullptr;
  const long long V = a.V;
  // Segments are whole multiples of VEC, so vector loads stay aligned when the row bases are.
  const long long seg = ((V + a.splits - 1) / a.splits + VEC - 1) / VEC * VEC;
  const long long start = k * seg < V ? k * seg : V;
  const long long end = start + seg < V ? start + seg : V;
  const bool vec = aligned16(p.zl) && aligned16(p.zc) && (!has_noctx || aligned16(p.zn)) && aligned16(p.out);

  Stat st = stat_identity();
  long long tail = start;
  if (vec) {
    for (long long i = start + (long long)threadIdx.x * VEC; i + VEC <= end; i += (long long)THREADS * VEC) {
      float l[VEC], cc[VEC], nn[VEC], x[VEC];
      load_vec(p.zl, a.zl_dtype, i, l);
      load_vec(p.zc, a.zc_dtype, i, cc);
      if (has_noctx) load_vec(p.zn, a.zn_dtype, i, nn);
      float vm = -STEER_INF;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        x[j] = steer_one(l[j], cc[j], has_noctx ? nn[j] : 0.0f, has_noctx, c, st.f);
        vm = max_keep(vm, x[j]);
      }
      float4* o = reinterpret_cast<float4*>(p.out + i);
      o[0] = make_float4(x[0], x[1], x[2], x[3]);
      o[1] = make_float4(x[4], x[5], x[6], x[7]);
      if (vm > st.m) {  // rescale only when the running max moves
        st.s *= steer_exp(st.m - safe_max(vm));
        st.m = vm;
      }
      const float ms = safe_max(st.m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) st.s += steer_exp(x[j] - ms);
    }
    tail = start + (end - start) / VEC * VEC;
  }
  for (long long i = tail + threadIdx.x; i < end; i += THREADS) {
    const float x = steer_one(load_one(p.zl, a.zl_dtype, i), load_one(p.zc, a.zc_dtype, i),
                              has_noctx ? load_one(p.zn, a.zn_dtype, i) : 0.0f, has_noctx, c, st.f);
    p.out[i] = x;
    online_merge(st.m, st.s, x, 1.0f);
  }

  __shared__ float row_lse;
  __shared__ bool is_last;
  if (a.splits == 1) {
    st = block_reduce(st);
    if (threadIdx.x == 0) {
      float lse;
      a.status[r] = finish_row(st.m, st.s, st.f, hp.ok, &lse);
      row_lse = lse;
    }
    __syncthreads();
    normalize(p.out, start, end, row_lse, vec);
    return;
  }

  st = block_reduce(st);
  const long long base = r * a.splits;
  if (threadIdx.x == 0) {
    a.part[2 * (base + k)] = st.m;
    a.part[2 * (base + k) + 1] = st.s;
    a.part_flags[base + k] = st.f;
  }
  if (a.barrier) {
    if (threadIdx.x == 0) {
      unsigned* count = a.counters + 2 * r;
      unsigned* gen = count + 1;
      // The generation is read before arriving, so it cannot move before every block of the
      // row has read it.
      const unsigned g = atomicAdd(gen, 0u);
      __threadfence();
      if (atomicAdd(count, 1u) == (unsigned)(a.splits - 1)) {
        atomicExch(count, 0u);
        __threadfence();
        atomicAdd(gen, 1u);
      } else {
        while (atomicAdd(gen, 0u) == g) __nanosleep(32);
      }
      __threadfence();
    }
    __syncthreads();
    normalize(p.out, start, end, merged_lse(a, r, base, hp.ok, k == 0), vec);
    return;
  }
  // Every thread fences its own `out` stores before the block arrives: the last block re-reads them.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    // counters[2r] is the row's count in both merges; counters[2r + 1], the barrier's
    // generation, only ever grows.
    const unsigned arrived = atomicAdd(a.counters + 2 * r, 1u);
    is_last = arrived == (unsigned)(a.splits - 1);
    if (is_last) {
      a.counters[2 * r] = 0u;
      __threadfence();
    }
  }
  __syncthreads();
  if (!is_last) return;
  // `out` was written by other SMs: normalize() reads it through L2 (__ldcg), not L1.
  normalize(p.out, 0, V, merged_lse(a, r, base, hp.ok, true), vec);
}

__global__ void __launch_bounds__(THREADS) steer_iterative_kernel(const SteerLaunch a) {
  const long long r = blockIdx.x;
  const RowParams hp = row_params(a.hp + r * a.hp_stride);
  const Rows p = row_pointers(a, r);
  const bool has_noctx = p.zn != nullptr;
  const long long V = a.V;
  float* u = a.u + r * V;
  __shared__ float shared_lse[2];

  // Sweep 0: the closed form's statistics (status bits identical to closed form) and lse(z_L).
  Stat sx = stat_identity(), sb = stat_identity(), sc = stat_identity(), sn = stat_identity();
  for (long long i = threadIdx.x; i < V; i += THREADS) {
    const float l = load_one(p.zl, a.zl_dtype, i);
    const float zc = load_one(p.zc, a.zc_dtype, i);
    const float zn = has_noctx ? load_one(p.zn, a.zn_dtype, i) : 0.0f;
    const float x = steer_one(l, zc, zn, has_noctx, hp.cf, sx.f);
    online_merge(sx.m, sx.s, x, 1.0f);
    online_merge(sb.m, sb.s, l, 1.0f);
    online_merge(sc.m, sc.s, zc, 1.0f);
    online_merge(sn.m, sn.s, zn, 1.0f);
  }
  sx = block_reduce(sx);
  sb = block_reduce(sb);
  sc = block_reduce(sc);
  sn = block_reduce(sn);
  const float lse_b = sb.m + steer_log(sb.s);
  const float shift = delta_shift(sc.m + steer_log(sc.s), sn.m + steer_log(sn.s));
  // p_0 = b (normalizer 0), U_0 = 0.
  for (long long i = threadIdx.x; i < V; i += THREADS) {
    p.out[i] = load_one(p.zl, a.zl_dtype, i) - lse_b;
    u[i] = 0.0f;
  }
  float lse_p = 0.0f;
  for (long long t = 1; t <= hp.T; ++t) {
    const float tf = (float)t;
    const float tlam = tf * hp.lam;
    const float denom = tlam + hp.inv_eta;
    Stat s = stat_identity();
    // Each thread rereads only what it wrote itself: no barrier needed between steps.
    for (long long i = threadIdx.x; i < V; i += THREADS) {
      const float b = load_one(p.zl, a.zl_dtype, i) - lse_b;
      const float zc = load_one(p.zc, a.zc_dtype, i);
      const float d = has_noctx ? shifted_delta(zc, load_one(p.zn, a.zn_dtype, i), shift) : zc;
      float ui = u[i];
      const float pre = iterate_element(b, d, p.out[i] - lse_p, ui, hp.alpha, hp.beta, tlam, hp.inv_eta, denom);
      u[i] = ui;
      p.out[i] = pre;
      online_merge(s.m, s.s, pre, 1.0f);
    }
    s = block_reduce(s);
    lse_p = s.m + steer_log(s.s);
  }
  if (threadIdx.x == 0) {
    float lse_x;
    const int st = finish_row(sx.m, sx.s, sx.f, hp.ok, &lse_x);
    a.status[r] = st;
    shared_lse[0] = st != 0 ? __int_as_float(0x7fc00000) : lse_p;
  }
  __syncthreads();
  const float fin = shared_lse[0];
  for (long long i = threadIdx.x; i < V; i += THREADS) p.out[i] -= fin;
}

namespace {
struct DeviceInfo {
  int n_sm = 0, resident = 0;  // SMs; closed-form blocks resident per SM (occupancy API)
};

const DeviceInfo& device_info(int device) {
  static DeviceInfo info[64];
  static DeviceInfo fallback;
  DeviceInfo& d = device >= 0 && device < 64 ? info[device] : fallback;
  if (d.n_sm == 0) {
    int n_sm = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n_sm <= 0) n_sm = 1;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, steer_closed_form_kernel, THREADS, 0) != cudaSuccess ||
        per_sm <= 0) {
      per_sm = 1;
      cudaGetLastError();
    }
    d.resident = per_sm;
    d.n_sm = n_sm;
  }
  return d;
}
}  // namespace

int steer_cuda_splits(long long B, long long V, int device) {
  const DeviceInfo& d = device_info(device);
  const long long blocks = (long long)d.n_sm * d.resident;
  if (B >= blocks) return 1;
  // Fill the GPU with a grid that is resident at once (so the barrier merge applies), with at
  // least four warps' worth of vector steps per segment.
  long long s = blocks / B;
  long long max_s = V / (128LL * VEC);
  if (max_s < 1) max_s = 1;
  if (s > max_s) s = max_s;
  if (s > 1024) s = 1024;
  return s < 1 ? 1 : (int)s;
}

cudaError_t steer_cuda_launch(const SteerLaunch& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (a.iterative) {
    steer_iterative_kernel<<<(unsigned)a.B, THREADS, 0, stream>>>(a);
  } else {
    SteerLaunch l = a;
    int device = 0;
    cudaGetDevice(&device);
    const DeviceInfo& d = device_info(device);
    // Spin only when every block of the grid is resident at once; otherwise the last block merges.
    l.barrier = l.splits > 1 && !l.force_last && l.B * l.splits <= (long long)d.n_sm * d.resident ? 1 : 0;
    steer_closed_form_kernel<<<(unsigned)(l.B * l.splits), THREADS, 0, stream>>>(l);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace costeer
