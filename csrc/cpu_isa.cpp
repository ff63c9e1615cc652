// The CPU kernels' instruction-set paths and the choice between them at run time.
//
// "portable": cpu_loops.inc at the compiler's baseline target (x86-64 SSE2 here, whatever the
// platform is elsewhere), auto-vectorized. "avx2" (AVX2 + FMA + F16C) and "avx512" (AVX-512F):
// the same loops compiled under `#pragma GCC target`, with the exponential-heavy ones and the
// projection replaced by cpu_simd.inc on 8 / 16 lanes. A prebuilt extension cannot use
// -march=native, and per-file flags are unavailable to the just-in-time build: target regions
// keep all paths in one binary. The active path is the best this CPU runs unless COSTEER_CPU_ISA
// (read at first use) or torch.ops.costeer_ext.cpu_isa(request) names another.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define STEER_X86_PATHS 1
#include <immintrin.h>
#else
#define STEER_X86_PATHS 0
#endif

#include "steer_cpu.h"
#include "steer_math.h"

namespace costeer {
namespace cpu {

namespace portable {
#include "cpu_loops.inc"

const Kernels table = {
    "portable", widen_f16, widen_bf16,    steer_chunk, nullptr, chunk_max, exp_sum, subtract, store_shifted,
    iterate_chunk, delta_chunk, project, count_ge, mass_ge, tempered, store_shifted, weighted_rows,
};
}  // namespace portable

#if STEER_X86_PATHS

// Entry m, lane j: the index of the j-th set bit of m (vpermps indices of AVX2's left-pack), as
// 32-bit lanes ready to load (8 KiB): byte indices widened by vpmovzxbd would cost a second
// shuffle on the port the permute and the bfloat16 interleave already share.
struct alignas(32) PackTable {
  int32_t idx[256][8];
  constexpr PackTable() : idx() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) idx[m][k++] = b;
    }
  }
};
constexpr PackTable kPack{};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt")
namespace avx2 {
#include "cpu_loops.inc"

struct Avx2 {
  static constexpr const char* NAME = "avx2";
  static constexpr int W = 8;
  static constexpr int MAX_NR = 3;  // 4 x 3 accumulators + 3 h + 1 w = 16 ymm registers
  static constexpr int WIDE_NR = 1;  // 8 x 1 accumulators + 1 h + 1 w (8 x 2 would spill)
  static constexpr bool PERM16 = false;  // 8 lanes: a 16-entry table takes two permutes and a blend
  static constexpr int EXP_LANES = 1;
  using V = __m256;
  using M = __m256;  // lane masks (all ones / zero)
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  static V vmax(V x, V c) { return _mm256_max_ps(x, c); }               // x > c ? x : c
  static V max_keep(V m, V x) { return _mm256_max_ps(x, m); }           // as steer_math max_keep
  static M neq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M nlt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NLT_UQ); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static V zero_unless(M m, V v) { return _mm256_and_ps(m, v); }
  // 2^n for t = n + 1.5 * 2^23 (steer_exp's rounding trick): n sits in t's low mantissa bits.
  static V pow2_of_rounded(V t) {
    const __m256i e = _mm256_add_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(127 - 0x4B400000));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  // vexp_sum's table: 2^(m / 8) for t = m + 1.5 * 2^23, as 2^(j / 8) (j = m & 7, the entry the
  // permute picks from t's low bits) with (m >> 3) << 23 added to its bits. Each entry is the bits
  // of float(2^(j / 8)) less j << 20, so that adding t << 20 (= m << 20: j << 20 plus the exponent)
  // leaves exactly the exponent step.
  static constexpr int EXP_TABLE = 8;
  static V pow2_frac_of_rounded(V t) {
    const __m256i tbl = _mm256_setr_epi32(0x3F800000, 0x3F7B95C2, 0x3F7837F0, 0x3F75FED7, 0x3F7504F3, 0x3F75672A,
                                          0x3F7744FD, 0x3F7AC0C7);
    const __m256i ti = _mm256_castps_si256(t);
    return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_permutevar8x32_epi32(tbl, ti), _mm256_slli_epi32(ti, 20)));
  }
  // Per-lane counters of mask lanes (a true lane is all ones: -1).
  using CI = __m256i;
  static CI zero_i() { return _mm256_setzero_si256(); }
  static CI count(CI c, M m) { return _mm256_sub_epi32(c, _mm256_castps_si256(m)); }
  static CI add_i(CI a, CI b) { return _mm256_add_epi32(a, b); }
  static int64_t hsum_i(CI c) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
  }
  // The lanes of v under m packed to dst[0..count) (W floats written); returns count.
  static int compress_store(float* dst, M m, V v) {
    const unsigned bits = (unsigned)_mm256_movemask_ps(m);
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[bits]));
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(v, idx));
    return __builtin_popcount(bits);
  }
  static V first_n(V v, int n) {  // lanes >= n zeroed (bitwise: NaN lanes too)
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane)), v);
  }
  // The four horizontal sums of a, b, c, e into out[0..4): one tree for the four.
  static void hsum4(V a, V b, V c, V e, float* out) {
    const __m256 abce = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abce), _mm256_extractf128_ps(abce, 1)));
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {  // v holds no NaN (max_keep drops them)
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static CI load_u8(const char* p) {  // 8 bytes zero-extended to 32-bit lanes
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static CI low_nibbles(CI q) { return _mm256_and_si256(q, _mm256_set1_epi32(15)); }
  static CI high_nibbles(CI q) { return _mm256_srli_epi32(q, 4); }
  static V to_float(CI q) { return _mm256_cvtepi32_ps(q); }
  // (nib | fifth bit << 4) - 16 as float32, the fifth bits of elements first.. from qh.
  static V q5_minus16(CI nib, uint32_t qh, int first) {
    const __m256i lane = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
    const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)qh), lane), _mm256_set1_epi32(1));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(nib, _mm256_slli_epi32(bit, 4)), _mm256_set1_epi32(16)));
  }
  // ((qh >> shift) & 3) << 4 | nib, less 32, as float32: a Q6_K weight's code (steer_cpu.h).
  static V q6_minus32(CI nib, CI qh, int shift) {
    const __m256i high = _mm256_and_si256(_mm256_srl_epi32(qh, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(3));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_or_si256(nib, _mm256_slli_epi32(high, 4)), _mm256_set1_epi32(32)));
  }
  static V load_i8(const char* p) {  // 8 int8 as float32
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // 16 bfloat16 as two vectors: the even elements shifted into the high halves, the odd ones with
  // the low halves cleared (no shuffle: AVX2's one shuffle port also carries compress_store's
  // permute and store_pair's interleave; unpacking with zeros took one shuffle per vector).
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u)));
  }
  // The 16 floats of a load_bf16_pair order, stored in order: in-lane interleave, then the
  // 128-bit halves exchanged.
  static void store_pair(float* p, V even, V odd) {
    const V lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd);  // 0-3 8-11 | 4-7 12-15
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};
using S = Avx2;
#include "cpu_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,popcnt")
namespace avx512 {
#include "cpu_loops.inc"

struct Avx512 {
  static constexpr const char* NAME = "avx512";
  static constexpr int W = 16;
  static constexpr int MAX_NR = 4;  // 4 x 4 accumulators of 32 zmm registers
  static constexpr int WIDE_NR = 3;  // 8 x 3 accumulators + 3 h + 1 w = 28 zmm registers
  static constexpr bool PERM16 = true;  // Q4_1 weights as permutes of a 16-entry table (cpu_simd.inc)
  static constexpr int EXP_LANES = 2;
  using V = __m512;
  using M = __mmask16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V vmax(V x, V c) { return _mm512_max_ps(x, c); }
  static V max_keep(V m, V x) { return _mm512_max_ps(x, m); }
  static M neq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M nlt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ); }
  static bool any(M m) { return m != 0; }
  static V zero_unless(M m, V v) { return _mm512_maskz_mov_ps(m, v); }
  static V pow2_of_rounded(V t) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(127 - 0x4B400000));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  // As Avx2's, with 16 entries (one 16-lane permute): float(2^(j / 16)) less j << 19.
  static constexpr int EXP_TABLE = 16;
  static V pow2_frac_of_rounded(V t) {
    const __m512i tbl = _mm512_setr_epi32(0x3F800000, 0x3F7DAAC3, 0x3F7B95C2, 0x3F79C3D3, 0x3F7837F0, 0x3F76F532,
                                          0x3F75FED7, 0x3F75583F, 0x3F7504F3, 0x3F7508A4, 0x3F75672A, 0x3F76248C,
                                          0x3F7744FD, 0x3F78CCDF, 0x3F7AC0C7, 0x3F7D257D);
    const __m512i ti = _mm512_castps_si512(t);
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_permutexvar_epi32(ti, tbl), _mm512_slli_epi32(ti, 19)));
  }
  using CI = __m512i;
  static CI zero_i() { return _mm512_setzero_si512(); }
  static CI count(CI c, M m) { return _mm512_mask_sub_epi32(c, m, c, _mm512_set1_epi32(-1)); }
  static CI add_i(CI a, CI b) { return _mm512_add_epi32(a, b); }
  static int64_t hsum_i(CI c) { return _mm512_reduce_add_epi32(c); }
  // Compress in a register, then a plain store (vcompressps to memory is slow on AMD).
  static int compress_store(float* dst, M m, V v) {
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(m, v));
    return __builtin_popcount((unsigned)m);
  }
  static V first_n(V v, int n) { return _mm512_maskz_mov_ps((M)((1u << n) - 1u), v); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static __m256 fold(V v) {  // the two 256-bit halves added (AVX-512F only: no 32x8 extract)
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static void hsum4(V a, V b, V c, V e, float* out) {
    const __m256 abce = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(e)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abce), _mm256_extractf128_ps(abce, 1)));
  }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static V load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static CI load_u8(const char* p) {  // 16 bytes zero-extended to 32-bit lanes
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static CI low_nibbles(CI q) { return _mm512_and_si512(q, _mm512_set1_epi32(15)); }
  static CI high_nibbles(CI q) { return _mm512_srli_epi32(q, 4); }
  static V iota() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static V perm16(CI idx, V table) { return _mm512_permutexvar_ps(idx, table); }  // lanes' low 4 bits
  // The byte offsets of up to 8 weight rows (gather indices) and their 32-bit words at one block:
  // fp16 d and fp16 m of each, converted together (exact), stored d_0, m_0, d_1, m_1, ...
  using Rows = __m256i;
  static Rows row_offsets(int64_t wsb, int nw) {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(nw > 1 ? wsb : 0)));
  }
  static void headers(const char* p, Rows rows, int nw, float* dm) {
    if (nw == 1) {
      uint32_t bits;
      std::memcpy(&bits, p, 4);
      _mm_storel_pi(reinterpret_cast<__m64*>(dm), _mm_cvtph_ps(_mm_cvtsi32_si128((int)bits)));
      return;
    }
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nw), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i words = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), reinterpret_cast<const int*>(p), rows,
                                                      live, 1);
    _mm512_store_ps(dm, _mm512_cvtph_ps(words));
  }
  static V to_float(CI q) { return _mm512_cvtepi32_ps(q); }
  static V q5_minus16(CI nib, uint32_t qh, int first) {
    const __m512i lane = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(first));
    const __m512i bit = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)qh), lane), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(nib, _mm512_slli_epi32(bit, 4)), _mm512_set1_epi32(16)));
  }
  static V q6_minus32(CI nib, CI qh, int shift) {
    const __m512i high = _mm512_and_si512(_mm512_srl_epi32(qh, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(3));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(nib, _mm512_slli_epi32(high, 4)), _mm512_set1_epi32(32)));
  }
  static V load_i8(const char* p) {  // 16 int8 as float32
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static V load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // 32 bfloat16 as two vectors: the even elements shifted into the high halves, the odd ones with
  // the low halves cleared (AVX-512F has no 16-bit unpack; one shift / and each, no shuffle).
  static void load_bf16_pair(const uint16_t* p, V& even, V& odd) {
    const __m512i w = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000u)));
  }
  // The 32 floats of a load_bf16_pair order, stored in order (one two-source permute per 16).
  static void store_pair(float* p, V even, V odd) {
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(p, _mm512_permutex2var_ps(even, lo, odd));
    _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(even, hi, odd));
  }
};
using S = Avx512;
#include "cpu_simd.inc"
}  // namespace avx512
#pragma GCC pop_options

