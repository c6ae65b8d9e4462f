// y = x @ W.T for W held as 4-bit codes in PyTorch's CPU int4 layout (aten::_convert_weight_to_int4pack_for_cpu),
// one scale and offset per group of inputs, float32 activations: w = (q - 8) * s + z, z = (8 - zero) * s.
//
// The decode-time product of cookbook.kernels' int4 linears and int4 tied table (m <= 8 rows of x). The layout
// packs the output rows in blocks of block_n (64 where torch dispatches to AVX-512, 32 otherwise), K-major: for
// each input k, block_n / 2 bytes, byte r holding two rows' codes, low nibble first: rows r and r + block_n / 2
// ("half") or rows 2r and 2r + 1 ("adjacent"); which one this torch uses is found in Python
// (kernels.int4_layout) and passed in. Per block and group the loop sums code * x in float32, the low and the
// high nibbles in separate vector accumulators (AVX-512 or AVX2, compiled with -march=native; one lane at a time
// elsewhere), then applies the group's scale and offset once: sum_k w x = s (sum_k q x - 8 sum_k x) + z sum_k x.
// The loop is bound by its vector instructions, not by memory, so each is counted: the bytes are widened to 32
// bits once and both nibbles taken from that (one widening per 16 bytes, not two), each group's sum of x is
// computed once per call rather than once per block, and in the "half" layout, where a vector's rows are
// consecutive, the scale and offset are applied a vector at a time (each (scale, offset) pair of bf16s read as one
// 32-bit word, split by a shift and a mask). Together 1.13-1.3x on the 262k x 640 head, 1.05-1.13x on the
// decoder's linears (2-core AMD EPYC, against the loop before, alternated in one process).
// PyTorch's own kernel casts the activations to bf16; its scalar build (ATEN_CPU_CAPABILITY=default) is about 30x
// slower than this loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t MAX_M = 8;  // rows of x per call (decode steps, short drafts): cookbook.matvec.MAX_ROWS

// W codes at a time, as floats: the low and the high nibbles of W bytes. AVX-512 and AVX2 (compiled with
// -march=native), one at a time elsewhere.
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 16;
using V = __m512;
inline void nibbles(const uint8_t* b, V& lo, V& hi) {  // one widening of the bytes, then the two nibbles
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
inline V splat(float x) { return _mm512_set1_ps(x); }
inline V zero() { return _mm512_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline float total(V v) { return _mm512_reduce_add_ps(v); }
// W rows' (scale, offset) pairs: each pair one 32-bit word, the scale in its low half; a bf16 is a float's top half
inline void scale_offset(const c10::BFloat16* t, V& s, V& z) {
  const __m512i w = _mm512_loadu_si512(t);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  z = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#elif defined(__AVX2__) && defined(__FMA__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 8;
using V = __m256;
inline void nibbles(const uint8_t* b, V& lo, V& hi) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}
inline V splat(float x) { return _mm256_set1_ps(x); }
inline V zero() { return _mm256_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline float total(V v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs));
}
inline void scale_offset(const c10::BFloat16* t, V& s, V& z) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t));
  s = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  z = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
