// y = x @ W.T for W held as NF4 (QLoRA): 4-bit indices into a 16-value codebook, one absmax per block of
// block_size consecutive inputs of a row, optionally double-quantized (absmax = code * scale[block / 256] + offset,
// code int8), float32 activations: w = codebook[q] * absmax.
//
// The decode-time product of cookbook.nf4_kernel.PackedNF4Linear (m <= 8 rows of x). Layout, row-major: row n's
// codes take k / 2 bytes; each chunk of 32 inputs k0 .. k0 + 31 is 16 bytes, byte j holding input k0 + j in its
// low nibble and input k0 + 16 + j in its high nibble (nf4_kernel.pack_nf4_rows), so a vector of bytes unpacks to
// consecutive inputs. The non-uniform levels are a table lookup inside a register: one permute of the 16 codebook
// floats per vector of codes (AVX-512: vpermps over 16 lanes; AVX2: two 8-lane permutes and a blend on the index's
// bit 3; one lane at a time elsewhere). Per block the loop sums codebook[q] * x in float32, then applies the
// block's absmax once: sum_k w x = absmax * sum_k codebook[q] x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>

namespace {

constexpr int64_t MAX_M = 8;  // rows of x per call (decode steps, short drafts): cookbook.matvec.MAX_ROWS
constexpr int64_t CHUNK = 32;  // inputs per 16 packed bytes
constexpr int64_t DQ_BLOCK = 256;  // absmaxes per double-quantization scale (quantization.nf4.DQ_BLOCK)

// W weights at a time, as floats: the codebook values of the low or the high nibbles of W bytes.
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 16;
using V = __m512;
using Table = __m512;
inline Table table(const float* lut) { return _mm512_loadu_ps(lut); }
inline V lookup(const Table& t, const uint8_t* b, bool high) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  if (high) v = _mm_srli_epi16(v, 4);
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15))), t);
}
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline V splat(float x) { return _mm512_set1_ps(x); }
inline V zero() { return _mm512_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(V v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__) && (defined(__x86_64__) || defined(_M_X64))
constexpr int64_t W = 8;
using V = __m256;
struct Table { __m256 lo, hi; };
inline Table table(const float* lut) { return {_mm256_loadu_ps(lut), _mm256_loadu_ps(lut + 8)}; }
inline V lookup(const Table& t, const uint8_t* b, bool high) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
  if (high) v = _mm_srli_epi16(v, 4);
  const __m256i q = _mm256_cvtepu8_epi32(_mm_and_si128(v, _mm_set1_epi8(15)));  // 8 indices in [0, 15]
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28));  // bit 3 as the sign: take the upper 8
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, q), _mm256_permutevar8x32_ps(t.hi, q), upper);
}
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline V splat(float x) { return _mm256_set1_ps(x); }
inline V zero() { return _mm256_setzero_ps(); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum(V v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#else
constexpr int64_t W = 1;
using V = float;
using Table = const float*;
inline Table table(const float* lut) { return lut; }
inline V lookup(const Table& t, const uint8_t* b, bool high) { return t[high ? b[0] >> 4 : b[0] & 15]; }
inline V load(const float* p) { return *p; }
inline V splat(float x) { return x; }
inline V zero() { return 0.f; }
inline V fma(V a, V b, V c) { return a * b + c; }
inline float sum(V v) { return v; }
#endif

// The absmax of block b: stored as float32, or double-quantized as an int8 code per block and a float32 scale per
// DQ_BLOCK blocks around one offset.
struct Absmax {
  const float* values;  // float32 absmaxes, or nullptr when double-quantized
  const int8_t* codes;
  const float* scales;
  float offset;
  float operator()(int64_t b) const {
    return values ? values[b] : static_cast<float>(codes[b]) * scales[b / DQ_BLOCK] + offset;
  }
};

// Rows n0 .. n1 of y for the M rows of x. M is a compile-time constant, so the accumulators stay in registers and
// each byte is unpacked and looked up once for all M.
template <int64_t M>
void rows(const float* x, const uint8_t* p, const Absmax& absmax, const float* lut, float* y, int64_t K, int64_t N,
          int64_t block, int64_t n0, int64_t n1) {
  const Table t = table(lut);
  const int64_t blocks = K / block;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p + n * (K / 2);
    V acc[M];
    for (int64_t m = 0; m < M; ++m) acc[m] = zero();
    for (int64_t kb = 0; kb < blocks; ++kb) {
      V part[M];  // sum over this block of codebook[q] * x
      for (int64_t m = 0; m < M; ++m) part[m] = zero();
      for (int64_t k0 = kb * block; k0 < (kb + 1) * block; k0 += CHUNK) {
        const uint8_t* b = row + k0 / 2;
        for (int64_t c = 0; c < CHUNK / 2; c += W) {  // bytes c .. c + W: inputs k0 + c .. and k0 + 16 + c ..
          const V lo = lookup(t, b + c, false), hi = lookup(t, b + c, true);
          for (int64_t m = 0; m < M; ++m) {
            const float* xm = x + m * K + k0 + c;
            part[m] = fma(lo, load(xm), part[m]);
            part[m] = fma(hi, load(xm + CHUNK / 2), part[m]);
          }
        }
      }
      const V a = splat(absmax(n * blocks + kb));
      for (int64_t m = 0; m < M; ++m) acc[m] = fma(part[m], a, acc[m]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = sum(acc[m]);
  }
}

using RowsFn = void (*)(const float*, const uint8_t*, const Absmax&, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t);

RowsFn pick(int64_t m) {
  switch (m) {
    case 1: return &rows<1>;
    case 2: return &rows<2>;
    case 3: return &rows<3>;
    case 4: return &rows<4>;
    case 5: return &rows<5>;
    case 6: return &rows<6>;
    case 7: return &rows<7>;
    default: return &rows<8>;
  }
}

}  // namespace

torch::Tensor nf4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor absmax, torch::Tensor absmax_scale,
                         torch::Tensor absmax_offset, torch::Tensor codebook, int64_t block_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "nf4_matvec: x must be a contiguous float32 (m, k) tensor");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= MAX_M,
              "nf4_matvec: x must have 1 to 8 rows (decode steps); longer inputs take the reference path");
  TORCH_CHECK(block_size > 0 && block_size % CHUNK == 0 && K % block_size == 0,
              "nf4_matvec: block_size must be a multiple of 32 that divides k");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
              packed.size(1) * 2 == K, "nf4_matvec: packed must be the contiguous uint8 (n, k / 2) tensor of "
              "nf4_kernel.pack_nf4_rows");
  const int64_t N = packed.size(0), blocks = N * (K / block_size);
  TORCH_CHECK(codebook.scalar_type() == torch::kFloat32 && codebook.is_contiguous() && codebook.numel() == 16,
              "nf4_matvec: codebook must be the 16 float32 NF4 values");
  TORCH_CHECK(absmax.is_contiguous() && absmax.numel() == blocks &&
              (absmax.scalar_type() == torch::kFloat32 || absmax.scalar_type() == torch::kInt8),
              "nf4_matvec: absmax must hold one float32 absmax (or one int8 double-quantization code) per block");
  const bool double_quant = absmax.scalar_type() == torch::kInt8;
  TORCH_CHECK(!double_quant || (absmax_scale.scalar_type() == torch::kFloat32 && absmax_scale.is_contiguous() &&
                                absmax_scale.numel() * DQ_BLOCK >= blocks &&
                                absmax_offset.scalar_type() == torch::kFloat32 && absmax_offset.numel() == 1),
              "nf4_matvec: int8 absmax codes need their float32 scales (one per 256 blocks) and offset");
  auto y = torch::empty({M, N}, x.options());
  const Absmax a{double_quant ? nullptr : absmax.data_ptr<float>(),
                 double_quant ? absmax.data_ptr<int8_t>() : nullptr,
                 double_quant ? absmax_scale.data_ptr<float>() : nullptr,
                 double_quant ? absmax_offset.data_ptr<float>()[0] : 0.f};
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* lut = codebook.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const RowsFn run = pick(M);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { run(xp, pp, a, lut, yp, K, N, block_size, n0, n1); });
  return y;
}

TORCH_LIBRARY_FRAGMENT(cookbook, m) {
  m.def("nf4_matvec(Tensor x, Tensor packed, Tensor absmax, Tensor absmax_scale, Tensor absmax_offset, "
        "Tensor codebook, int block_size) -> Tensor");
}
TORCH_LIBRARY_IMPL(cookbook, CPU, m) { m.impl("nf4_matvec", &nf4_matvec); }