#endif  // STEER_X86_PATHS

namespace {

enum Isa : int { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_COUNT = 3 };
const char* const kNames[ISA_COUNT] = {"portable", "avx2", "avx512"};

// How the AVX-512 path forms Q4_1 weights: as permutes of each block's 16-value table (faster on
// the Intel Xeon measured: SmolLM2's layers 1 row 7.5 -> 5.4 ms) or from the nibbles (faster on
// the AMD Zen 5 measured: 16 rows 9.9 against 15 ms, 1-2 rows 5-10%). Both give the float32
// path's result bit for bit. "auto": permutes on Intel CPUs, nibbles elsewhere.
enum Q41Form : int { Q41_NIBBLES = 0, Q41_PERMUTE = 1 };
const char* const kQ41Names[2] = {"nibbles", "permute"};

int q41_auto() {
#if STEER_X86_PATHS
  __builtin_cpu_init();
  return __builtin_cpu_is("intel") ? Q41_PERMUTE : Q41_NIBBLES;
#else
  return Q41_NIBBLES;
#endif
}

int parse_q41(c10::string_view name, const char* what) {
  if (name == "auto") return q41_auto();
  for (int f = 0; f < 2; ++f)
    if (name == kQ41Names[f]) return f;
  TORCH_CHECK_VALUE(false, what, ": expected \"permute\", \"nibbles\" or \"auto\", got \"", std::string(name), "\"");
  return Q41_NIBBLES;
}

// The setting held in g (-1: not chosen yet): at first use the environment variable var, parsed
// (a bad value raises at every use and never silently runs something else), else the default.
template <typename Parse, typename Default>
int chosen_once(std::atomic<int>& g, const char* var, Parse parse, Default fallback) {
  int v = g.load(std::memory_order_acquire);
  if (v >= 0) return v;
  const char* env = std::getenv(var);
  v = env != nullptr && *env != '\0' ? parse(env, var) : fallback();
  int expected = -1;
  g.compare_exchange_strong(expected, v, std::memory_order_acq_rel);
  return g.load(std::memory_order_acquire);
}

std::atomic<int> g_q41{-1};

int q41_form() { return chosen_once(g_q41, "COSTEER_Q4_1_FORM", parse_q41, q41_auto); }

const Kernels* table_of(int isa) {
#if STEER_X86_PATHS
  if (isa == ISA_AVX512) return q41_form() == Q41_PERMUTE ? &avx512::table : &avx512::table_q4_1_nibbles;
  if (isa == ISA_AVX2) return &avx2::table;
#endif
  (void)isa;
  return &portable::table;
}

bool supported(int isa) {
  if (isa == ISA_PORTABLE) return true;
#if STEER_X86_PATHS
  // __builtin_cpu_init: this may run before libgcc's own CPU detection constructor. The checks
  // include the OS's saving of the AVX / AVX-512 register state (XGETBV).
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
  if (isa == ISA_AVX2) return avx2;
  if (isa == ISA_AVX512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return false;
}

int best() {
  for (int isa = ISA_COUNT - 1; isa > 0; --isa)
    if (supported(isa)) return isa;
  return ISA_PORTABLE;
}

// "auto" is the best path this CPU runs; names are the ones cpu_isas() lists.
int parse(c10::string_view name, const char* what) {
  if (name == "auto") return best();
  for (int isa = 0; isa < ISA_COUNT; ++isa) {
    if (name != kNames[isa]) continue;
    TORCH_CHECK_VALUE(supported(isa), what, ": the \"", kNames[isa], "\" path needs ",
                      isa == ISA_AVX512 ? "AVX-512F (and AVX2, FMA, F16C)" : "AVX2, FMA and F16C",
                      ", which this CPU or build lacks; available: ",
                      supported(ISA_AVX2) ? (supported(ISA_AVX512) ? "portable, avx2, avx512" : "portable, avx2")
                                          : "portable");
    return isa;
  }
  TORCH_CHECK_VALUE(false, what, ": expected \"portable\", \"avx2\", \"avx512\" or \"auto\", got \"",
                    std::string(name), "\"");
  return ISA_PORTABLE;
}

std::atomic<int> g_isa{-1};

int active() { return chosen_once(g_isa, "COSTEER_CPU_ISA", parse, best); }

}  // namespace

const Kernels& kernels() { return *table_of(active()); }

}  // namespace cpu

// torch.ops.costeer_ext.cpu_isa: request "" queries; a name (or "auto") selects that path for the
// whole process and overrides COSTEER_CPU_ISA. Returns the path in use after the call.
std::string cpu_isa(c10::string_view request) {
  if (!request.empty()) cpu::g_isa.store(cpu::parse(request, "costeer_ext::cpu_isa"), std::memory_order_release);
  return cpu::kNames[cpu::active()];
}

// torch.ops.costeer_ext.cpu_q4_1_form: how the avx512 path forms Q4_1 weights ("permute" or
// "nibbles"; the other paths always use the nibbles). request "" queries; a form (or "auto")
// selects it for the whole process and overrides COSTEER_Q4_1_FORM. Returns the form in use.
std::string cpu_q4_1_form(c10::string_view request) {
  if (!request.empty()) cpu::g_q41.store(cpu::parse_q41(request, "costeer_ext::cpu_q4_1_form"), std::memory_order_release);
  return cpu::kQ41Names[cpu::q41_form()];
}

// The paths this CPU and build run, slowest first.
std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int isa = 0; isa < cpu::ISA_COUNT; ++isa)
    if (cpu::supported(isa)) out.emplace_back(cpu::kNames[isa]);
  return out;
}

}  // namespace costeer