#else
constexpr int64_t W = 1;
using V = float;
inline void nibbles(const uint8_t* b, V& lo, V& hi) {
  lo = static_cast<float>(b[0] & 15), hi = static_cast<float>(b[0] >> 4);
}
inline V splat(float x) { return x; }
inline V zero() { return 0.f; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline void store(float* p, V v) { *p = v; }
inline V sub(V a, V b) { return a - b; }
inline V add(V a, V b) { return a + b; }
inline V load(const float* p) { return *p; }
inline float total(V v) { return v; }
inline void scale_offset(const c10::BFloat16* t, V& s, V& z) {
  s = static_cast<float>(t[0]), z = static_cast<float>(t[1]);
}
#endif

// One block of 2 * PAIRS output rows for the M rows of x: y[m, n0 .. n0 + 2 * PAIRS). M, PAIRS and the pairing are
// compile-time constants, so the accumulators stay in vector registers and each byte is unpacked once for all M.
// gsum (M, K / group): each group's sum of x, computed once per call for every block.
template <int64_t M, int64_t PAIRS, bool HALF>
void block_rows(const float* x, const float* gsum, const uint8_t* p, const c10::BFloat16* sz, float* y, int64_t K,
                int64_t N, int64_t group, int64_t n0) {
  constexpr int64_t C = PAIRS / W;  // vectors per nibble half of a block's bytes
  const int64_t groups = K / group;
  V acc[M][2 * C];  // "half": the block's y, vector c holding rows c W .. and vector C + c rows PAIRS + c W ..
  float out[M][2 * PAIRS] = {};  // "adjacent": the block's y, row by row
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < 2 * C; ++c) acc[m][c] = zero();
  for (int64_t g = 0; g < groups; ++g) {
    V lo[M][C], hi[M][C];
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < C; ++c) lo[m][c] = hi[m][c] = zero();
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {  // sum_k code * x, the low and the high nibbles apart
      const uint8_t* b = p + k * PAIRS;
      V cl[C], ch[C];
      for (int64_t c = 0; c < C; ++c) nibbles(b + c * W, cl[c], ch[c]);
      for (int64_t m = 0; m < M; ++m) {
        const V xv = splat(x[m * K + k]);
        for (int64_t c = 0; c < C; ++c) lo[m][c] = fma(cl[c], xv, lo[m][c]), hi[m][c] = fma(ch[c], xv, hi[m][c]);
      }
    }
    // sum_k w x = s (sum_k q x - 8 sum_k x) + z sum_k x, per row, with this group's (scale, offset) of each row
    const c10::BFloat16* t = sz + (g * N + n0) * 2;
    for (int64_t m = 0; m < M; ++m) {
      const float sx = gsum[m * groups + g];
      if constexpr (HALF) {  // a vector's rows are consecutive: their (scale, offset) pairs too
        const V sxv = splat(sx), sx8 = splat(8.f * sx);
        for (int64_t c = 0; c < C; ++c) {
          V s, z;
          scale_offset(t + 2 * c * W, s, z);
          acc[m][c] = fma(s, sub(lo[m][c], sx8), fma(z, sxv, acc[m][c]));
          scale_offset(t + 2 * (PAIRS + c * W), s, z);
          acc[m][C + c] = fma(s, sub(hi[m][c], sx8), fma(z, sxv, acc[m][C + c]));
        }
      } else {  // byte r holds rows 2r and 2r + 1: one row at a time
        float l[PAIRS], h[PAIRS];
        for (int64_t c = 0; c < C; ++c) store(l + c * W, lo[m][c]), store(h + c * W, hi[m][c]);
        for (int64_t r = 0; r < PAIRS; ++r) {
          const int64_t a = 2 * r, b = 2 * r + 1;
          out[m][a] += static_cast<float>(t[2 * a]) * (l[r] - 8.f * sx) + static_cast<float>(t[2 * a + 1]) * sx;
          out[m][b] += static_cast<float>(t[2 * b]) * (h[r] - 8.f * sx) + static_cast<float>(t[2 * b + 1]) * sx;
        }
      }
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * N + n0;
    if constexpr (HALF) {
      for (int64_t c = 0; c < C; ++c) store(row + c * W, acc[m][c]), store(row + PAIRS + c * W, acc[m][C + c]);
    } else {
      for (int64_t r = 0; r < 2 * PAIRS; ++r) row[r] = out[m][r];
    }
  }
}

using BlockFn = void (*)(const float*, const float*, const uint8_t*, const c10::BFloat16*, float*, int64_t, int64_t,
                         int64_t, int64_t);

template <int64_t M>
BlockFn pick_layout(int64_t block_n, bool half) {
  if (block_n == 64) return half ? &block_rows<M, 32, true> : &block_rows<M, 32, false>;
  return half ? &block_rows<M, 16, true> : &block_rows<M, 16, false>;
}

BlockFn pick(int64_t m, int64_t block_n, bool half) {
  switch (m) {
    case 1: return pick_layout<1>(block_n, half);
    case 2: return pick_layout<2>(block_n, half);
    case 3: return pick_layout<3>(block_n, half);
    case 4: return pick_layout<4>(block_n, half);
    case 5: return pick_layout<5>(block_n, half);
    case 6: return pick_layout<6>(block_n, half);
    case 7: return pick_layout<7>(block_n, half);
    default: return pick_layout<8>(block_n, half);
  }
}

}  // namespace

torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scales_and_zeros, int64_t group_size,
                          int64_t block_n, bool half) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "int4_matvec: x must be a contiguous float32 (m, k) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= MAX_M,
              "int4_matvec: x must have 1 to 8 rows (decode steps); longer inputs take PyTorch's kernel");
  TORCH_CHECK(block_n == 32 || block_n == 64, "int4_matvec: block_n must be 32 or 64");
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "int4_matvec: group_size must divide k");
  TORCH_CHECK(scales_and_zeros.dim() == 3 && scales_and_zeros.scalar_type() == torch::kBFloat16 &&
              scales_and_zeros.is_contiguous() && scales_and_zeros.size(0) == K / group_size &&
              scales_and_zeros.size(2) == 2,
              "int4_matvec: scales_and_zeros must be a contiguous bf16 (k / group, n, 2) tensor");
  const int64_t N = scales_and_zeros.size(1);
  TORCH_CHECK(N % block_n == 0, "int4_matvec: n must be a multiple of block_n");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.numel() == N * K / 2,
              "int4_matvec: packed must be the contiguous uint8 (n, k / 2) tensor of the int4 layout");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const c10::BFloat16* sp = scales_and_zeros.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / block_n, groups = K / group_size;
  std::vector<float> gsum(M * groups);  // (M, K / group): each group's sum of x, shared by every block
  for (int64_t i = 0; i < M * groups; ++i) {  // a group is a multiple of W inputs (32 at least)
    V sum = zero();
    for (int64_t k = 0; k < group_size; k += W) sum = add(sum, load(xp + i * group_size + k));
    gsum[i] = total(sum);
  }
  const BlockFn one = pick(M, block_n, half);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      one(xp, gsum.data(), pp + b * K * (block_n / 2), sp, yp, K, N, group_size, b * block_n);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(cookbook, m) {
  m.def("int4_matvec(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int block_n, bool half) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(cookbook, CPU, m) { m.impl("int4_matvec", &int4_matvec); }
