// y = x @ (codes * scale[:, None]).T for int8 codes, one bf16 scale per output row, float32 activations.
//
// The decode-time product of cookbook.kernels' int8 linears and int8 head (m <= 8 rows of x). PyTorch's
// aten::_weight_int8pack_mm reads the 262k x 640 int8 head at about 13 GB/s on a 2-core Xeon, half the rate a
// float32 matrix-vector product reads its weights at. This loop reads at the float32 rate: each thread streams
// its block of rows, and a software prefetch PREFETCH_ROWS rows ahead keeps enough cache-line requests in flight.
// Vectorised for AVX-512 and AVX2 (compiled with -march=native), plain C++ elsewhere; sums in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>

constexpr int64_t PREFETCH_ROWS = 8;

static inline float dot_row(const float* x, const int8_t* w, int64_t K) {
  int64_t k = 0;
  float sum = 0.f;
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(_M_X64))
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k))));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k + 16))));
    acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + k), acc0);
    acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), acc1);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__) && defined(__FMA__) && (defined(__x86_64__) || defined(_M_X64))
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k))));
    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k + 8))));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), acc1);
  }
  __m256 s = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  sum = _mm_cvtss_f32(h);
#endif
  for (; k < K; ++k) sum += x[k] * static_cast<float>(w[k]);
  return sum;
}

static void rows(const float* x, const int8_t* w, const c10::BFloat16* scale, float* y, int64_t M, int64_t N,
                 int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    if (n + PREFETCH_ROWS < n1) {
      const char* ahead = reinterpret_cast<const char*>(w + (n + PREFETCH_ROWS) * K);
      for (int64_t b = 0; b < K; b += 64) __builtin_prefetch(ahead + b, 0, 3);
    }
    const float s = static_cast<float>(scale[n]);
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = dot_row(x + m * K, w + n * K, K) * s;  // the row stays in L1
  }
}

torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "int8_matvec: x must be a contiguous float32 (m, k) tensor");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous() &&
              codes.size(1) == x.size(1), "int8_matvec: codes must be a contiguous int8 (n, k) tensor");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == torch::kBFloat16 && scale.is_contiguous() &&
              scale.size(0) == codes.size(0), "int8_matvec: scale must be a contiguous bf16 (n,) tensor");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = codes.data_ptr<int8_t>();
  const c10::BFloat16* sp = scale.data_ptr<c10::BFloat16>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows(xp, wp, sp, yp, M, N, K, n0, n1); });
  return y;
}

// Registered with the dispatcher as cookbook::int8_matvec: a call from eager code or from a compiled graph goes
// straight here. An op defined in Python (torch.library.custom_op) runs Python on every call, about 15 us each,
// which at 127 calls per decoded token cost more than the int8 model's attention.
TORCH_LIBRARY(cookbook, m) { m.def("int8_matvec(Tensor x, Tensor codes, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(cookbook, CPU, m) { m.impl("int8_matvec", &int8_matvec); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int8_matvec", &int8_matvec, "int8 codes x float32 rows"); }
