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
// PyTorch's own kernel casts the activations to bf16; its scalar build (ATEN_CPU_CAPABILITY=default) is about 30x
// slower than this loop.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>

namespace {

constexpr int64_t MAX_M = 8;  // rows of x per call (decode steps, short drafts): cookbook.matvec.MAX_ROWS

// W codes at a time, as floats: the low or the high nibbles of W bytes. AVX-512 and AVX2 (compiled with
// -march=native), one at a time elsewhere.
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 16;
using V = __m512;
inline V nibbles(const uint8_t* b, bool high) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  if (high) v = _mm_srli_epi16(v, 4);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15))));
}
inline V splat(float x) { return _mm512_set1_ps(x); }
inline V zero() { return _mm512_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
#elif defined(__AVX2__) && defined(__FMA__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 8;
using V = __m256;
inline V nibbles(const uint8_t* b, bool high) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
  if (high) v = _mm_srli_epi16(v, 4);
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15))));
}
inline V splat(float x) { return _mm256_set1_ps(x); }
inline V zero() { return _mm256_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
#else
constexpr int64_t W = 1;
using V = float;
inline V nibbles(const uint8_t* b, bool high) { return static_cast<float>(high ? b[0] >> 4 : b[0] & 15); }
inline V splat(float x) { return x; }
inline V zero() { return 0.f; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline void store(float* p, V v) { *p = v; }
#endif

// One block of 2 * PAIRS output rows for the M rows of x: y[m, n0 .. n0 + 2 * PAIRS). M, PAIRS and the pairing are
// compile-time constants, so the accumulators stay in vector registers and each byte is unpacked once for all M.
template <int64_t M, int64_t PAIRS, bool HALF>
void block_rows(const float* x, const uint8_t* p, const c10::BFloat16* sz, float* y, int64_t K, int64_t N,
                int64_t group, int64_t n0) {
  constexpr int64_t C = PAIRS / W;  // vectors per nibble half of a block's bytes
  float out[M][2 * PAIRS] = {};
  for (int64_t k0 = 0; k0 < K; k0 += group) {
    V lo[M][C], hi[M][C];
    float sx[M] = {};
    for (int64_t m = 0; m < M; ++m)
      for (int64_t c = 0; c < C; ++c) lo[m][c] = hi[m][c] = zero();
    for (int64_t k = k0; k < k0 + group; ++k) {  // sum_k code * x, the low and the high nibbles apart
      const uint8_t* b = p + k * PAIRS;
      V cl[C], ch[C];
      for (int64_t c = 0; c < C; ++c) cl[c] = nibbles(b + c * W, false), ch[c] = nibbles(b + c * W, true);
      for (int64_t m = 0; m < M; ++m) {
        const float xk = x[m * K + k];
        const V xv = splat(xk);
        sx[m] += xk;
        for (int64_t c = 0; c < C; ++c) lo[m][c] = fma(cl[c], xv, lo[m][c]), hi[m][c] = fma(ch[c], xv, hi[m][c]);
      }
    }
    const c10::BFloat16* g = sz + ((k0 / group) * N + n0) * 2;  // this group's (scale, offset) of each block row
    for (int64_t m = 0; m < M; ++m) {
      float l[PAIRS], h[PAIRS];
      for (int64_t c = 0; c < C; ++c) store(l + c * W, lo[m][c]), store(h + c * W, hi[m][c]);
      for (int64_t r = 0; r < PAIRS; ++r) {  // sum_k w x = s (sum_k q x - 8 sum_k x) + z sum_k x, per row
        const int64_t a = HALF ? r : 2 * r, c = HALF ? r + PAIRS : 2 * r + 1;  // the rows of byte r's nibbles
        out[m][a] += static_cast<float>(g[2 * a]) * (l[r] - 8.f * sx[m]) + static_cast<float>(g[2 * a + 1]) * sx[m];
        out[m][c] += static_cast<float>(g[2 * c]) * (h[r] - 8.f * sx[m]) + static_cast<float>(g[2 * c + 1]) * sx[m];
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < 2 * PAIRS; ++r) y[m * N + n0 + r] = out[m][r];
}

using BlockFn = void (*)(const float*, const uint8_t*, const c10::BFloat16*, float*, int64_t, int64_t, int64_t,
                         int64_t);

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
  const int64_t blocks = N / block_n;
  const BlockFn one = pick(M, block_n, half);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) one(xp, pp + b * K * (block_n / 2), sp, yp, K, N, group_size, b * block_n);
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(cookbook, m) {
  m.def("int4_matvec(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int block_n, bool half) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(cookbook, CPU, m) { m.impl("int4_matvec", &int4_matvec); }
